"""Loop-level config fields shared by every experiment, and their validation.

configs/<experiment>.py builds on `base_config()` and adds a sub-config named after its family. Everything is
checked here (and by the family's `validate`) before any array is made or anything is compiled, so bad input
costs nothing and names the field it is about.
"""
import math
import os

import ml_collections

REGIMES = ("replace", "real_fraction", "accumulate", "accumulate_subsample")
SCHEDULES = ("fixed", "linear", "geometric")


class ConfigError(ValueError):
  """A bad config value or path; the message names it and fits on one line."""


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.family = ""
  c.seed = 0
  c.generations = 10
  c.chains = 1                   # independent replicas of the whole recursion (vmapped, sharded over devices)
  c.chain_batch = 0              # chains vmapped together per device; 0: 1 on CPU, all on GPU/TPU
  c.checkpoint_every = 10        # generations per compiled chunk; an Orbax checkpoint after each chunk
  c.keep_checkpoints = 3         # >= 2 so a corrupt latest checkpoint can fall back to the one before
  # A chunk is not checkpointed while the previous save is still being written or started less than this many
  # seconds ago (the run's last chunk, and a stop, always are): a fast family (GMM: 50 generations in ~20 ms, an
  # Orbax save ~20 ms of the loop's time and ~80 ms in the background) does not spend its time saving, and a kill
  # loses at most about this long. 0: every chunk is saved (each save awaited before the next).
  c.checkpoint_min_seconds = 1.0
  c.num_devices = 0              # 0: all visible devices
  c.regime = ml_collections.ConfigDict()
  c.regime.name = "replace"
  c.regime.real_fraction = 0.1   # used by real_fraction: share of each training set drawn from the real data
  c.regime.subsample = 0         # accumulate_subsample training-set size; 0: samples.n
  c.samples = ml_collections.ConfigDict()
  c.samples.n = 1000             # synthetic data each generation produces for the next (M)
  c.samples.schedule = "fixed"   # fixed: M; linear: M + growth*g; geometric: M * growth**g
  c.samples.growth = 0.0
  c.n_real = 0                   # real training data at generation 0; 0: samples.n (families may fix it)
  c.snapshot_generations = ()    # generations whose samples (chain 0) are kept for plots
  c.snapshot_size = 0            # how many samples per snapshot
  c.quantiles = (0.05, 0.25, 0.5, 0.75, 0.95)
  c.plots = True
  return c


def _positive_int(cfg, path: str, allow_zero: bool = False):
  node = cfg
  for part in path.split("."):
    node = node[part]
  if isinstance(node, bool) or not isinstance(node, int) or node < (0 if allow_zero else 1):
    raise ConfigError(f"config.{path} must be a {'non-negative' if allow_zero else 'positive'} integer, got {node!r}")


def sample_counts(cfg) -> list[int]:
  """M_g for g = 0..G-1: how many synthetic data generation g-1 hands to generation g (entry 0 is unused)."""
  s = cfg.samples
  if s.schedule == "fixed":
    return [s.n] * cfg.generations
  if s.schedule == "linear":
    return [int(round(s.n + s.growth * g)) for g in range(cfg.generations)]
  return [int(round(s.n * s.growth**g)) for g in range(cfg.generations)]


def check_truth(section: str, c) -> None:
  """The true Gaussian a family's real data come from: a finite mean and a finite, positive std."""
  if not (math.isfinite(c.true_std) and c.true_std > 0):
    raise ConfigError(f"config.{section}.true_std must be finite and > 0, got {c.true_std!r}")
  if not math.isfinite(c.true_mean):
    raise ConfigError(f"config.{section}.true_mean must be finite, got {c.true_mean!r}")


def data_per_generation(cfg) -> tuple[tuple[str, int], ...]:
  """(field, count) of the data one generation fits: n_real at generation 0, samples.n after it, so that an error
  names the one that is too small."""
  return (("samples.n", cfg.samples.n), ("n_real", cfg.n_real or cfg.samples.n))


def validate(cfg) -> None:
  for path in ("generations", "chains", "checkpoint_every", "keep_checkpoints", "samples.n"):
    _positive_int(cfg, path)
  _positive_int(cfg, "num_devices", allow_zero=True)
  _positive_int(cfg, "chain_batch", allow_zero=True)
  _positive_int(cfg, "n_real", allow_zero=True)
  _positive_int(cfg, "regime.subsample", allow_zero=True)
  _positive_int(cfg, "snapshot_size", allow_zero=True)
  m = cfg.checkpoint_min_seconds
  if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 <= m < float("inf"):
    raise ConfigError(f"config.checkpoint_min_seconds must be a finite number >= 0, got {m!r}")
  if cfg.keep_checkpoints < 2:
    raise ConfigError(f"config.keep_checkpoints must be >= 2 (a corrupt latest checkpoint falls back), got {cfg.keep_checkpoints}")
  if cfg.regime.name not in REGIMES:
    raise ConfigError(f"config.regime.name={cfg.regime.name!r} is not one of {', '.join(REGIMES)}")
  f = cfg.regime.real_fraction
  if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= f <= 1.0:
    raise ConfigError(f"config.regime.real_fraction must be in [0, 1], got {f!r}")
  if cfg.samples.schedule not in SCHEDULES:
    raise ConfigError(f"config.samples.schedule={cfg.samples.schedule!r} is not one of {', '.join(SCHEDULES)}")
  if cfg.samples.schedule == "linear" and cfg.samples.growth < 0:
    raise ConfigError(f"config.samples.growth must be >= 0 for a linear schedule, got {cfg.samples.growth}")
  if cfg.samples.schedule == "geometric" and cfg.samples.growth < 1:
    raise ConfigError(f"config.samples.growth must be >= 1 for a geometric schedule, got {cfg.samples.growth}")
  if any(g < 0 for g in cfg.snapshot_generations):
    raise ConfigError(f"config.snapshot_generations must be non-negative, got {tuple(cfg.snapshot_generations)}")
  if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool):
    raise ConfigError(f"config.seed must be an integer, got {cfg.seed!r}")
  qs = tuple(cfg.quantiles)
  if not qs or any(not 0.0 <= q <= 1.0 for q in qs):
    raise ConfigError(f"config.quantiles must be in [0, 1], got {qs}")


def check_workdir(workdir: str) -> None:
  """The workdir must be a local path or gs:// URL that exists or can be created, and be writable; checked before
  anything is computed (paths.check_workdir)."""
  from collapse_jax import paths  # paths imports this module for ConfigError
  paths.check_workdir(workdir)


def load(name: str, arg: str | None = None, **overrides) -> ml_collections.ConfigDict:
  """configs/<name>.py's get_config(arg) (or a path to any config file), as the CLI would build it, with
  `a__b=value` overrides for nested fields. For tests, benchmarks and notebooks."""
  import importlib.util
  path = name if name.endswith(".py") else os.path.join(
      os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"collapse_jax_config_{os.path.basename(path)[:-3]}", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  cfg = mod.get_config(arg) if arg is not None else mod.get_config()
  for key, value in overrides.items():
    node = cfg
    *parents, leaf = key.split("__")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return cfg
