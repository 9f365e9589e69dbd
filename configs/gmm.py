"""The paper's GMM recursion: a 2-D, 2-component GMM refitted by EM on its own samples for 2050 generations.

A full-covariance GMM fitted by EM to 1000 samples of a 2-D standard normal blob, refitted on 1000 of its own
samples each generation.

Command (the README's main job; CPU: ~6 s on 2 idle cores, ~2-3 s of it compilation):
  collapse-jax --config=gmm --workdir=runs/gmm     (or python -m collapse_jax.main --config=configs/gmm.py ...)
On a CPU, `--cpu_threads=1` runs the compiled generations ~1.8x faster (one chain's EM is many tiny kernels that
XLA otherwise splits over threads for nothing; results are byte-identical), but compiles on one core: worth it
for long runs or many generations, not for this 6 s job.
Variants: gmm:chains=256 (many vmapped chains, split over all devices), gmm:quick (50 generations, a few seconds
after compilation, for smoke tests), comma separated; any field by --config.FIELD=VALUE, e.g.
--config.regime.name=accumulate.
Expected result: the L2 distance to generation 0's GMM grows and the components' spread shrinks over
generations (the paper's Fig. 'GMM'); scatter snapshots at generations 0, 50, 100, 150, 200, 350, 2000.
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
