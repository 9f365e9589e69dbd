"""The run's configuration: the loop-level fields every experiment shares, typed and checked once.

configs/<experiment>.py builds on `base_config()` (an ml_collections ConfigDict: what the command line overrides
and config.json records) and adds a section named after its family. `parse` turns the loop-level fields into a
frozen `Run` through the shared field checks (fields.py); the family turns its own section into its frozen Config
the same way (family.py). Both happen before any array is made or anything is compiled, so bad input costs nothing
and names the field it is about.
"""
import dataclasses
import importlib.util
import os

import ml_collections

from collapse_jax import fields
from collapse_jax.errors import ConfigError

REGIMES = ("replace", "real_fraction", "accumulate", "accumulate_subsample")
# Fields (and sections) that change no result: a run may be resumed with other values (resume.py), and the report
# does not tell runs apart by them (report.py).
RESULT_NEUTRAL = ("plots", "num_devices", "keep_checkpoints", "checkpoint_every", "checkpoint_min_seconds",
                  "chain_batch", "tensorboard", "wandb")
SCHEDULES = ("fixed", "linear", "geometric")
WANDB_MODES = ("online", "offline")


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
  # Watching a run live (tracking.py, process 0 only): every metric as TensorBoard event files in
  # WORKDIR/tensorboard/ (no TensorFlow needed), and to Weights & Biases when a project is named.
  c.tensorboard = True
  c.wandb = ml_collections.ConfigDict()
  c.wandb.project = ""           # "": off; a project name needs `pip install wandb` (checked before compiling)
  c.wandb.entity = ""            # team or user; "": the logged-in account's default
  c.wandb.mode = "online"        # online | offline (files under WORKDIR/wandb, uploaded later by `wandb sync`)
  return c


@dataclasses.dataclass(frozen=True)
class Regime:
  name: str = fields.choice(REGIMES)
  real_fraction: float = fields.number(0.0, 1.0)
  subsample: int = fields.integer(lo=0)


@dataclasses.dataclass(frozen=True)
class Samples:
  n: int = fields.integer(lo=1)
  schedule: str = fields.choice(SCHEDULES)
  growth: float = fields.number()

  def __post_init__(self):
    if self.schedule == "linear" and self.growth < 0:
      raise fields.bad("samples.growth", ">= 0 for a linear schedule", self.growth)
    if self.schedule == "geometric" and self.growth < 1:
      raise fields.bad("samples.growth", ">= 1 for a geometric schedule", self.growth)


@dataclasses.dataclass(frozen=True)
class Wandb:
  project: str = fields.text()
  entity: str = fields.text()
  mode: str = fields.choice(WANDB_MODES)


@dataclasses.dataclass(frozen=True)
class Run:
  """The loop-level fields of one run (the family's section is the family's: family.py)."""
  family: str = fields.text()
  seed: int = fields.integer()
  generations: int = fields.integer(lo=1)
  chains: int = fields.integer(lo=1)
  chain_batch: int = fields.integer(lo=0)
  checkpoint_every: int = fields.integer(lo=1)
  keep_checkpoints: int = fields.integer(lo=2, why="a corrupt latest checkpoint falls back to the one before")
  checkpoint_min_seconds: float = fields.number(lo=0.0)
  num_devices: int = fields.integer(lo=0)
  regime: Regime = fields.section(Regime)
  samples: Samples = fields.section(Samples)
  n_real: int = fields.integer(lo=0)
  snapshot_generations: tuple[int, ...] = fields.integers(lo=0)
  snapshot_size: int = fields.integer(lo=0)
  quantiles: tuple[float, ...] = fields.numbers_in(0.0, 1.0)
  plots: bool = fields.boolean()
  tensorboard: bool = fields.boolean()
  wandb: Wandb = fields.section(Wandb)

  @property
  def n_real_or_samples(self) -> int:
    """Real training data at generation 0 where the family does not fix it: n_real, or samples.n."""
    return self.n_real or self.samples.n

  def sample_counts(self) -> list[int]:
    """M_g for g = 0..G-1: how many synthetic data generation g-1 hands to generation g (entry 0 is unused)."""
    s, G = self.samples, self.generations
    if s.schedule == "fixed":
      return [s.n] * G
    if s.schedule == "linear":
      return [int(round(s.n + s.growth * g)) for g in range(G)]
    return [int(round(s.n * s.growth**g)) for g in range(G)]

  def data_per_generation(self) -> tuple[tuple[str, int], ...]:
    """(field, count) of the data one generation fits: n_real at generation 0, samples.n after it, so that an
    error names the one that is too small."""
    return (("samples.n", self.samples.n), ("n_real", self.n_real_or_samples))


def parse(cfg) -> Run:
  """The loop-level fields of `cfg` as a Run; the family's section (named by cfg.family) is left to the family."""
  family = cfg.get("family", "") if hasattr(cfg, "get") else ""
  return fields.parse(Run, cfg, "", ignore=(family,) if isinstance(family, str) and family else ())


def variants(arg: str | None, known: tuple[str, ...]) -> tuple[set[str], dict[str, str]]:
  """A config file's `:variant,variant,key=value` argument as (flags, {key: value}), `known` being the file's
  VARIANTS (`quick`, `chains=N`: a flag, a key that takes a value). Anything else is refused in one line naming
  the known variants. The one parser every configs/*.py uses."""
  takes_value = {key: bool(eq) for key, eq, _ in (v.partition("=") for v in known)}
  flags, values = set(), {}
  for part in (p.strip() for p in (arg or "").split(",")):
    if not part:
      continue
    key, eq, value = part.partition("=")
    if key not in takes_value:
      raise ConfigError(f"unknown config variant {key!r} (known: {', '.join(known)})")
    if bool(eq) != takes_value[key]:
      form = next(v for v in known if v.partition("=")[0] == key)
      raise ConfigError(f"config variant {part!r} is not of the form {form}")
    if eq:
      values[key] = value
    else:
      flags.add(key)
  return flags, values


def configs_dir() -> str:
  """The experiments' config files: collapse_jax/configs in an installed copy (pyproject maps configs/ there),
  else configs/ beside the package, as in a checkout (editable install or PYTHONPATH)."""
  package = os.path.dirname(os.path.abspath(__file__))
  inside = os.path.join(package, "configs")
  return inside if os.path.isdir(inside) else os.path.join(os.path.dirname(package), "configs")


def load(name: str, arg: str | None = None, **overrides) -> ml_collections.ConfigDict:
  """configs/<name>.py's get_config(arg) (or a path to any config file), as the CLI would build it, with
  `a__b=value` overrides for nested fields. For tests, benchmarks and notebooks."""
  path = name if name.endswith(".py") else os.path.join(configs_dir(), f"{name}.py")
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
