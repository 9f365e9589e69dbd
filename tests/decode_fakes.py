"""Fake LMs of known distribution for the decoding tests (tests/test_decode.py, test_beam.py, test_sampling.py):
decode.py takes any `decode.LM`, so these stand in for OPT where a test needs to know the law exactly."""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from collapse_jax.families.lm import decode


@functools.lru_cache(maxsize=None)
def const_lm(vocab):
  """Logits params["logits"] at every step, whatever the input: each draw is independent with a known law."""
  def apply(params, ids_BxL, mask_BxL, cache):
    return jnp.broadcast_to(params["logits"], (*ids_BxL.shape, vocab)), cache

  return decode.LM(apply=apply, init_cache=lambda b, n: {"steps": jnp.zeros((), jnp.int32)}, vocab_size=vocab,
                   max_len=1 << 20, eos_token_id=None, pad_token_id=0)


def markov_w(vocab, max_len, seed=0, scale=1.5):
  return scale * np.random.default_rng(seed).standard_normal((max_len, vocab, vocab, vocab)).astype(np.float32)


@functools.lru_cache(maxsize=None)
def markov_lm(vocab, max_len, eos=None):
  """Logits w[position, last token, previous token] (position of the last real token; the first token's
  previous is 0): history-dependent, so beam search differs from greedy. Its cache is three per-row arrays."""
  def apply(params, ids_BxL, mask_BxL, cache):
    def one(c, x):
      tok_B, real_B = x[0], x[1] > 0
      last_B = jnp.where(real_B, tok_B, c["last"])
      prev_B = jnp.where(real_B, c["last"], c["prev"])
      n_B = c["n"] + real_B
      return {"last": last_B, "prev": prev_B, "n": n_B}, params["w"][jnp.maximum(n_B - 1, 0), last_B, prev_B]

    cache, logits_LxBxV = jax.lax.scan(one, cache, (ids_BxL.T, mask_BxL.T))
    return logits_LxBxV.transpose(1, 0, 2), cache

  def init_cache(b, n):
    return {k: jnp.zeros((b,), jnp.int32) for k in ("last", "prev", "n")}

  return decode.LM(apply=apply, init_cache=init_cache, vocab_size=vocab, max_len=max_len, eos_token_id=eos,
                   pad_token_id=vocab - 1)
