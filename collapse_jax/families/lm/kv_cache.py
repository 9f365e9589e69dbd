"""The decoding KV cache of every layer (lm/model.py builds it), attention over it, and beam search's bookkeeping.

K/V are stacked over layers and head-major ([layers, B, H, S, D]) so that both attention dots read a layer in place
and the layer loop (a scan) carries the whole cache, each layer writing only its new tokens' slots. Beam search
keeps each prompt's K/V once ("prefix", read by all its beams) and never moves the beams' own K/V: reordering
beams moves which copy's slot each row reads (`src`), not keys and values. Heads are split over the 'tensor' mesh
axis, rows over the batch axes (sharding.constrain at creation).
"""
import dataclasses

import jax
import jax.numpy as jnp

from collapse_jax import sharding

KV_AXES = ("layers", "batch", "heads", None, "kv")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Cache:
  k: jax.Array                   # [layers, B, H, S, D]; with a prefix [layers, G, H, S * C, D] (slot-major copies)
  v: jax.Array
  mask: jax.Array                # [B, S] slots written so far with a real token
  index: jax.Array               # () the next slot
  pos: jax.Array                 # [B] real tokens seen per row (the next position)
  prefix_k: jax.Array | None = None   # [layers, G, H, P, D]: G prompts' K/V, read by their C = B / G rows
  prefix_v: jax.Array | None = None
  prefix_mask: jax.Array | None = None  # [G, P]
  src: jax.Array | None = None   # [B, S]: which copy's slot s row b reads (its ancestor at step s)

  def begin(self, mask_BxL) -> "Cache":
    """Marks this call's L slots (from `index`) and, with a prefix, that each row's new slots are its own."""
    mask = jax.lax.dynamic_update_slice_in_dim(self.mask, mask_BxL > 0, self.index, axis=1)
    if self.src is None:
      return dataclasses.replace(self, mask=mask)
    b, l = mask_BxL.shape
    copy_BxL = jnp.broadcast_to((jnp.arange(b) % (b // self.prefix_mask.shape[0]))[:, None], (b, l))
    src = jax.lax.dynamic_update_slice_in_dim(self.src, copy_BxL.astype(jnp.int32), self.index, axis=1)
    return dataclasses.replace(self, mask=mask, src=src)

  def end(self, l: int, mask_BxL) -> "Cache":
    return dataclasses.replace(self, index=self.index + l, pos=self.pos + mask_BxL.sum(axis=1).astype(jnp.int32))

  def at_layer(self, i) -> "_Layer":
    return _Layer(self, i)


@dataclasses.dataclass(frozen=True)
class _Layer:
  """Layer i's view of a Cache: attend writes the new K/V into the stacked arrays and returns the whole Cache."""
  cache: Cache
  i: jax.Array | int

  def _write(self, x, new):
    """The new tokens' slots of layer i (with a prefix: `index` counts steps, each C slots wide)."""
    copies = 1 if self.cache.src is None else self.cache.src.shape[0] // self.cache.prefix_mask.shape[0]
    start = (self.i, 0, 0, self.cache.index * copies, 0)
    return jax.lax.dynamic_update_slice(x, new[None].astype(x.dtype), start)

  def attend(self, q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, allowed_Bx1xLxS):
    if self.cache.src is not None:
      return self._attend_with_prefix(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, allowed_Bx1xLxS)
    dt = q_BxLxHxD.dtype
    k_all = self._write(self.cache.k, k_BxLxHxD.transpose(0, 2, 1, 3))
    v_all = self._write(self.cache.v, v_BxLxHxD.transpose(0, 2, 1, 3))
    k_BxHxSxD, v_BxHxSxD = k_all[self.i], v_all[self.i]
    # jax.nn.dot_product_attention's XLA path, spelled out for the head-major cache.
    logits_BxHxLxS = jnp.einsum("blhd,bhsd->bhls", q_BxLxHxD, k_BxHxSxD.astype(dt), preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(jnp.where(allowed_Bx1xLxS, logits_BxHxLxS, -1e30), axis=-1).astype(dt)
    o_BxLxHxD = jnp.einsum("bhls,bhsd->blhd", probs, v_BxHxSxD.astype(dt))
    return o_BxLxHxD, dataclasses.replace(self.cache, k=k_all, v=v_all)

  def _attend_with_prefix(self, q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, allowed_Bx1xLxS):
    """Beam search: attention over a shared prefix (G prompts' keys/values, each read by its C = B / G consecutive
    rows) and the rows' own slots, in one softmax. Nothing is copied or reordered: the own cache is
    [G, H, S * C, D] per layer (slot-major: slot s of copy c at s * C + c, so a step's writes are one contiguous
    slice), slot s of copy c written once (at step s) by row c of the prompt, and row b reads slot s of copy
    src[b, s] (its ancestor there), so reordering beams moves src (ints) instead of K/V. Every row's query meets
    all C copies' keys (C times the dot products; the dot reads the cache once either way, as a gather would) and
    keeps its ancestor's logit per slot."""
    cache, i = self.cache, self.i
    dt = q_BxLxHxD.dtype
    b, l, h, d = q_BxLxHxD.shape
    g, p = cache.prefix_mask.shape
    c = b // g
    s = cache.k.shape[3] // c

    def heads_first(x_BxLxHxD):  # [G, H, L * C, D]: a prompt's rows by (token, copy), as the cache's slots
      return x_BxLxHxD.reshape(g, c, l, h, d).transpose(0, 3, 2, 1, 4).reshape(g, h, l * c, d)

    k_all, v_all = self._write(cache.k, heads_first(k_BxLxHxD)), self._write(cache.v, heads_first(v_BxLxHxD))
    k_GxHxSCxD, v_GxHxSCxD = k_all[i], v_all[i]
    pk_GxHxPxD, pv_GxHxPxD = cache.prefix_k[i], cache.prefix_v[i]
    q_GxHxQxD = heads_first(q_BxLxHxD)
    pre_GxHxQxP = jnp.einsum("ghqd,ghpd->ghqp", q_GxHxQxD, pk_GxHxPxD.astype(dt), preferred_element_type=jnp.float32)
    pre_GxHxQxP = jnp.where(cache.prefix_mask[:, None, None, :], pre_GxHxQxP, -1e30)
    own_GxHxQxSxC = jnp.einsum("ghqd,ghsd->ghqs", q_GxHxQxD, k_GxHxSCxD.astype(dt),
                               preferred_element_type=jnp.float32).reshape(g, h, l * c, s, c)
    # Each row's ancestor's logit per slot (the other copies' add exact zeros), then a softmax C times smaller.
    pick_Gx1xQxSxC = (cache.src.reshape(g, 1, c, s, 1) == jnp.arange(c)).reshape(g, 1, 1, c, s, c)
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
                              v_GxHxSCxD.astype(dt)))
    o_BxLxHxD = o_GxHxQxD.reshape(g, h, l, c, d).transpose(0, 3, 2, 1, 4).reshape(b, l, h, d)
    return o_BxLxHxD, dataclasses.replace(cache, k=k_all, v=v_all)


def empty(layers: int, batch: int, heads: int, slots: int, head_dim: int, dtype) -> Cache:
  """A cache of `slots` empty slots per row, K/V split over heads and rows."""
  kv = lambda: sharding.constrain(jnp.zeros((layers, batch, heads, slots, head_dim), dtype), KV_AXES)  # noqa: E731
  return Cache(k=kv(), v=kv(), mask=jnp.zeros((batch, slots), bool), index=jnp.zeros((), jnp.int32),
               pos=jnp.zeros((batch,), jnp.int32))


def share_prefix(cache: Cache, copies: int, max_len: int) -> Cache:
  """A cache for `copies` continuations of each prompt in a prefilled `cache` (beam search: rows b * copies + j):
  the prompts' K/V stay once per prompt as the prefix, read in place by all their copies, and every copy gets
  max_len fresh slots of its own ([layers, prompts, heads, max_len * copies, head_dim], slot-major), which
  `reorder_copies` never moves: `src` says which copy's slot each row reads."""
  n, g, h, _, d = cache.k.shape
  fresh = empty(n, g, h, max_len * copies, d, cache.k.dtype)
  return dataclasses.replace(fresh, mask=jnp.zeros((g * copies, max_len), bool), pos=jnp.repeat(cache.pos, copies),
                             prefix_k=cache.k, prefix_v=cache.v, prefix_mask=cache.mask,
                             src=jnp.zeros((g * copies, max_len), jnp.int32))


def grow_cache(cache: Cache, max_len: int) -> Cache:
  """The cache with max_len slots, its slots first, the new ones empty (masked): a prefill into the prompt's slots
  only, then one copy, spares the prefill's attention the empty slots."""
  def pad(x, axis):
    return jnp.pad(x, [(0, max_len - x.shape[axis]) if i == axis else (0, 0) for i in range(x.ndim)])

  return dataclasses.replace(cache, k=sharding.constrain(pad(cache.k, 3), KV_AXES),
                             v=sharding.constrain(pad(cache.v, 3), KV_AXES), mask=pad(cache.mask, 1))


def reorder_copies(cache: Cache, rows_R) -> Cache:
  """A share_prefix cache after beam search picks rows_R (each a row of the same prompt): only the per-row
  bookkeeping moves (mask, positions, which copy's slots each row reads), never K/V."""
  return dataclasses.replace(cache, mask=cache.mask[rows_R], pos=cache.pos[rows_R], src=cache.src[rows_R])
