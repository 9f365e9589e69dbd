"""Attention over a decoding KV cache, and the beam-search cache's bookkeeping (models/opt.py builds the caches).

The cache is head-major ([B, H, S, D]) so that both attention dots read it in place; beam search keeps each
prompt's K/V once ("prefix", read by all its beams) and never moves the beams' own K/V: reordering beams moves
which copy's slot each row reads ("src"), not keys and values.
"""
import jax
import jax.numpy as jnp


def attend(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, allowed_Bx1xLxS, layer_cache, index, prefix):
  """Writes the L new keys/values at slot `index` of the cache and attends over it. The cache is head-major
  ([B, H, S, D]) so that both attention dots read it in place: a [B, S, H, D] cache made XLA:CPU transpose all of
  it (a full copy per layer, K and V) at every decoding step."""
  if prefix is not None:
    return attend_with_prefix(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, allowed_Bx1xLxS, layer_cache, index, *prefix)
  dt = q_BxLxHxD.dtype
  new_cache = {n: jax.lax.dynamic_update_slice_in_dim(layer_cache[n], x.transpose(0, 2, 1, 3).astype(
      layer_cache[n].dtype), index, axis=2) for n, x in (("k", k_BxLxHxD), ("v", v_BxLxHxD))}
  # jax.nn.dot_product_attention's XLA path, spelled out for the head-major cache.
  logits_BxHxLxS = jnp.einsum("blhd,bhsd->bhls", q_BxLxHxD, new_cache["k"].astype(dt),
                              preferred_element_type=jnp.float32)
  probs = jax.nn.softmax(jnp.where(allowed_Bx1xLxS, logits_BxHxLxS, -1e30), axis=-1).astype(dt)
  return jnp.einsum("bhls,bhsd->blhd", probs, new_cache["v"].astype(dt)), new_cache


def attend_with_prefix(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, allowed_Bx1xLxS, layer_cache, index, src_BxS,
                        pk_GxHxPxD, pv_GxHxPxD, pvalid_GxP):
  """Beam search: attention over a shared prefix (G prompts' keys/values, each read by its C = B / G consecutive
  rows) and the rows' own slots, in one softmax. Nothing is copied or reordered: the own cache is
  [G, H, S * C, D] (slot-major: slot s of copy c at s * C + c, so a step's writes are one contiguous slice), slot
  s of copy c written once (at step s) by row c of the prompt, and row b reads slot s of copy src_BxS[b, s] (its
  ancestor there), so reordering beams moves src (ints) instead of K/V. Every row's query meets all C copies'
  keys (C times the dot products; the dot reads the cache once either way, as a gather would) and keeps its
  ancestor's logit per slot."""
  dt = q_BxLxHxD.dtype
  b, l, h, d = q_BxLxHxD.shape
  g, p = pvalid_GxP.shape
  c = b // g
  s = layer_cache["k"].shape[2] // c

  def heads_first(x_BxLxHxD):  # [G, H, L * C, D]: a prompt's rows by (token, copy), as the cache's slots
    return x_BxLxHxD.reshape(g, c, l, h, d).transpose(0, 3, 2, 1, 4).reshape(g, h, l * c, d)

  new_cache = {n: jax.lax.dynamic_update_slice_in_dim(layer_cache[n], heads_first(x).astype(layer_cache[n].dtype),
                                                      index * c, axis=2)
               for n, x in (("k", k_BxLxHxD), ("v", v_BxLxHxD))}
  q_GxHxQxD = heads_first(q_BxLxHxD)
  pre_GxHxQxP = jnp.einsum("ghqd,ghpd->ghqp", q_GxHxQxD, pk_GxHxPxD.astype(dt), preferred_element_type=jnp.float32)
  pre_GxHxQxP = jnp.where(pvalid_GxP[:, None, None, :], pre_GxHxQxP, -1e30)
  own_GxHxQxSxC = jnp.einsum("ghqd,ghsd->ghqs", q_GxHxQxD, new_cache["k"].astype(dt),
                             preferred_element_type=jnp.float32).reshape(g, h, l * c, s, c)
  # Each row's ancestor's logit per slot (the other copies' add exact zeros), then a softmax C times smaller.
  pick_Gx1xQxSxC = (src_BxS.reshape(g, 1, c, s, 1) == jnp.arange(c)).reshape(g, 1, 1, c, s, c)
  pick_Gx1xQxSxC = jnp.broadcast_to(pick_Gx1xQxSxC, (g, 1, l, c, s, c)).reshape(g, 1, l * c, s, c)
  own_GxHxQxS = jnp.where(pick_Gx1xQxSxC, own_GxHxQxSxC, 0.0).sum(-1)
  allowed_Gx1xQxS = allowed_Bx1xLxS.reshape(g, c, l, s).transpose(0, 2, 1, 3).reshape(g, 1, l * c, s)
  own_GxHxQxS = jnp.where(allowed_Gx1xQxS, own_GxHxQxS, -1e30)
  # One softmax over both blocks, as jax.nn.softmax: exp(x - max) / sum; masked entries give exp(-1e30) = 0.
  top_GxHxQx1 = jnp.maximum(pre_GxHxQxP.max(-1, keepdims=True), own_GxHxQxS.max(-1, keepdims=True))
  pre_GxHxQxP, own_GxHxQxS = jnp.exp(pre_GxHxQxP - top_GxHxQx1), jnp.exp(own_GxHxQxS - top_GxHxQx1)
  total_GxHxQx1 = pre_GxHxQxP.sum(-1, keepdims=True) + own_GxHxQxS.sum(-1, keepdims=True)
  own_GxHxQxSxC = jnp.where(pick_Gx1xQxSxC, (own_GxHxQxS / total_GxHxQx1)[..., None], 0.0)
  o_GxHxQxD = (jnp.einsum("ghqp,ghpd->ghqd", (pre_GxHxQxP / total_GxHxQx1).astype(dt), pv_GxHxPxD.astype(dt))
               + jnp.einsum("ghqs,ghsd->ghqd", own_GxHxQxSxC.reshape(g, h, l * c, s * c).astype(dt),
                            new_cache["v"].astype(dt)))
  return o_GxHxQxD.reshape(g, h, l, c, d).transpose(0, 3, 2, 1, 4).reshape(b, l, h, d), new_cache


def grow_cache(cache: dict, max_len: int) -> dict:
  """An init_cache cache with max_len slots, its slots first, the new ones empty (masked): a prefill into the
  prompt's slots only, then one copy, spares the prefill's attention the empty slots."""
  def pad(x, axis):
    return jnp.pad(x, [(0, max_len - x.shape[axis]) if i == axis else (0, 0) for i in range(x.ndim)])

  return dict(cache, layers=[{n: pad(x, 2) for n, x in lc.items()} for lc in cache["layers"]],
              mask=pad(cache["mask"], 1))


def reorder_copies(cache: dict, rows_R) -> dict:
  """A share_prefix cache after beam search picks rows_R (each a row of the same prompt): only the per-row
  bookkeeping moves (mask, positions, which copy's slots each row reads), never K/V."""
  return dict(cache, **{n: cache[n][rows_R] for n in ("mask", "pos", "src")})
