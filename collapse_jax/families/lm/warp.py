"""Hugging Face's logits processors for decode.py, in HF's order: the repetition penalty, EOS banned before
min_new_tokens, then (sampling) temperature, top-k and top-p, and the draw.

`kn` is decode.knobs(...): the values a compiled program takes as arguments (temperature, top_p,
repetition_penalty, min_new_tokens, eos: -1 for none), so changing them does not recompile; `cfg` is the static
DecodeConfig (whether top-k / top-p are on at all). Scores are float32 [rows, vocab].

HF details kept on purpose (tests/fixtures/decode_hf.json and the chi-square laws of tests/test_sampling.py):
- the repetition penalty sees the prompt's real tokens (not its left pads, as transformers 5.x) and the tokens
  generated so far; greedy/sampling penalise logits, beam search penalises log-softmax scores;
- min_new_tokens sets EOS to -inf; top-k keeps ties with the k-th; top-p drops the smallest-probability tokens
  whose mass is <= 1 - top_p, the top token always kept.
"""
import jax
import jax.numpy as jnp


def penalise(kn, scores_RxV, seen_RxV):
  """HF's repetition penalty on the tokens each row has seen (None: the penalty is off)."""
  if seen_RxV is None:
    return scores_RxV
  p = kn["repetition_penalty"]
  return jnp.where(seen_RxV, jnp.where(scores_RxV < 0, scores_RxV * p, scores_RxV / p), scores_RxV)


def ban_eos(kn, scores_RxV, step):
  eos_1xV = jnp.arange(scores_RxV.shape[-1]) == kn["eos"]  # eos -1 (none) matches nothing
  return jnp.where(eos_1xV & (step < kn["min_new_tokens"]), -jnp.inf, scores_RxV)


def nucleus_floor(kn, asc_RxV):
  """The smallest score top-p keeps, from the scores sorted ascending."""
  cum_RxV = jnp.cumsum(jax.nn.softmax(asc_RxV, axis=-1), axis=-1)
  # cum is non-decreasing, so the dropped tokens are a prefix of the ascending order; the top one never is.
  dropped_Rx1 = jnp.minimum((cum_RxV <= 1.0 - kn["top_p"]).sum(-1, keepdims=True), asc_RxV.shape[-1] - 1)
  return jnp.take_along_axis(asc_RxV, dropped_Rx1, axis=-1)


def warp(cfg, kn, scores_RxV):
  """Temperature and top-p over the whole vocabulary, as HF's warpers, for sampling without top-k (with top-k on,
  `draw` warps the k best only)."""
  scores_RxV = scores_RxV / kn["temperature"]
  if cfg.top_p < 1.0:
    scores_RxV = jnp.where(scores_RxV < nucleus_floor(kn, jnp.sort(scores_RxV, axis=-1)), -jnp.inf, scores_RxV)
  return scores_RxV


def draw(cfg, kn, keys_B, scores_BxV):
  """One sampled token per row. With top-k on, only the k best scores are warped and drawn from: the same law as
  warping all V (every other token has probability 0; of tokens tied with the k-th, exactly k are kept). top_k
  returns them sorted (descending), so top-p needs no sort, and the draw inverts the kept tokens' cumulative
  weights at one uniform per row: the same law as the Gumbel draw of jax.random.categorical, which hashes k
  random numbers per row (on CPU, with the sort, most of a sampling step)."""
  if 0 < cfg.top_k < scores_BxV.shape[-1]:
    top_BxK, idx_BxK = jax.lax.top_k(scores_BxV, cfg.top_k)
    z_BxK = top_BxK / kn["temperature"]
    keep_BxK = jnp.ones(z_BxK.shape, bool)
    if cfg.top_p < 1.0:
      keep_BxK = z_BxK >= nucleus_floor(kn, z_BxK[:, ::-1])
    w_BxK = jnp.where(keep_BxK, jnp.exp(z_BxK - z_BxK[:, :1]), 0.0)  # the top token has weight 1
    cum_BxK = jnp.cumsum(w_BxK, axis=-1)
    u_Bx1 = jax.vmap(jax.random.uniform)(keys_B)[:, None] * cum_BxK[:, -1:]
    # The first token whose cumulative weight exceeds u; min: u rounded up to the total picks the last kept one.
    j_Bx1 = jnp.minimum((cum_BxK <= u_Bx1).sum(-1, keepdims=True), keep_BxK.sum(-1, keepdims=True) - 1)
    return jnp.take_along_axis(idx_BxK, j_Bx1, axis=-1)[:, 0]
  return jax.vmap(jax.random.categorical)(keys_B, warp(cfg, kn, scores_BxV))


def seen_tokens(ids_BxL, mask_BxL, vocab: int):
  """Tokens each row has seen (its real prompt tokens), for the repetition penalty."""
  b = ids_BxL.shape[0]
  where_BxL = jnp.where(mask_BxL > 0, ids_BxL, vocab)  # pads go to an extra column that is dropped
  return jnp.zeros((b, vocab + 1), bool).at[jnp.arange(b)[:, None], where_BxL].set(True)[:, :vocab]


def mark(seen_RxV, tok_R):
  """seen_RxV with each row's new token added (None: the penalty is off)."""
  return None if seen_RxV is None else seen_RxV.at[jnp.arange(tok_R.shape[0]), tok_R].set(True)
