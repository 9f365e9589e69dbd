"""Corpus statistics of token blocks, computed on device inside the LM's compiled generation: distinct-n and
repeated-n-gram rates, and quantiles over the valid entries of a padded vector."""
import jax.numpy as jnp


def ngram_rates(tokens_NxL, n: int):
  """(distinct-n over the corpus, rep-n within blocks): exact, by lexicographic sorts (no hashing)."""
  N, L = tokens_NxL.shape
  T = L - n + 1
  grams_XxN = jnp.stack([tokens_NxL[:, i:i + T] for i in range(n)], axis=-1).reshape(N * T, n)
  block_X = jnp.repeat(jnp.arange(N), T)

  def distinct(cols):  # rows that differ from their predecessor in sorted order, plus the first
    s = jnp.stack(cols, axis=-1)[jnp.lexsort(cols[::-1])]
    return 1 + jnp.sum(jnp.any(s[1:] != s[:-1], axis=-1))

  cols = [grams_XxN[:, j] for j in range(n)]
  total = N * T
  return distinct(cols) / total, (total - distinct([block_X] + cols)) / total


def masked_quantiles(v_N, valid_N, qs):
  """Linear-interpolation quantiles (numpy's default) of the valid entries."""
  n = jnp.maximum(jnp.sum(valid_N), 1)
  s = jnp.sort(jnp.where(valid_N, v_N, jnp.inf))
  pos = jnp.asarray(qs, jnp.float32) * (n - 1)
  lo = jnp.floor(pos).astype(jnp.int32)
  hi = jnp.minimum(lo + 1, n - 1)
  return s[lo] + (pos - lo) * (s[hi] - s[lo])
