"""The surface every model family exposes to the generation loop (loop.py).

A family is a small object built from the run's config. The loop owns keys, regimes, chains, sharding,
checkpoints, metrics and plots; the family only knows how to learn from a weighted data buffer, sample, and
measure. All methods except `shared`, `plot` and `describe` are traced inside one jitted program, so they must be
pure jnp code with static shapes.

Shapes: one datum has shape `datum_shape` (e.g. (2,) for a 2-D GMM, (28, 28, 1) for MNIST). A data buffer is
`x_NxS` (N data of that shape) with weights `w_N` in {0, 1}: capacities are static, how many entries are valid
is not (accumulating regimes grow; growing sample schedules vary per generation).

Per chain the loop carries the family's `aux` pytree (e.g. a held-out set) plus the previous generation's model
and generation 0's model, so families that need them (the VAE's fresh-samples-per-batch mode, metrics measured
through the generation-0 model) get them without carrying their own copies.
"""
from typing import Any, Protocol

import jax

PyTree = Any


class Family(Protocol):
  name: str
  datum_shape: tuple[int, ...]
  datum_dtype: Any
  # How many real training data one chain starts from (generation 0's training set).
  n_real: int
  # Per-generation metrics the family reports, in the order they are plotted.
  metric_names: tuple[str, ...]
  # Whether chains are independent replicas (Gaussian, GMM: vmapped and sharded over the mesh) or there is a
  # single chain whose *batches* are sharded (VAE, LM: data parallel inside `fit`).
  vmap_chains: bool

  def shared(self) -> PyTree:
    """Host-side, once: arrays every chain shares (a dataset). Passed into the jitted program replicated."""

  def init_chain(self, key: jax.Array, shared: PyTree) -> tuple[jax.Array, PyTree]:
    """Real training data `x_RxS` (R = n_real) for one chain, and the chain's aux pytree."""

  def init_model(self, key: jax.Array, shared: PyTree) -> PyTree:
    """A fresh, untrained model. The loop takes its structure (jax.eval_shape) for the zeros it carries as
    `prev_model` and `model0` before generation 0; `fit` may call it to start each generation afresh."""

  def fit(self, x, w, key, prev_model, g, shared) -> PyTree:
    """One generation's learning on buffer (x, w). `prev_model` is generation g-1's model (zeros at g=0)."""

  def sample(self, model, n: int, key, shared, train=None) -> jax.Array | tuple[jax.Array, dict]:
    """n data from `model` (n static). `train` is this generation's training buffer (x, w): the LM continues
    its blocks as prompts; families that sample unconditionally ignore it. May return (data, metrics): metrics
    of the samples just made (the LM: n-gram rates of its generated corpus), merged into `evaluate`'s."""

  def evaluate(self, model, model0, aux, shared, train=None) -> dict[str, jax.Array]:
    """Metrics of `model` for one chain; `model0` is generation 0's model; `train` (x, w) as in `sample` (the LM
    scores its training blocks under model0). Scalars are aggregated over chains
    (mean, std, quantiles); arrays (e.g. a histogram) are kept per generation for chain 0."""

  def plot(self, workdir: str, metrics: dict, arrays: dict, snapshots: dict) -> None:
    """Family-specific figures into workdir/plots/: metrics {name: {stat: [G]}}, arrays {name: [G, ...]} (the
    non-scalar metrics, chain 0), snapshots {generation: chain 0's first snapshot_size samples}."""


class Placement(Protocol):
  """Optional methods of a single-chain family (vmap_chains False) that places its own arrays. The loop calls
  each one only where the family defines it, so families without them keep the defaults (noted per method).
  The LM uses all three: its initial, generation-0 and previous models are split over the 'fsdp' and 'tensor'
  axes of its ('data', 'fsdp', 'tensor') mesh instead of held whole on every device."""

  @staticmethod
  def make_mesh(cfg, devices=None) -> jax.sharding.Mesh:
    """The run's mesh from the config, before the family is built (it is the family's constructor argument),
    over `devices` (plan mode: a TPU topology's; default: the visible ones). Default: sharding.make_mesh
    (cfg.num_devices), the 1-D 'data' mesh. The mesh must have a 'data' axis (the
    loop splits single-chain data buffers by rows over it); batch-sharded code should use
    sharding.batch_axes(mesh) rather than assume one axis."""

  def model_shardings(self, model_shapes: PyTree) -> PyTree:
    """NamedShardings (same structure as `init_model`'s output, given as ShapeDtypeStructs) for the models the
    loop carries, prev and model0; checkpoints restore onto them. Default: replicated."""

  def shared_shardings(self, shared: PyTree) -> PyTree:
    """NamedShardings for `shared()`'s host arrays, as they are put on the mesh and passed to the compiled
    chunk. Default: replicated."""


class Plannable(Protocol):
  """Optional methods for plan mode (plan.py), the LM's: built with `abstract=True`, the family reads no weights
  (and no data where its config gives the sizes)."""
  dtype: str                   # the compute dtype: which published FLOP rate the roofline uses
  plan_suggestions: list[str]  # what the refusal of a run too large for its chips suggests

  def abstract_shared(self) -> PyTree:
    """`shared()` as ShapeDtypeStructs."""

  def step_programs(self, exp) -> list:
    """plan.Step per program of one generation (jitted, abstract args, how often a generation runs it)."""
