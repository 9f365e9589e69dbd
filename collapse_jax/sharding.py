"""Device mesh and shardings. One 1-D mesh axis, 'data', serves both uses in this project: independent chains
(Gaussian, GMM) are split over it, and for single-chain families (VAE, LM) the batch is."""
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
