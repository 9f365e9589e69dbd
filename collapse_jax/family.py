"""The contract between the generation loop (loop.py) and a model family: the base class every family extends.

A family is built from the run's typed config: `Family.parse(run, cfg[name])` turns its config section into its
frozen `Config` (fields.py: every field checked once, errors naming `config.<name>.<field>`), `make_mesh` gives
the run's mesh, and the constructor takes (run, config, mesh). Its data are read in one named step,
`load_data()`, which the loop calls once, before anything is compiled. The loop owns keys, regimes, chains,
sharding of the carry, checkpoints, metrics and plots; the family learns from a weighted data buffer, samples and
measures. `init_chain`, `init_model`, `fit`, `evaluate` and `sample` are traced inside one jitted program: pure
jnp code with static shapes.

Shapes: a data buffer is `x_NxS` (N data of the family's datum shape: (2,) for a 2-D GMM, (28, 28, 1) for MNIST,
(block_len,) token ids for the LM) with weights `w_N` in {0, 1}: capacities are static, how many rows are valid
is not (accumulating regimes grow; growing sample schedules vary per generation). Valid rows come first.

Per chain the loop carries the family's `aux` pytree (e.g. a held-out set) plus the previous generation's model
and generation 0's model; a `Generation` hands them, with the training buffer and the shared arrays, to `fit`,
`evaluate` and `sample`. The defaults here (1-D 'data' mesh, everything replicated, no figures, nothing to plan)
are what a family without its own opinion gets; the loop calls every method and never probes for one.
"""
from typing import Any, NamedTuple

import jax
import numpy as np

from collapse_jax import fields, sharding
from collapse_jax.errors import ConfigError

PyTree = Any


class Data(NamedTuple):
  """What `load_data` read: how many real training data one chain starts from (generation 0's training set) and
  the arrays every chain shares (a dataset, initial weights), host-side; ShapeDtypeStructs in plan mode."""
  n_real: int
  shared: PyTree


class Generation(NamedTuple):
  """What one generation of one chain may read, all traced: its index, its training buffer (valid rows first),
  generation g-1's model (zeros at g = 0), generation 0's model (this generation's own at g = 0; before `fit`, the
  carried one), the chain's aux pytree and the shared arrays."""
  g: jax.Array
  x: jax.Array
  w: jax.Array
  prev: PyTree
  model0: PyTree
  aux: PyTree
  shared: PyTree


class Family:
  name: str = ""
  Config: type | None = None     # the frozen dataclass of config.<name> (fields.py)
  # Whether chains are independent replicas (Gaussian, GMM: vmapped and sharded over the mesh) or there is a
  # single chain whose *batches* are sharded (VAE, LM: data parallel inside `fit`).
  vmap_chains: bool = True
  # Per-generation metrics the family reports, in the order they are plotted.
  metric_names: tuple[str, ...] = ()
  # What a reader looks at first, most telling first: the summary's table (summary.md), the report's figures, and
  # the first one is shown on each generation's progress line.
  headline: tuple[str, ...] = ()
  # Metric -> what it is, in a few words: figure titles, the summary's and the report's tables (else its name).
  titles: dict[str, str] = {}
  # Related metrics drawn on one panel: (panel title, metrics); a metric in no group gets a panel of its own.
  groups: tuple[tuple[str, tuple[str, ...]], ...] = ()
  # Plan mode (plan.py): the compute dtype whose published FLOP rate the roofline uses, and what a refusal of a
  # run too large for its chips suggests.
  dtype: str = "bfloat16"
  plan_suggestions: tuple[str, ...] = ()

  # --- config and placement (host side, before anything is read or compiled) ------------------------------------
  @classmethod
  def parse(cls, run, section):
    """config.<name> as the family's frozen Config, its rules joined with the run's fields checked (`check`)."""
    if section is None:
      raise ConfigError(f"config.{cls.name} is missing (use configs/{cls.name}.py)")
    c = fields.parse(cls.Config, section, cls.name)
    cls.check(run, c)
    return c

  @classmethod
  def check(cls, run, c) -> None:
    """Rules that join the family's section with the loop-level fields (run: config.Run). Default: none."""

  @classmethod
  def make_mesh(cls, run, c, devices=None) -> jax.sharding.Mesh:
    """The run's mesh over `devices` (plan mode: a TPU topology's; default: the visible ones). Default: the 1-D
    'data' mesh of config.num_devices of them. A family's own mesh must keep a 'data' axis (the loop splits
    single-chain buffers by rows over it); batch-sharded code should use sharding.batch_axes(mesh)."""
    return sharding.make_mesh(None, run_devices(run, devices))

  def __init__(self, run, c, mesh, abstract: bool = False):
    """abstract (plan mode): a family that can enters as shapes only (`load_data` returns ShapeDtypeStructs)."""
    self.run, self.c, self.mesh, self.abstract = run, c, mesh, abstract

  def load_data(self) -> Data:
    """Read (or draw) the data and check them against the config; called once by the loop, before compiling."""
    raise NotImplementedError

  def model_shardings(self, model_shapes: PyTree) -> PyTree:
    """NamedShardings (same structure as `init_model`'s output, given as ShapeDtypeStructs) for the models a
    single-chain family's carry holds, prev and model0; checkpoints restore onto them. Default: replicated."""
    return jax.tree.map(lambda _: sharding.replicated(self.mesh), model_shapes)

  def shared_shardings(self, shared: PyTree) -> PyTree:
    """Where `Data.shared` lives on the mesh. Default: replicated."""
    return jax.tree.map(lambda _: sharding.replicated(self.mesh), shared)

  # --- one chain, one generation (traced) ------------------------------------------------------------------------
  def init_chain(self, key: jax.Array, shared: PyTree) -> tuple[jax.Array, PyTree]:
    """Real training data `x_RxS` (R = n_real) for one chain, and the chain's aux pytree."""
    raise NotImplementedError

  def init_model(self, key: jax.Array, shared: PyTree) -> PyTree:
    """A fresh, untrained model. The loop takes its structure (jax.eval_shape) for the zeros it carries as `prev`
    and `model0` before generation 0."""
    raise NotImplementedError

  def fit(self, gen: Generation, key: jax.Array) -> PyTree:
    """One generation's learning on (gen.x, gen.w)."""
    raise NotImplementedError

  def evaluate(self, model: PyTree, gen: Generation) -> dict[str, jax.Array]:
    """Metrics of `model` for one chain (gen.model0: generation 0's model). Scalars are aggregated over chains
    (mean, std, quantiles); arrays (e.g. a histogram) are kept per generation for chain 0."""
    raise NotImplementedError

  def sample(self, model: PyTree, n: int, key: jax.Array, gen: Generation) -> tuple[jax.Array, dict]:
    """(n data from `model`, metrics of those samples: {} where the family has none). n is static."""
    raise NotImplementedError

  # --- host side, after the run ----------------------------------------------------------------------------------
  def plot(self, workdir: str, metrics: dict, arrays: dict, snapshots: dict) -> None:
    """Family-specific figures into workdir/plots/: metrics {name: {stat: [G]}}, arrays {name: [G, ...]} (the
    non-scalar metrics, chain 0), snapshots {generation: chain 0's first snapshot_size samples}. Default: none
    (the loop draws every metric's bands itself)."""

  def array_edges(self) -> dict:
    """{array metric: its bin edges} for histogram-like array metrics (written beside them in arrays.npz, so a
    reader such as the report draws them without the family). Default: none."""
    return {}

  def texts(self, arrays: dict, g: int) -> dict[str, str]:
    """{name: text} of generation g for text summaries (TensorBoard), from the array metrics. Default: none."""
    return {}

  # --- plan mode (plan.py) ---------------------------------------------------------------------------------------
  def step_programs(self, exp) -> list:
    """plan.Step per program of one generation (jitted, abstract args, how often a generation runs it), for the
    roofline. Default: none (the plan reports the compiled chunk only)."""
    return []


def run_devices(run, devices=None) -> list:
  """The first config.num_devices of `devices` (default: the visible ones; num_devices 0: all of them)."""
  devices = list(jax.devices() if devices is None else devices)
  if run.num_devices > len(devices):
    raise ConfigError(f"config.num_devices={run.num_devices} but only {len(devices)} devices are available")
  return devices[:run.num_devices or None]


def abstract(data: Data, shardings: PyTree) -> PyTree:
  """Data.shared as ShapeDtypeStructs placed by `shardings` (plan mode, and tracing without data)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), data.shared, shardings)
