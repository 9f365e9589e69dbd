"""The paper's single-Gaussian recursion: M samples refitted by MLE per generation, 1000 chains vmapped.

Shumailov et al. 2024, Fig. 'Gaussian' / theory section.

Command (CPU is plenty; chains are vmapped and split over all devices):
  python -m collapse_jax.main --config=configs/gaussian.py:100 --workdir=runs/gauss100
Variants via the argument: the sample size M per generation, one of 100, 500, 1000, 10000 (default 100).
Expected result: var_ratio mean over chains tracks (1 - 1/M)^(g+1) (0.366 at g = 99 for M = 100) and W2 to
the original grows (plots/gaussian_var_ratio.png overlays the theory curve); with
--config.regime.name=accumulate the variance stays near 1. Far out (g = 999 below) the mean over 1000 chains
falls well under the theory: var_ratio is a product of scaled chi-squares, so skewed that its mean rests on
chains too rare to sample (its median falls much faster).
Measured (python -m benchmarks.results --only gaussian; commit d8d0b1c, 2026-12-07):
Machine: Intel(R) Xeon(R) Processor (avx512), 2 cores, jax 0.10.2, jaxlib 0.10.2.
Wall time 10.8 s, 1000 generations (`--config=gaussian`; start-up and compilation included; others' load 0.0 cores).

| generation | 0 | 9 | 99 | 499 | 999 |
|---|---|---|---|---|---|
| fitted variance / true variance [var_ratio/mean] | 0.9835 | 0.9256 | 0.3713 | 0.00453 | 2.198e-06 |
| fitted variance / true variance [var_ratio/std] | 0.1399 | 0.4449 | 0.7189 | 0.037 | 1.845e-05 |
| fitted variance / true variance [var_ratio/q05] | 0.7614 | 0.3715 | 0.01237 | 3.044e-07 | 1.261e-12 |
| fitted variance / true variance [var_ratio/q25] | 0.8825 | 0.6092 | 0.04893 | 6.546e-06 | 1.041e-10 |
| fitted variance / true variance [var_ratio/q50] | 0.981 | 0.8539 | 0.1492 | 5.087e-05 | 2.203e-09 |
| fitted variance / true variance [var_ratio/q75] | 1.073 | 1.155 | 0.3587 | 0.0004291 | 4.258e-08 |
| fitted variance / true variance [var_ratio/q95] | 1.227 | 1.705 | 1.426 | 0.01124 | 4.388e-06 |
| Wasserstein-2 distance to the truth [w2/mean] | 0.1076 | 0.339 | 0.9403 | 1.318 | 1.335 |
| Wasserstein-2 distance to the truth [w2/std] | 0.05667 | 0.1773 | 0.4229 | 0.4856 | 0.4878 |
| Wasserstein-2 distance to the truth [w2/q05] | 0.02429 | 0.08456 | 0.4036 | 0.984 | 1 |
| Wasserstein-2 distance to the truth [w2/q25] | 0.06773 | 0.2095 | 0.7071 | 1.022 | 1.034 |
| Wasserstein-2 distance to the truth [w2/q50] | 0.1001 | 0.3213 | 0.8674 | 1.129 | 1.138 |
| Wasserstein-2 distance to the truth [w2/q75] | 0.1432 | 0.439 | 1.08 | 1.41 | 1.424 |
| Wasserstein-2 distance to the truth [w2/q95] | 0.2129 | 0.663 | 1.76 | 2.313 | 2.345 |
(end of measured block gaussian)
"""
from collapse_jax.config import base_config, variants
from collapse_jax.errors import ConfigError

VARIANTS = ("100", "500", "1000", "10000")


def get_config(arg: str | None = None):
  c = base_config()
  c.family = "gaussian"
  sizes, _ = variants(arg, VARIANTS)
  if len(sizes) > 1:
    raise ConfigError(f"configs/gaussian.py takes one sample size, got {arg!r}")
  c.samples.n = int(next(iter(sizes), "100"))
  c.generations = 1000
  c.chains = 1000
  c.checkpoint_every = 250
  c.gaussian = dict(dim=1, true_mean=0.0, true_std=1.0, estimator="mle")
  return c
