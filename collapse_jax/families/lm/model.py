"""OPT (Zhang et al. 2022) as Flax NNX, computing exactly what Hugging Face's `OPTForCausalLM` computes.

Used functionally like the VAE: `init_params` gives a pure dict of float32 parameters and `apply` merges it
with a cached graphdef inside whatever jitted code calls it. Parameter layout (pure dict keys, shapes):

  embed_tokens            [vocab, proj]          tied: also the LM head (logits = h @ embed_tokens.T)
  embed_positions         [max_pos + 2, embed]   OPT's learned positions with their offset of 2
  project_in / project_out [proj, embed] / [embed, proj]   only when word_embed_proj_dim != hidden (opt-350m)
  layers/self_attn/{q,k,v}_proj/{kernel [L, embed, heads, kv], bias [L, heads, kv]}
  layers/self_attn/out_proj/{kernel [L, heads, kv, embed], bias [L, embed]}
  layers/{self_attn_layer_norm, final_layer_norm}/{scale, bias} [L, embed], fc1, fc2/{kernel [L, in, out], bias}
  final_layer_norm        pre-LN models only (HF has none when do_layer_norm_before is False)

Every layer's parameters are stacked on a leading axis of num_layers: the layers run as one lax.scan (compile time
does not grow with depth) or, with scan_layers=False, a loop over the slices; `remat` rematerialises each layer's
activations in the backward pass (jax.checkpoint: none, dots saved, nothing saved). Heads are their own axis so
sharding rules can name them (`logical_axes`): under tensor parallelism heads, the MLP's hidden units and the
vocabulary split over 'tensor' (Megatron's layout) and the activations are constrained to match
(sharding.constrain: a no-op outside a mesh). hf.py reshapes HF's [out, in] per layer and stacks the layers.

Positions come from the attention mask as HF does: cumsum(mask) * mask - 1, so a left-padded row gives its real
tokens the positions 0, 1, ... of the unpadded row, and pads get -1 (table row 1, as in HF; their outputs are
never used). Pad queries attend to themselves only, which keeps their rows finite (a fully masked row could
give NaN in a fused kernel, and 0 * NaN in the next layer's value sum would reach real tokens).

Dropout (training only, `deterministic=False`): on the attention output and the MLP output before each
residual add, as HF; HF's OPT has no embedding dropout, so neither does this. Attention-probability dropout
(`attention_dropout`, 0 in every OPT) takes a plain softmax path since jax.nn.dot_product_attention has none.

Mixed precision: parameters float32, matmuls and the residual stream in `cfg.dtype`, LayerNorm statistics and
softmax in float32 (dot_product_attention's XLA path upcasts its logits), logits accumulated in float32.
"""
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from collapse_jax import sharding
from collapse_jax.errors import ConfigError
from collapse_jax.families.lm import kv_cache
from collapse_jax.families.lm.dense import lm_head, project
from collapse_jax.families.lm.sizes import DTYPES, OPTConfig, validate

POS_OFFSET = 2  # OPT's position table starts 2 rows in (a fairseq padding_idx legacy)
INIT_STD = 0.02
LN_EPS = 1e-5


def _normal(key, shape):
  return INIT_STD * jax.random.normal(key, shape, jnp.float32)


class _Proj(nnx.Module):
  """A kernel (any rank, contracted by einsum at the call site) and its bias, HF's nn.Linear init; `lead` stacks
  one per layer."""

  def __init__(self, kernel_shape, bias_shape, rngs: nnx.Rngs, lead=()):
    self.kernel = nnx.Param(_normal(rngs.params(), (*lead, *kernel_shape)))
    self.bias = nnx.Param(jnp.zeros((*lead, *bias_shape), jnp.float32))


class _Norm(nnx.Module):
  def __init__(self, n: int, lead=()):
    self.scale = nnx.Param(jnp.ones((*lead, n), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((*lead, n), jnp.float32))

  def __call__(self, x):
    # Statistics in float32 whatever the compute dtype: bf16 variance of a 768-wide row loses most of its bits.
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + LN_EPS) * self.scale[...] + self.bias[...]
    return y.astype(x.dtype)


def _dropout(x, rate, key):
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class _Attention(nnx.Module):
  def __init__(self, cfg: OPTConfig, rngs: nnx.Rngs, lead=()):
    e, h, d = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    self.q_proj = _Proj((e, h, d), (h, d), rngs, lead)
    self.k_proj = _Proj((e, h, d), (h, d), rngs, lead)
    self.v_proj = _Proj((e, h, d), (h, d), rngs, lead)
    self.out_proj = _Proj((h, d, e), (e,), rngs, lead)
    self.scaling = d**-0.5
    self.attention_dropout = cfg.attention_dropout

  def __call__(self, x_BxLxE, allowed_Bx1xLxS, cache, drop_key):
    dt = x_BxLxE.dtype

    def proj(p):  # heads split over 'tensor' (Megatron's column-parallel q/k/v)
      y = project(x_BxLxE, p.kernel[...].astype(dt), p.bias[...].astype(dt), 1)
      return sharding.constrain(y, ("batch", None, "heads", "kv"))

    # HF scales q (bias included) before the dot product, then attends with scale 1.
    q_BxLxHxD = proj(self.q_proj) * jnp.asarray(self.scaling, dt)
    k_BxLxHxD, v_BxLxHxD = proj(self.k_proj), proj(self.v_proj)
    if cache is not None:
      o_BxLxHxD, cache = cache.attend(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, allowed_Bx1xLxS)
    elif drop_key is not None and self.attention_dropout > 0.0:
      logits = jnp.einsum("blhd,bshd->bhls", q_BxLxHxD, k_BxLxHxD, preferred_element_type=jnp.float32)
      probs = jax.nn.softmax(jnp.where(allowed_Bx1xLxS, logits, -1e30), axis=-1)
      probs = _dropout(probs, self.attention_dropout, drop_key).astype(dt)
      o_BxLxHxD = jnp.einsum("bhls,bshd->blhd", probs, v_BxLxHxD.astype(dt))
    else:
      o_BxLxHxD = jax.nn.dot_product_attention(q_BxLxHxD, k_BxLxHxD.astype(dt), v_BxLxHxD.astype(dt),
                                               mask=allowed_Bx1xLxS, scale=1.0)
    out = project(o_BxLxHxD, self.out_proj.kernel[...].astype(dt), self.out_proj.bias[...].astype(dt), 2)
    return out, cache


class _Block(nnx.Module):
  """One decoder layer; built with `lead=(num_layers,)` it holds every layer's parameters stacked, and OPT
  calls it on one layer's slice at a time (nnx.split / merge, as in a scan)."""

  def __init__(self, cfg: OPTConfig, rngs: nnx.Rngs, lead=()):
    e = cfg.hidden_size
    self.self_attn = _Attention(cfg, rngs, lead)
    self.self_attn_layer_norm = _Norm(e, lead)
    self.fc1 = _Proj((e, cfg.ffn_dim), (cfg.ffn_dim,), rngs, lead)
    self.fc2 = _Proj((cfg.ffn_dim, e), (e,), rngs, lead)
    self.final_layer_norm = _Norm(e, lead)
    self.pre_ln = cfg.do_layer_norm_before
    self.dropout = cfg.dropout

  def __call__(self, x_BxLxE, allowed, cache, key):
    dt = x_BxLxE.dtype
    keys = [None] * 3 if key is None else list(jax.random.split(key, 3))
    h = self.self_attn_layer_norm(x_BxLxE) if self.pre_ln else x_BxLxE
    h, cache = self.self_attn(h, allowed, cache, keys[0])
    x_BxLxE = x_BxLxE + _dropout(h, self.dropout, keys[1])
    if not self.pre_ln:  # opt-350m: post-LN
      x_BxLxE = self.self_attn_layer_norm(x_BxLxE)
    h = self.final_layer_norm(x_BxLxE) if self.pre_ln else x_BxLxE
    h = jax.nn.relu(project(h, self.fc1.kernel[...].astype(dt), self.fc1.bias[...].astype(dt), 1))
    h = sharding.constrain(h, ("batch", None, "mlp"))  # the MLP's hidden units split over 'tensor'
    h = project(h, self.fc2.kernel[...].astype(dt), self.fc2.bias[...].astype(dt), 1)
    x_BxLxE = x_BxLxE + _dropout(h, self.dropout, keys[2])
    if not self.pre_ln:
      x_BxLxE = self.final_layer_norm(x_BxLxE)
    return sharding.constrain(x_BxLxE, ("batch", None, None)), cache


_POLICIES = {"dots": jax.checkpoint_policies.dots_saveable, "full": jax.checkpoint_policies.nothing_saveable}


class OPT(nnx.Module):
  def __init__(self, cfg: OPTConfig, rngs: nnx.Rngs):
    validate(cfg)
    self.cfg = cfg
    e, p = cfg.hidden_size, cfg.word_embed_proj_dim
    emb = _normal(rngs.params(), (cfg.vocab_size, p))
    if 0 <= cfg.pad_token_id < cfg.vocab_size:  # HF zeroes nn.Embedding's padding_idx row at init
      emb = emb.at[cfg.pad_token_id].set(0.0)
    self.embed_tokens = nnx.Param(emb)
    self.embed_positions = nnx.Param(_normal(rngs.params(), (cfg.max_position_embeddings + POS_OFFSET, e)))
    self.project_in = nnx.Param(_normal(rngs.params(), (p, e))) if p != e else None
    self.project_out = nnx.Param(_normal(rngs.params(), (e, p))) if p != e else None
    self.layers = _Block(cfg, rngs, lead=(cfg.num_layers,))
    self.final_layer_norm = _Norm(e) if cfg.do_layer_norm_before else None

  def _run_layers(self, x_BxLxE, allowed, cache, dropout_key):
    """Every layer over x: one lax.scan over the stacked parameters (cfg.scan_layers) or a Python loop over
    their slices, the same function either way; training rematerialises each layer's activations as
    cfg.remat says. The cache (kv_cache.Cache) rides in the carry: each layer writes its slice in place."""
    cfg = self.cfg
    gdef, stacked = nnx.split(self.layers)

    def layer(x_BxLxE, cache, i, params_i):
      key = None if dropout_key is None else jax.random.fold_in(dropout_key, i)
      return nnx.merge(gdef, params_i)(x_BxLxE, allowed, None if cache is None else cache.at_layer(i), key)

    if cfg.remat != "none" and cache is None:
      layer = jax.checkpoint(layer, policy=_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)

    def body(carry, xs):
      x_BxLxE, cache = layer(*carry, *xs)
      return (x_BxLxE, cache), None

    carry = (x_BxLxE, cache)
    if cfg.scan_layers:
      carry, _ = jax.lax.scan(body, carry, (jnp.arange(cfg.num_layers), stacked))
    else:
      for i in range(cfg.num_layers):
        carry, _ = body(carry, (i, jax.tree.map(lambda a, i=i: a[i], stacked)))
    return carry

  def __call__(self, ids_BxL, mask_BxL, positions_BxL=None, cache=None, dropout_key=None, last_only=False):
    dt = DTYPES[self.cfg.dtype]
    b, l = ids_BxL.shape
    mask_BxL = mask_BxL.astype(jnp.int32)
    start_B = jnp.zeros((b,), jnp.int32) if cache is None else cache.pos
    if positions_BxL is None:
      positions_BxL = (start_B[:, None] + jnp.cumsum(mask_BxL, axis=1)) * mask_BxL - 1
    if cache is None:
      key_valid_BxS, index = mask_BxL > 0, jnp.zeros((), jnp.int32)
    else:
      cache = cache.begin(mask_BxL)
      key_valid_BxS, index = cache.mask, cache.index
    s = key_valid_BxS.shape[1]
    q_slot_L = index + jnp.arange(l)
    k_slot_S = jnp.arange(s)
    causal_LxS = k_slot_S[None, :] <= q_slot_L[:, None]
    own_LxS = k_slot_S[None, :] == q_slot_L[:, None]
    allowed_Bx1xLxS = ((key_valid_BxS[:, None, None, :] & causal_LxS) | own_LxS)

    x = self.embed_tokens[...][ids_BxL].astype(dt)
    if self.project_in is not None:
      x = x @ self.project_in[...].astype(dt)
    x_BxLxE = x + self.embed_positions[...][positions_BxL + POS_OFFSET].astype(dt)
    x_BxLxE = sharding.constrain(x_BxLxE, ("batch", None, None))
    x_BxLxE, cache = self._run_layers(x_BxLxE, allowed_Bx1xLxS, cache, dropout_key)
    if last_only:  # decoding reads the last position's logits only (as HF generate's logits_to_keep=1)
      x_BxLxE = x_BxLxE[:, -1:]
    if self.final_layer_norm is not None:
      x_BxLxE = self.final_layer_norm(x_BxLxE)
    if self.project_out is not None:
      x_BxLxE = x_BxLxE @ self.project_out[...].astype(dt)
    rows = x_BxLxE.shape[:2]  # (b, 1) with last_only
    with jax.named_scope("lm_head"):  # names its ops in profiles
      logits_BxLxV = lm_head(x_BxLxE.reshape(-1, x_BxLxE.shape[-1]),
                             self.embed_tokens[...].astype(dt)).reshape(*rows, -1)
    logits_BxLxV = sharding.constrain(logits_BxLxV, ("batch", None, "vocab"))
    if cache is None:
      return logits_BxLxV
    return logits_BxLxV, cache.end(l, mask_BxL)


@functools.lru_cache(maxsize=None)
def graphdef(cfg: OPTConfig):
  return nnx.graphdef(nnx.eval_shape(lambda: OPT(cfg, nnx.Rngs(0))))


@functools.partial(jax.jit, static_argnums=0)
def _init(cfg: OPTConfig, key) -> dict:
  # Same distributions as OPT(cfg, rngs) builds, but one normal draw cut into every drawn tensor: XLA:CPU
  # compiles each threefry draw of a distinct shape separately (~0.7 s apiece), so per-tensor draws made
  # opt-125m's init (76 draws) a minute of compilation. The cost: a transient flat copy of the drawn params.
  shapes = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: OPT(cfg, nnx.Rngs(0))), nnx.Param))
  flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  names = [str(getattr(path[-1], "key", path[-1])) for path, _ in flat]
  sizes = [leaf.size if n not in ("scale", "bias") else 0 for (_, leaf), n in zip(flat, names)]
  draws = _normal(key, (sum(sizes),))
  values, start = [], 0
  for (_, leaf), n, size in zip(flat, names, sizes):
    if size:
      values.append(draws[start:start + size].reshape(leaf.shape))
      start += size
    else:
      values.append(jnp.full(leaf.shape, 1.0 if n == "scale" else 0.0, jnp.float32))
  params = jax.tree_util.tree_unflatten(treedef, values)
  if 0 <= cfg.pad_token_id < cfg.vocab_size:
    params["embed_tokens"] = params["embed_tokens"].at[cfg.pad_token_id].set(0.0)
  return params


def init_params(cfg: OPTConfig, key) -> dict:
  """OPT's init (HF's _init_weights): kernels and embeddings N(0, 0.02), the pad row of the token table 0,
  biases 0, LayerNorm scales 1. The same distributions as OPT(cfg, nnx.Rngs(key)), not the same values."""
  validate(cfg)
  return _init(cfg, key)


def init_cache(cfg: OPTConfig, batch: int, max_len: int) -> kv_cache.Cache:
  """Preallocated K/V of every layer ([layers, batch, heads, max_len, head_dim]: see kv_cache) in the compute dtype,
  the key mask of the slots written so far, the write index, and per row the next position."""
  validate(cfg)
  if max_len > cfg.max_position_embeddings:
    raise ConfigError(f"cache max_len={max_len} exceeds OPTConfig.max_position_embeddings="
                      f"{cfg.max_position_embeddings}")
  return kv_cache.empty(cfg.num_layers, batch, cfg.num_heads, max_len, cfg.head_dim, DTYPES[cfg.dtype])


def apply(cfg: OPTConfig, params, ids_BxL, mask_BxL, *, deterministic=True, dropout_key=None,
          positions_BxL=None, cache=None, last_only=False):
  """Logits [B, L, vocab] in float32 ([B, 1, vocab], the last position's, with last_only); with a cache,
  (logits, new_cache), the new tokens written at its index."""
  validate(cfg)
  if ids_BxL.ndim != 2 or mask_BxL.shape != ids_BxL.shape:
    raise ConfigError(f"ids_BxL {ids_BxL.shape} must be 2-D with mask_BxL of the same shape, got {mask_BxL.shape}")
  if positions_BxL is not None and positions_BxL.shape != ids_BxL.shape:
    raise ConfigError(f"positions_BxL {positions_BxL.shape} must have ids_BxL's shape {ids_BxL.shape}")
  limit = cfg.max_position_embeddings if cache is None else cache.mask.shape[1]
  if ids_BxL.shape[1] > limit:
    what = "max_position_embeddings" if cache is None else "the cache length"
    raise ConfigError(f"ids_BxL length {ids_BxL.shape[1]} exceeds {what} {limit}")
  if not deterministic and dropout_key is None and (cfg.dropout > 0 or cfg.attention_dropout > 0):
    raise ConfigError("apply(deterministic=False) needs a dropout_key")
  model = nnx.merge(graphdef(cfg), params)
  return model(ids_BxL, mask_BxL, positions_BxL, cache, None if deterministic else dropout_key, last_only)


_AXES = {
    "embed_positions": ("position", "embed"), "project_in": ("proj", "embed"), "project_out": ("embed", "proj"),
    ("q_proj", "kernel"): ("embed", "heads", "kv"), ("q_proj", "bias"): ("heads", "kv"),
    ("out_proj", "kernel"): ("heads", "kv", "embed"), ("out_proj", "bias"): ("embed",),
    ("fc1", "kernel"): ("embed", "mlp"), ("fc1", "bias"): ("mlp",),
    ("fc2", "kernel"): ("mlp", "embed"), ("fc2", "bias"): ("embed",),
    "scale": ("embed",), "bias": ("embed",),
}
for _n in ("k_proj", "v_proj"):
  _AXES[(_n, "kernel")], _AXES[(_n, "bias")] = _AXES[("q_proj", "kernel")], _AXES[("q_proj", "bias")]


def logical_axes(params):
  """Per parameter, one logical axis name per dimension. The token table's width is "embed" when it equals
  the hidden size and "proj" when project_in/out map between them (opt-350m)."""
  has_proj = "project_in" in params and params["project_in"] is not None

  def axes(path, leaf):
    names = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
    if names[-1] == "embed_tokens":
      return ("vocab", "proj" if has_proj else "embed")
    found = _AXES.get(tuple(names[-2:])) or _AXES.get(names[-1])
    if found is not None and names[0] == "layers":  # stacked: one slice per layer (never split: the scan's axis)
      found = ("layers", *found)
    if found is None or len(found) != leaf.ndim:
      raise ConfigError(f"no logical axes for parameter {'/'.join(names)} of shape {leaf.shape}")
    return found

  return jax.tree_util.tree_map_with_path(axes, params)
