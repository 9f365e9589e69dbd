"""The paper's GMM recursion: a 2-D, 2-component GMM refitted by EM on its own samples for 2050 generations.

A full-covariance GMM fitted by EM to 1000 samples of a 2-D standard normal blob, refitted on 1000 of its own
samples each generation.

Command (the README's main job; its wall time on a CPU is measured below):
  collapse-jax --config=gmm --workdir=runs/gmm     (or python -m collapse_jax.main --config=configs/gmm.py ...)
On a CPU, `--cpu_threads=1` runs the compiled generations ~1.8x faster (one chain's EM is many tiny kernels that
XLA otherwise splits over threads for nothing; results are byte-identical), but compiles on one core: worth it
for long runs or many generations, not for this job of a few seconds.
Variants: gmm:chains=256 (many vmapped chains, split over all devices), gmm:quick (50 generations, for smoke
tests), comma separated; any field by --config.FIELD=VALUE, e.g. --config.regime.name=accumulate.
Expected result: the L2 distance to generation 0's GMM grows and the components' spread shrinks over
generations (the paper's Fig. 'GMM'); scatter snapshots at generations 0, 50, 100, 150, 200, 350, 2000.
Measured (python -m benchmarks.results --only readme_gmm; commit d8d0b1c, 2026-12-07):
Machine: Intel(R) Xeon(R) Processor (avx512), 2 cores, jax 0.10.2, jaxlib 0.10.2.
Wall time 6.5 s, 2050 generations (`--config=configs/gmm.py`; start-up and compilation included; others' load 0.0 cores).

| generation | 0 | 50 | 100 | 200 | 350 | 1000 | 2000 | 2049 |
|---|---|---|---|---|---|---|---|---|
| mixture's standard deviation [mixture_std] | 0.9985 | 0.9821 | 0.962 | 0.9191 | 0.7835 | 0.5771 | 0.01929 | 0.02156 |
| L2 distance to generation 0's density [l2_to_gen0] | 0 | 0.1352 | 0.1822 | 0.3752 | 1.042 | 6.174 | 17.86 | 15.44 |
| log-likelihood of held-out real data [heldout_loglik] | -2.888 | -3.514 | -3.63 | -5.829 | -6.467 | -975 | -7208 | -5546 |
| smallest component std [comp_std_min] | 0.9129 | 0.7526 | 0.7857 | 0.5901 | 0.2542 | 0.02947 | 0.01302 | 0.01555 |
| EM iterations [em_iters] | 28 | 23 | 11 | 7 | 5 | 2 | 10 | 17 |
(end of measured block readme_gmm)
Measured (python -m benchmarks.results --only gmm_quick; commit d8d0b1c, 2026-12-07):
Machine: Intel(R) Xeon(R) Processor (avx512), 2 cores, jax 0.10.2, jaxlib 0.10.2.
Wall time 6.3 s, 50 generations (`--config=gmm:quick`; start-up and compilation included; others' load 0.0 cores).

| generation | 0 | 10 | 20 | 29 | 39 | 49 |
|---|---|---|---|---|---|---|
| mixture's standard deviation [mixture_std] | 0.9985 | 1.061 | 1.051 | 1.094 | 1.09 | 0.9935 |
| L2 distance to generation 0's density [l2_to_gen0] | 0 | 0.0758 | 0.1002 | 0.1521 | 0.1277 | 0.1229 |
| log-likelihood of held-out real data [heldout_loglik] | -2.888 | -3.011 | -3.075 | -3.3 | -3.29 | -3.489 |
(end of measured block gmm_quick)
"""
from collapse_jax.config import base_config, variants
from collapse_jax.errors import ConfigError

VARIANTS = ("quick", "chains=N")


def get_config(arg: str | None = None):
  c = base_config()
  c.family = "gmm"
  c.seed = 0
  c.generations = 2050
  c.chains = 1
  c.checkpoint_every = 50
  c.samples.n = 1000
  c.snapshot_generations = (0, 50, 100, 150, 200, 350, 2000)
  c.snapshot_size = 1000
  c.gmm = dict(components=2, dim=2, tol=1e-5, max_iter=2000, reg_covar=1e-6, kmeans_iter=300,
               heldout=1000, true_mean=0.0, true_std=1.0)
  flags, values = variants(arg, VARIANTS)
  if "quick" in flags:
    c.generations, c.checkpoint_every = 50, 10
    c.snapshot_generations = (0, 10, 20, 49)
  if "chains" in values:
    if not values["chains"].isdigit():
      raise ConfigError(f"config variant chains=N takes a count, got {values['chains']!r}")
    c.chains = int(values["chains"])
  return c
