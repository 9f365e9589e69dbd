"""The paper's single-Gaussian recursion: M samples refitted by MLE per generation, 1000 chains vmapped.

Shumailov et al. 2024, Fig. 'Gaussian' / theory section.

Command (CPU is plenty; chains are vmapped and split over all devices):
  python -m collapse_jax.main --config=configs/gaussian.py:100 --workdir=runs/gauss100
Variants via the argument: the sample size M per generation, one of 100, 500, 1000, 10000 (default 100).
Expected result: var_ratio mean over chains tracks (1 - 1/M)^(g+1) (0.366 at g = 99 for M = 100) and W2 to
the original grows (plots/gaussian_var_ratio.png overlays the theory curve); with
--config.regime.name=accumulate the variance stays near 1.
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
