"""Device mesh and shardings. The 1-D mesh axis 'data' serves the Gaussian, GMM and VAE families: independent
chains (Gaussian, GMM) are split over it, or the VAE's batch is. The LM uses a 2-D ('data', 'fsdp') mesh: the
batch is split over both axes, parameters and optimizer state over 'fsdp' by logical-axis rules (ZeRO-3 style:
XLA gathers each weight where it is used and reduce-scatters its gradient)."""
import math

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

AXIS = "data"


def make_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
  devices = jax.devices()
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


# --- 2-D mesh for the LM: batch over ('data', 'fsdp'), parameters and optimizer state split over 'fsdp' ---------
FSDP = "fsdp"
BATCH = (AXIS, FSDP)

# maxtext-style rules: (logical name, mesh axis), tried in order for each dimension. A name may have several
# entries; a mesh axis is used at most once per array, and only where it divides the dimension, so "embed" takes
# 'fsdp' in a [embed, mlp] kernel while an [mlp] bias, having no "embed", gets it through "mlp".
LOGICAL_RULES = (
    ("batch", AXIS), ("batch", FSDP),
    ("embed", FSDP), ("mlp", FSDP), ("heads", FSDP), ("vocab", FSDP), ("position", FSDP), ("proj", FSDP),
    ("kv", None),
)


def make_mesh_2d(data: int, fsdp: int, devices=None) -> jax.sharding.Mesh:
  devices = jax.devices() if devices is None else list(devices)
  if data < 1 or fsdp < 1 or data * fsdp > len(devices):
    raise ValueError(f"mesh data={data} x fsdp={fsdp} needs {data * fsdp} devices, {len(devices)} are visible")
  return jax.make_mesh((data, fsdp), (AXIS, FSDP), axis_types=(AxisType.Auto,) * 2,
                       devices=devices[:data * fsdp])


def _axis_size(mesh, name: str) -> int:
  return dict(mesh.shape).get(name, 1)


def batch_axes(mesh) -> tuple[str, ...]:
  """The mesh axes the batch is split over: ('data', 'fsdp') on the 2-D mesh, ('data',) on the 1-D one."""
  return tuple(a for a in BATCH if a in mesh.axis_names)


def batch_shards(mesh) -> int:
  return math.prod(_axis_size(mesh, a) for a in batch_axes(mesh))


def batch_sharding(mesh) -> NamedSharding:
  """Axis 0 split over every batch axis of the mesh, the rest replicated."""
  return NamedSharding(mesh, P(batch_axes(mesh)))


def logical_spec(names, shape, mesh, rules=LOGICAL_RULES) -> P:
  """PartitionSpec for one array from its logical dimension names; a dimension no rule can split evenly (e.g. an
  odd vocabulary) stays replicated instead of failing."""
  if len(names) != len(shape):
    raise ValueError(f"logical axes {names} do not match shape {shape}")
  used, spec = set(), []
  for name, dim in zip(names, shape):
    pick = None
    for logical, axis in rules:
      if logical != name or axis is None or axis in used or axis not in mesh.axis_names:
        continue
      if dim % _axis_size(mesh, axis) == 0:
        pick = axis
        break
    if pick is not None:
      used.add(pick)
    spec.append(pick)
  return P(*spec)


def _is_names(x) -> bool:
  return isinstance(x, tuple) and all(n is None or isinstance(n, str) for n in x)


def param_shardings(params, axes, mesh, rules=LOGICAL_RULES):
  """NamedSharding per leaf of `params` (arrays or ShapeDtypeStructs) from the same-structure `axes` tree."""
  return jax.tree.map(lambda names, p: NamedSharding(mesh, logical_spec(names, p.shape, mesh, rules)),
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
