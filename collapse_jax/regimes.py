"""How each generation's training set is built from the real data and the synthetic data so far.

The paper's recursion replaces the data each generation; the other regimes keep some or all of the real data
(real_fraction), or all generations' data (accumulate, known to prevent collapse), or a fixed-size sample of it
(accumulate_subsample). Everything here is traced inside the compiled generation loop, so buffers have static
capacities and a valid count; a training set is a buffer x_NxS with weights w_N in {0, 1}.

Per-chain data state (only the buffers a regime needs are kept):
  real  x_RxS   generation 0's training set, kept for real_fraction and as accumulation's first entries
  last  x_MxS   the previous generation's samples (replace, real_fraction), `last_n` of them valid
  pool  x_PxS   everything so far (accumulate*), `pool_n` valid
"""
import dataclasses

import jax
import jax.numpy as jnp

from collapse_jax import ops


@dataclasses.dataclass(frozen=True)
class Spec:
  """Static shape facts of one run's data, from the config (hashable: it sizes the compiled program)."""
  name: str
  n_real: int            # R
  m_max: int             # the largest per-generation sample count: capacity of `last` and of each sample draw
  pool_size: int         # P (accumulating regimes only)
  train_size: int        # N: capacity of the training buffer handed to `fit`
  real_fraction: float
  subsample: int
  # round(real_fraction * M_g) per generation, counted on the host: float32 on device rounds some products
  # differently (0.3 * 95 is 28.4999... in float64 but 28.500001 in float32), which broke the documented count.
  real_counts: tuple[int, ...] = ()


def make_spec(run, n_real: int, counts: list[int]) -> Spec:
  name = run.regime.name
  m_max = max(counts[1:], default=counts[0])
  subsample = run.regime.subsample or run.samples.n
  # The pool holds the real data and every generation's samples; one extra m_max block of slack keeps the
  # last write in bounds (dynamic_update_slice would otherwise clamp it back over valid entries).
  pool = n_real + sum(counts[1:]) + m_max if name.startswith("accumulate") else 0
  # A subsample larger than the whole pool takes all of it (top_k cannot draw more rows than the pool has).
  train = {"replace": max(n_real, m_max), "real_fraction": max(n_real, m_max), "accumulate": pool,
           "accumulate_subsample": min(subsample, pool)}[name]
  f = run.regime.real_fraction
  return Spec(name, n_real, m_max, pool, train, f, subsample, tuple(round(f * m) for m in counts))


def train_sizes(spec: Spec, counts: list[int]) -> list[int]:
  """How many valid rows each generation's training set has (host side, for metrics.jsonl); counts[0] is R."""
  if not spec.name.startswith("accumulate"):
    return list(counts)
  pool_n = [spec.n_real + sum(counts[1:g + 1]) for g in range(len(counts))]
  return pool_n if spec.name == "accumulate" else [min(spec.train_size, n) for n in pool_n]


def init(spec: Spec, real_RxS: jax.Array) -> dict:
  data = {"real": real_RxS}
  if spec.name in ("replace", "real_fraction"):
    data["last"] = jnp.zeros((spec.m_max,) + real_RxS.shape[1:], real_RxS.dtype)
    data["last_n"] = jnp.zeros((), jnp.int32)
  else:
    pool = jnp.zeros((spec.pool_size,) + real_RxS.shape[1:], real_RxS.dtype)
    data["pool"] = jax.lax.dynamic_update_slice_in_dim(pool, real_RxS, 0, axis=0)
    data["pool_n"] = jnp.asarray(spec.n_real, jnp.int32)
  return data


def _pad_rows(x, n: int):
  if x.shape[0] >= n:
    return x[:n]
  return jnp.concatenate([x, jnp.zeros((n - x.shape[0],) + x.shape[1:], x.dtype)])


def _rows(n_valid, n: int):
  return (jnp.arange(n) < n_valid).astype(jnp.float32)


def training_set(spec: Spec, data: dict, g, key, n_g) -> tuple[jax.Array, jax.Array]:
  """(x_NxS, w_N): generation g's training data. n_g is M_g, the size of a synthetic training set."""
  N = spec.train_size
  if spec.name in ("replace", "real_fraction"):
    real, real_w = _pad_rows(data["real"], N), _rows(spec.n_real, N)
    if spec.name == "replace":
      syn, syn_w = _pad_rows(data["last"], N), _rows(data["last_n"], N)
    else:
      # A fresh random subset of the real data each generation (the paper's 10% "preserved" data), then
      # the previous generation's samples up to the training-set size.
      k = jnp.asarray(spec.real_counts, jnp.int32)[g]
      j = jnp.arange(N)
      perm_R = jax.random.permutation(key, spec.n_real)
      from_real = data["real"][perm_R[jnp.minimum(j, spec.n_real - 1)]]
      from_last = data["last"][jnp.clip(j - k, 0, spec.m_max - 1)]
      pick_real = (j < k).reshape((N,) + (1,) * (from_real.ndim - 1))
      syn, syn_w = jnp.where(pick_real, from_real, from_last), _rows(n_g, N)
    first = g == 0
    return jnp.where(first, real, syn), jnp.where(first, real_w, syn_w)
  if spec.name == "accumulate":
    return data["pool"], _rows(data["pool_n"], spec.pool_size)
  # accumulate_subsample: a uniform sample without replacement of the pool's valid entries.
  idx = ops.valid_first(key, jnp.arange(spec.pool_size) < data["pool_n"], N)
  return data["pool"][idx], _rows(jnp.minimum(N, data["pool_n"]), N)


def update(spec: Spec, data: dict, samples_MxS, n_next) -> dict:
  """Add generation g's samples (the first n_next of `samples_MxS` are used) for generation g+1."""
  data = dict(data)
  if "last" in data:
    data["last"], data["last_n"] = samples_MxS, jnp.asarray(n_next, jnp.int32)
  else:
    data["pool"] = jax.lax.dynamic_update_slice_in_dim(data["pool"], samples_MxS, data["pool_n"], axis=0)
    data["pool_n"] = data["pool_n"] + n_next
  return data
