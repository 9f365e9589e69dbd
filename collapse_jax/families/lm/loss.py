"""The LM's loss: next-token cross-entropy (predict ids[1:] from ids[:-1], as HF's OPTForCausalLM with
labels=input_ids), summed over the real tokens of a batch (a token counts where it and its predecessor are
unmasked), with a hand-written backward pass: one pass over the [B, L, V] logits instead of autodiff's ~6."""
import jax
import jax.numpy as jnp


def token_nll(logits_BxLxV, ids_BxL, mask_BxL):
  """(summed next-token NLL, number of predicted tokens) of a batch."""
  w_BxT = (mask_BxL[:, 1:] * mask_BxL[:, :-1]).astype(jnp.float32)
  return _weighted_nll(logits_BxLxV, ids_BxL, w_BxT), jnp.sum(w_BxT)


@jax.custom_vjp
def _weighted_nll(logits_BxLxV, ids_BxL, w_BxT):
  return _weighted_nll_fwd(logits_BxLxV, ids_BxL, w_BxT)[0]


def _weighted_nll_fwd(logits_BxLxV, ids_BxL, w_BxT):
  # log_softmax's arithmetic at the picked token only: log(sum exp(x - max)) - (x_picked - max). Row statistics
  # of all L positions (the last one's are dropped): a [:, :-1] slice read by three consumers is a copy.
  x_BxLxV = logits_BxLxV.astype(jnp.float32)
  max_BxL = jnp.max(x_BxLxV, axis=-1)
  logsum_BxL = jnp.log(jnp.sum(jnp.exp(x_BxLxV - max_BxL[..., None]), axis=-1))
  next_BxL = jnp.pad(ids_BxL[:, 1:], ((0, 0), (0, 1)))
  picked_BxL = jnp.take_along_axis(x_BxLxV, next_BxL[..., None], axis=-1)[..., 0]
  nll_BxT = (logsum_BxL - (picked_BxL - max_BxL))[:, :-1]
  return jnp.sum(nll_BxT * w_BxT), (logits_BxLxV, ids_BxL, w_BxT, (max_BxL + logsum_BxL)[:, :-1])


def _weighted_nll_bwd(res, g):
  # d/dlogits = g * w * (softmax - onehot(next id)) as one pass over [B, L, V], written for all L positions (the
  # last one predicts nothing: zero), so no slice/pad copies of the logits and no one-hot scatter; autodiff of
  # the forward gives the same values in ~6 passes (measured: benchmarks/profiles/lm_train_profile.py).
  logits_BxLxV, ids_BxL, w_BxT, lse_BxT = res
  b, l, v = logits_BxLxV.shape
  pad = ((0, 0), (0, 1))
  scale_BxL = jnp.pad(g * w_BxT, pad)
  lse_BxL = jnp.pad(lse_BxT, pad)
  next_BxL = jnp.pad(ids_BxL[:, 1:], pad, constant_values=-1)
  x_BxLxV = logits_BxLxV.astype(jnp.float32)
  hit_BxLxV = jnp.arange(v, dtype=next_BxL.dtype) == next_BxL[..., None]
  d_BxLxV = (jnp.exp(x_BxLxV - lse_BxL[..., None]) - hit_BxLxV.astype(jnp.float32)) * scale_BxL[..., None]
  # where, not a product: the last position's (exp(x - 0)) could overflow, and inf * 0 is NaN.
  d_BxLxV = jnp.where((jnp.arange(l) < l - 1)[None, :, None], d_BxLxV, 0.0)
  return d_BxLxV.astype(logits_BxLxV.dtype), None, None


_weighted_nll.defvjp(_weighted_nll_fwd, _weighted_nll_bwd)
