"""Shared JAX idioms of the families, each in one place: rows in fixed-size chunks, valid rows first, and the
ragged epoch. Pure jnp, traced inside the compiled generation.

Chunks: a set of n rows is cut into C chunks of E rows (the last padded), so a program's memory is set by E, not
n; E is a whole multiple of the batch shards (each chunk splits evenly over the mesh) and never pads a small set
far past its size (`chunk_size`). Padded rows are the caller's to neutralise (a mask of 0, or dropped after).

Valid rows first: buffers have a static capacity N and a traced count of valid rows (w_N > 0). Two orders exist,
on purpose, because each family's numbers depend on its own:
- `valid_first` (the regimes' subsample, the LM's prompts, the VAE's epochs): uniform keys, invalid rows keyed 2.0,
  the k smallest by lax.top_k. Its first n_valid entries are a uniform permutation of the valid rows.
- `permutation_valid_first` (the LM's epochs): jax.random.permutation's own algorithm (rounds of sorts by random
  32-bit keys) with the invalid flag as the leading key, so a full buffer's order is exactly
  jax.random.permutation(key, N): what a host-side trainer or a PyTorch port shuffling by that permutation sees.
  Replacing either by the other changes every result of its family (they draw different bits).

Ragged epoch (`ragged_scan`): a scan over the static ceil(N / B) steps of which only ceil(n_valid / B) run; the
others are skipped whole by lax.cond, so parameters, optimizer moments and step counts are those of training on
the valid rows alone.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np


def chunk_size(n: int, max_rows: int, shards: int = 1) -> int:
  """Rows per chunk of a set of n: max_rows (a multiple of `shards`), but never padding a small set far past its
  size, and a whole multiple of the shards."""
  return min(max_rows, -(-n // shards) * shards)


def to_chunks(a, chunk: int, fill=0):
  """a[N, ...] -> [C, chunk, ...], the last chunk padded with `fill`."""
  n = a.shape[0]
  c = -(-n // chunk)
  a = jnp.pad(a, ((0, c * chunk - n),) + ((0, 0),) * (a.ndim - 1), constant_values=fill)
  return a.reshape((c, chunk) + a.shape[1:])


def from_chunks(tree, n: int):
  """Inverse of to_chunks on outputs: [C, chunk, ...] -> [n, ...], the padding dropped."""
  return jax.tree.map(lambda o: o.reshape((o.shape[0] * o.shape[1],) + o.shape[2:])[:n], tree)


def chunked_map(fn, xs: tuple, chunk: int, constrain=None):
  """fn(*row_chunks) -> per-row outputs, over chunks of `chunk` rows of the arrays `xs` (sharing their leading
  size n) with lax.map; padding rows are zeros, their outputs dropped. `constrain` (e.g. a batch sharding
  constraint) is applied to each chunk's inputs. Randomness must be drawn for the n rows before chunking, so results
  do not depend on the chunk size or the mesh."""
  n = xs[0].shape[0]
  constrain = constrain or (lambda a: a)
  out = jax.lax.map(lambda cs: fn(*map(constrain, cs)), tuple(to_chunks(a, chunk) for a in xs))
  return from_chunks(out, n)


def valid_first(key, valid_N, k: int | None = None):
  """Indices of k rows (default: all N), the valid rows first in uniformly random order, then the invalid ones in
  index order: the k smallest of uniform keys with invalid rows keyed 2.0 (lax.top_k on their negation)."""
  n = valid_N.shape[0]
  u_N = jnp.where(valid_N, jax.random.uniform(key, (n,)), 2.0)
  return jax.lax.top_k(-u_N, n if k is None else k)[1]


def permutation_valid_first(key, valid_N):
  """Row indices, valid rows first in random order, then the invalid ones: jax.random.permutation's rounds of
  sorts by random 32-bit keys (the same bits, the same rounds), with the invalid flag as the leading sort key.
  Valid rows that form a prefix are visited as permutation(key, n_valid) would visit them while N and n_valid need
  the same number of sort rounds (both under 1,626 rows, or both under 2.6M); a full buffer's order is
  permutation(key, N) itself."""
  n = valid_N.shape[0]
  rounds = math.ceil(3 * math.log(max(1, n)) / math.log(np.iinfo(np.uint32).max))
  last_N, idx_N = (~valid_N).astype(jnp.uint32), jnp.arange(n, dtype=jnp.int32)
  for _ in range(rounds):
    key, sub = jax.random.split(key)
    last_N, _, idx_N = jax.lax.sort((last_N, jax.random.bits(sub, (n,), jnp.uint32), idx_N), num_keys=2)
  return idx_N


def ragged_scan(step, carry, num_steps: int, steps=None):
  """lax.scan of step(carry, s) -> (carry, out) over s < num_steps (static), running only s < steps (a traced
  count; None: all): the others return the carry unchanged and zeros of step's output."""
  if steps is None:
    return jax.lax.scan(step, carry, jnp.arange(num_steps))
  out_shape = jax.eval_shape(step, carry, jnp.zeros((), jnp.int32))[1]

  def skip(carry, s):
    return carry, jax.tree.map(lambda o: jnp.zeros(o.shape, o.dtype), out_shape)

  return jax.lax.scan(lambda c, s: jax.lax.cond(s < steps, step, skip, c, s), carry, jnp.arange(num_steps))
