"""Device mesh and shardings. The 1-D mesh axis 'data' serves the Gaussian, GMM and VAE families: independent
chains (Gaussian, GMM) are split over it, or the VAE's batch is. The LM uses a 3-D ('data', 'fsdp', 'tensor')
mesh with logical-axis rules (below)."""
import functools
import math

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

AXIS = "data"


def make_mesh(num_devices: int | None = None, devices=None) -> jax.sharding.Mesh:
  """The 1-D 'data' mesh over the first num_devices of `devices` (default: all visible devices)."""
  devices = jax.devices() if devices is None else list(devices)
  n = len(devices) if num_devices is None else num_devices
  if not 1 <= n <= len(devices):
    raise ValueError(f"num_devices={n} but {len(devices)} devices are visible")
  # Auto axes: shardings given at jit boundaries propagate through vmap/scan without per-op annotations.
  return jax.make_mesh((n,), (AXIS,), axis_types=(AxisType.Auto,), devices=devices[:n])


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def leading(mesh) -> NamedSharding:
  """Split axis 0 over the mesh (chains, or batch), replicate the rest."""
  return NamedSharding(mesh, P(AXIS))


def pad_to_mesh(n: int, mesh) -> int:
  """Smallest multiple of the mesh size that holds n (extra chains are computed and dropped)."""
  size = mesh.devices.size
  return int(math.ceil(n / size) * size)


# --- the LM's mesh: ('data', 'fsdp', 'tensor') ------------------------------------------------------------------
# The batch is split over 'data' and 'fsdp'; parameters and optimizer state over 'fsdp' (ZeRO-3: XLA gathers each
# weight where it is used and reduce-scatters its gradient) and 'tensor' (Megatron: attention heads, the MLP's
# hidden units and the vocabulary; XLA all-reduces the partial sums of the row-parallel projections). 'data' holds
# replicas (the axis to put across slices, where gathering weights would be slow).
FSDP, TENSOR = "fsdp", "tensor"
BATCH = (AXIS, FSDP)
PARAM_AXES = (FSDP, TENSOR)

# maxtext-style rules (logical name, mesh axis), applied in this order to each array: a rule gives its mesh axis
# to the array's first dimension of that name if the axis is still free and divides what is left of the dimension
# (a dimension may take several axes). So a kernel [embed, heads, kv] gets embed -> fsdp and heads -> tensor, and
# an [mlp] bias mlp -> (tensor, fsdp).
LOGICAL_RULES = (
    ("batch", AXIS), ("batch", FSDP),
    ("heads", TENSOR), ("mlp", TENSOR), ("vocab", TENSOR),
    ("embed", FSDP), ("mlp", FSDP), ("heads", FSDP), ("vocab", FSDP), ("position", FSDP), ("proj", FSDP),
)


def make_lm_mesh(data: int, fsdp: int, tensor: int = 1, devices=None) -> jax.sharding.Mesh:
  devices = jax.devices() if devices is None else list(devices)
  n = data * fsdp * tensor
  if min(data, fsdp, tensor) < 1 or n > len(devices):
    raise ValueError(f"mesh data={data} x fsdp={fsdp} x tensor={tensor} needs {n} devices, {len(devices)} are "
                     "visible")
  # 'tensor' last: jax.make_mesh puts the last axis on the closest devices (its collectives are per layer).
  return jax.make_mesh((data, fsdp, tensor), (AXIS, FSDP, TENSOR), axis_types=(AxisType.Auto,) * 3,
                       devices=devices[:n])


def _axis_size(mesh, name: str) -> int:
  return dict(mesh.shape).get(name, 1)


def batch_axes(mesh) -> tuple[str, ...]:
  """The mesh axes the batch is split over: ('data', 'fsdp') on the LM's mesh, ('data',) on the 1-D one."""
  return tuple(a for a in BATCH if a in mesh.axis_names)


def batch_shards(mesh) -> int:
  return math.prod(_axis_size(mesh, a) for a in batch_axes(mesh))


def batch_sharding(mesh) -> NamedSharding:
  """Axis 0 split over every batch axis of the mesh, the rest replicated."""
  return NamedSharding(mesh, P(batch_axes(mesh)))


def logical_spec(names, shape, mesh, rules=LOGICAL_RULES, fill=()) -> P:
  """PartitionSpec for one array from its logical dimension names (rules above); a dimension no rule can split
  evenly (e.g. an odd vocabulary) stays replicated instead of failing. `fill`: mesh axes the array should be split
  over wherever a dimension can take them (parameters: no byte replicated over 'fsdp' x 'tensor' that could be
  split, e.g. a LayerNorm scale [embed] takes both)."""
  if len(names) != len(shape):
    raise ValueError(f"logical axes {names} do not match shape {shape}")
  used, parts = set(), [[] for _ in shape]

  def give(d, axis):
    size = _axis_size(mesh, axis) * math.prod(_axis_size(mesh, a) for a in parts[d])
    if axis not in used and _axis_size(mesh, axis) > 1 and shape[d] % size == 0:
      parts[d].append(axis)
      used.add(axis)

  for logical, axis in rules:
    if logical in names:
      give(names.index(logical), axis)
  for axis in fill:  # the largest dimension first, never the stacked layers' axis (the scan walks it)
    for d in sorted(range(len(shape)), key=lambda d: -shape[d]):
      if names[d] != "layers" and axis not in used:
        give(d, axis)
  return P(*(None if not p else p[0] if len(p) == 1 else tuple(p) for p in parts))


def constrain(x, names):
  """with_sharding_constraint by logical names on the current mesh (`on_mesh`), a no-op without one: models call
  it where XLA's propagation needs a hint (activations under tensor parallelism)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_spec(names, x.shape, mesh))


def on_mesh(fn, mesh):
  """fn traced with `mesh` as the current mesh, so that sharding.constrain inside it (the models') applies."""
  @functools.wraps(fn)
  def traced(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)
  return traced


def _is_names(x) -> bool:
  return isinstance(x, tuple) and all(n is None or isinstance(n, str) for n in x)


def param_shardings(params, axes, mesh, rules=LOGICAL_RULES):
  """NamedSharding per leaf of `params` (arrays or ShapeDtypeStructs) from the same-structure `axes` tree."""
  return jax.tree.map(lambda names, p: NamedSharding(mesh, logical_spec(names, p.shape, mesh, rules, PARAM_AXES)),
                      axes, params, is_leaf=_is_names)


def opt_state_shardings(opt_state, params, shardings, mesh):
  """Shardings for an optax state: every subtree shaped like `params` (Adam's mu and nu, ...) is split as the
  params are; everything else (step counts, scalars) is replicated."""
  p_def = jax.tree.structure(params)
  p_shapes = [tuple(p.shape) for p in jax.tree.leaves(params)]
  s_leaves = jax.tree.leaves(shardings)

  def mirrors(x) -> bool:
    try:
      return jax.tree.structure(x) == p_def and [tuple(l.shape) for l in jax.tree.leaves(x)] == p_shapes
    except (AttributeError, TypeError):
      return False

  def one(x):
    if mirrors(x):
      return jax.tree.unflatten(p_def, s_leaves)
    return jax.tree.map(lambda _: replicated(mesh), x)

  return jax.tree.map(one, opt_state, is_leaf=mirrors)
