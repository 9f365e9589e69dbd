"""Fine-tuning an OPT language model on 64-token blocks, as the paper's main experiment does with OPT-125m on
wikitext-2: AdamW (lr 2e-5) with cosine decay to 1e-6 over the run's steps, batch 128, 5 epochs, the model
best on validation perplexity kept.

Data: blocks of token ids `ids_NxL` (int) with an optional `mask_NxL` (1 = real token). They live on the device
(wikitext-2's ~2.4M tokens are ~10 MB as int32), replicated; each batch is gathered from them and split over the
mesh's batch axes. An epoch is one `lax.scan` over ceil(N / batch) steps in an order drawn by
fold_in(shuffle key, epoch); the last batch's rows past N are masked (a DataLoader with drop_last=False: every
block is seen once per epoch, the last step averages over fewer tokens).

Ragged buffers (the accumulate regimes: a static capacity N, only some rows valid): the order puts the valid
rows first, shuffled among themselves, and the steps past ceil(n_valid / batch) are skipped whole (lax.cond),
so the parameters, Adam's moments and step count are those of training on the valid rows alone (given an
optimizer whose schedule ends at the valid rows' steps: make_optimizer's valid_steps). The order is
jax.random.permutation's algorithm (sorts by random 32-bit keys) with invalid rows sorted last: valid rows
that form a prefix are visited as permutation(key, n_valid) would visit them (exactly while N and n_valid
need the same number of sort rounds: both under 1,626 rows, or both under 2.6M), and a full buffer's order is
permutation(key, N) itself.

Loss: next-token cross-entropy (predict ids[1:] from ids[:-1], as HF's OPTForCausalLM with labels=input_ids),
averaged over the batch's real tokens (a token counts where it and its predecessor are unmasked).

Keys: the state carries one training key; the shuffle of epoch e is fold_in(fold_in(key, 0), e), the dropout of
step s fold_in(fold_in(key, 1), s), so any step can be replayed alone.

Sharding: parameters and Adam's moments are split over 'fsdp' by `sharding.param_shardings` (logical axes from
the model), batches over ('data', 'fsdp'); on one device it is plain jit.
"""
import dataclasses
import functools
import math
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from collapse_jax import hardware, progress, sharding
from collapse_jax.errors import ConfigError
from collapse_jax.families.lm import model as opt_model

SHUFFLE, DROPOUT = 0, 1  # fold_in tags for the two key streams


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  lr: float = 2e-5             # the paper's AdamW learning rate (peak, after warmup)
  end_lr: float = 1e-6         # cosine decay ends here at the run's last step
  warmup_steps: int = 0        # linear warmup from 0; counted inside the cosine's total steps
  weight_decay: float = 0.0    # decoupled (AdamW), on >= 2-D weights only (HF Trainer exempts biases and norms)
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  grad_clip: float = 0.0       # global-norm clipping; 0: off
  batch_size: int = 128
  epochs: int = 5
  eval_batch: int = 128
  peak_flops: float = 0.0      # per-device peak for MFU; 0: published (accelerators) or derived (CPU): hardware.py
  verbose: bool = True


class TrainState(NamedTuple):
  step: jax.Array    # int32, optimizer steps taken
  params: Any
  opt_state: Any
  key: jax.Array     # the run's training key (uint32[2]); per-step keys are folded from it


# --- validation (host side, before anything is compiled) -------------------------------------------------------
def _fail(field: str, want: str, value) -> None:
  raise ConfigError(f"TrainConfig.{field} must be {want}, got {value!r}")


def _is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_num(v) -> bool:
  return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def as_blocks(blocks, name: str = "blocks") -> dict:
  """{'ids': int32[N, L], 'mask': int32[N, L]} on the host from an array of ids or a dict with 'ids' (and 'mask')."""
  ids, mask = (blocks.get("ids"), blocks.get("mask")) if isinstance(blocks, dict) else (blocks, None)
  ids = np.asarray(ids)
  if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
    raise ConfigError(f"{name} must be an integer array [blocks, length], got {ids.dtype}{list(ids.shape)}")
  mask = np.ones(ids.shape, np.int32) if mask is None else np.asarray(mask).astype(np.int32)
  if mask.shape != ids.shape:
    raise ConfigError(f"{name} mask has shape {list(mask.shape)}, its ids {list(ids.shape)}")
  return {"ids": ids.astype(np.int32), "mask": mask}


def steps_per_epoch(n_blocks, batch: int):
  # ceil(n / batch); n may be a traced count (a ragged buffer's valid rows)
  return -(-n_blocks // batch)


def validate(tcfg: TrainConfig, model_cfg, train_blocks: dict, valid_blocks: dict, mesh) -> None:
  """Raise ConfigError naming the field for anything that would fail (or silently mistrain) later."""
  for f in ("batch_size", "epochs", "eval_batch"):
    if not _is_int(getattr(tcfg, f)) or getattr(tcfg, f) < 1:
      _fail(f, "a positive integer", getattr(tcfg, f))
  for f in ("lr", "b1", "b2", "eps"):
    if not _is_num(getattr(tcfg, f)) or not getattr(tcfg, f) > 0:
      _fail(f, "> 0", getattr(tcfg, f))
  for f in ("end_lr", "weight_decay", "grad_clip", "peak_flops"):
    if not _is_num(getattr(tcfg, f)) or getattr(tcfg, f) < 0:
      _fail(f, ">= 0", getattr(tcfg, f))
  if not _is_int(tcfg.warmup_steps) or tcfg.warmup_steps < 0:
    _fail("warmup_steps", "a non-negative integer", tcfg.warmup_steps)
  shards = sharding.batch_shards(mesh)
  for f in ("batch_size", "eval_batch"):
    if getattr(tcfg, f) % shards:
      _fail(f, f"a multiple of the {shards} batch shards ({' x '.join(sharding.batch_axes(mesh))})", getattr(tcfg, f))
  for name, b in (("train_blocks", train_blocks), ("valid_blocks", valid_blocks)):
    n, length = b["ids"].shape
    if n == 0 or not b["mask"].any():
      raise ConfigError(f"{name} is empty: no blocks (or all masked)")
    if length < 2:
      raise ConfigError(f"{name} blocks have length {length}; next-token prediction needs at least 2")
    if length > model_cfg.max_position_embeddings:
      raise ConfigError(f"{name} blocks have length {length} > model max_position_embeddings "
                        f"{model_cfg.max_position_embeddings}")
    lo, hi = int(b["ids"].min()), int(b["ids"].max())
    if lo < 0 or hi >= model_cfg.vocab_size:
      raise ConfigError(f"{name} holds token id {hi if hi >= model_cfg.vocab_size else lo} outside the model's "
                        f"vocab_size {model_cfg.vocab_size} (tokenizer and model disagree)")
  total = tcfg.epochs * steps_per_epoch(train_blocks["ids"].shape[0], tcfg.batch_size)
  if tcfg.warmup_steps >= total:
    _fail("warmup_steps", f"< the run's {total} steps", tcfg.warmup_steps)


# --- optimizer ----------------------------------------------------------------------------------------------------
def schedule(tcfg: TrainConfig, total_steps: int, valid_steps=None):
  """Linear warmup from 0, cosine to end_lr at total_steps; with valid_steps (a traced count, a ragged buffer's
  steps) the cosine ends there instead, and a full buffer (valid_steps == total_steps) gets the static schedule's
  exact values (XLA rounds a division by a constant differently from one by an array)."""
  static = optax.warmup_cosine_decay_schedule(0.0, tcfg.lr, tcfg.warmup_steps, total_steps, tcfg.end_lr)
  if valid_steps is None:
    return static
  w, alpha = tcfg.warmup_steps, tcfg.end_lr / tcfg.lr

  def traced(count):  # optax's arithmetic, step for step, with the total as an array
    warm = (0.0 - tcfg.lr) * (1 - jnp.clip(count, 0, w) / w) + tcfg.lr if w else 0.0
    c = jnp.minimum(count - w, valid_steps - w)
    decayed = (1 - alpha) * (0.5 * (1 + jnp.cos(jnp.pi * c / (valid_steps - w)))) ** 1.0 + alpha
    return jnp.where(count < w, warm, tcfg.lr * decayed)

  return lambda count: jnp.where(valid_steps == total_steps, static(count), traced(count))


def make_optimizer(tcfg: TrainConfig, total_steps: int, valid_steps=None) -> optax.GradientTransformation:
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  adamw = optax.adamw(schedule(tcfg, total_steps, valid_steps), tcfg.b1, tcfg.b2, tcfg.eps,
                      weight_decay=tcfg.weight_decay, mask=decay_mask)
  return optax.chain(optax.clip_by_global_norm(tcfg.grad_clip), adamw) if tcfg.grad_clip > 0 else adamw


# --- the pure steps -------------------------------------------------------------------------------------------------
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


def _has_dropout(model_cfg) -> bool:
  return model_cfg.dropout > 0 or model_cfg.attention_dropout > 0


def train_step(state: TrainState, batch: dict, *, model_cfg, tx):
  """One AdamW step on the batch's token-mean loss. Returns (state, metrics)."""
  dropout_key = jax.random.fold_in(jax.random.fold_in(state.key, DROPOUT), state.step)

  def loss_fn(params):
    logits = opt_model.apply(model_cfg, params, batch["ids"], batch["mask"], deterministic=not _has_dropout(model_cfg),
                             dropout_key=dropout_key if _has_dropout(model_cfg) else None)
    nll, count = token_nll(logits, batch["ids"], batch["mask"])
    # An all-masked batch (possible only at an epoch's padded tail) gives zero gradients, not NaN.
    return nll / jnp.maximum(count, 1.0), (nll, count)

  (loss, (nll, count)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"loss": loss, "nll": nll, "tokens": count, "grad_norm": optax.tree.norm(grads)}
  return TrainState(state.step + 1, params, opt_state, state.key), metrics


def eval_step(params, batch: dict, *, model_cfg):
  """(summed NLL, predicted tokens) of one batch, no dropout."""
  logits = opt_model.apply(model_cfg, params, batch["ids"], batch["mask"], deterministic=True)
  return token_nll(logits, batch["ids"], batch["mask"])


def _constrain(tree, shardings):
  return tree if shardings is None else jax.lax.with_sharding_constraint(tree, shardings)


def shuffled(key, valid_N):
  """Row indices, valid rows first in random order, then the invalid ones: jax.random.permutation's rounds of
  sorts by random 32-bit keys (the same bits, the same rounds), with the invalid flag as the leading sort key."""
  n = valid_N.shape[0]
  rounds = math.ceil(3 * math.log(max(1, n)) / math.log(np.iinfo(np.uint32).max))
  last_N, idx_N = (~valid_N).astype(jnp.uint32), jnp.arange(n, dtype=jnp.int32)
  for _ in range(rounds):
    key, sub = jax.random.split(key)
    last_N, _, idx_N = jax.lax.sort((last_N, jax.random.bits(sub, (n,), jnp.uint32), idx_N), num_keys=2)
  return idx_N


def train_epoch(state: TrainState, blocks: dict, epoch, *, model_cfg, tx, batch_size: int, batch_sharding=None,
                state_shardings=None, valid_N=None, epochs: int | None = None):
  """One shuffled pass over `blocks` as a lax.scan of train_step; pure, so it can sit inside a bigger program.

  valid_N: which rows are valid (a ragged buffer; None: all): the others are never batched and the steps they
  would fill are skipped. epochs: the run's epoch count, for the progress lines only.
  Returns (state, {'loss': token-mean training loss of the epoch, 'tokens': predicted tokens}).
  """
  ids_NxL, mask_NxL = blocks["ids"], blocks["mask"]
  n, B = ids_NxL.shape[0], batch_size
  S = steps_per_epoch(n, B)
  ragged = valid_N is not None
  valid_N = jnp.ones((n,), bool) if valid_N is None else valid_N > 0
  n_valid = jnp.sum(valid_N, dtype=jnp.int32) if ragged else n
  steps = steps_per_epoch(n_valid, B) if ragged else S
  order = shuffled(jax.random.fold_in(jax.random.fold_in(state.key, SHUFFLE), epoch), valid_N)
  order = jnp.pad(order, (0, S * B - n))
  keep = (jnp.arange(S * B) < n_valid).astype(mask_NxL.dtype)

  def train(state, s):
    idx_B = jax.lax.dynamic_slice_in_dim(order, s * B, B)
    keep_B = jax.lax.dynamic_slice_in_dim(keep, s * B, B)
    batch = _constrain({"ids": ids_NxL[idx_B], "mask": mask_NxL[idx_B] * keep_B[:, None]}, batch_sharding)
    state, m = train_step(state, batch, model_cfg=model_cfg, tx=tx)
    progress.report("lm train", s, steps, epoch=epoch, epochs=epochs, tag=state.key, shows={"loss": m["loss"]},
                    amounts={"tok": m["tokens"]})
    # Keeps FSDP placement of the carry through the scan instead of leaving it to propagation.
    return _constrain(state, state_shardings), (m["nll"], m["tokens"])

  def body(state, s):
    if not ragged:
      return train(state, s)
    # Past the valid rows a batch would be all padding: no step, so Adam's count and moments stay put.
    skip = lambda state, s: (state, (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)))  # noqa: E731
    return jax.lax.cond(s < steps, train, skip, state, s)

  state, (nll_S, tokens_S) = jax.lax.scan(body, state, jnp.arange(S))
  return state, {"loss": jnp.sum(nll_S) / jnp.maximum(jnp.sum(tokens_S), 1.0), "tokens": jnp.sum(tokens_S)}


def eval_chunk(n: int, eval_batch: int, shards: int) -> int:
  """Rows per evaluation chunk of a set of n: eval_batch, but never padding a small set far past its size, and a
  whole multiple of the batch shards."""
  return min(eval_batch, -(-n // shards) * shards)


def state_shardings(params, opt_state, mesh) -> "TrainState":
  """Where a TrainState lives: the parameters by their logical axes, every params-shaped optimizer subtree (Adam's
  moments) as the parameters, the step, counts and key replicated."""
  rep = sharding.replicated(mesh)
  p_sh = sharding.param_shardings(params, opt_model.logical_axes(params), mesh)
  return TrainState(rep, p_sh, sharding.opt_state_shardings(opt_state, params, p_sh, mesh), rep)


def perplexity(params, blocks: dict, *, model_cfg, eval_batch: int, batch_sharding=None):
  """Token-weighted perplexity exp(total NLL / predicted tokens) of `blocks`, in batches of `eval_batch`."""
  ids_NxL, mask_NxL = blocks["ids"], blocks["mask"]
  n = ids_NxL.shape[0]
  E = eval_chunk(n, eval_batch, 1 if batch_sharding is None else sharding.batch_shards(batch_sharding.mesh))
  C = -(-n // E)
  pad = ((0, C * E - n), (0, 0))
  ids_CxExL = jnp.pad(ids_NxL, pad).reshape(C, E, -1)
  mask_CxExL = jnp.pad(mask_NxL, pad).reshape(C, E, -1)  # padded rows carry mask 0: they count for nothing

  def body(acc, xs):
    batch = _constrain({"ids": xs[0], "mask": xs[1]}, batch_sharding)
    nll, count = eval_step(params, batch, model_cfg=model_cfg)
    return (acc[0] + nll, acc[1] + count), None

  (nll, count), _ = jax.lax.scan(body, (jnp.zeros(()), jnp.zeros(())), (ids_CxExL, mask_CxExL))
  return jnp.exp(nll / jnp.maximum(count, 1.0))


# --- throughput ---------------------------------------------------------------------------------------------------
def peak_flops(devices, dtype: str, override: float = 0.0) -> float | None:
  """Peak FLOP/s of the devices at the compute dtype (collapse_jax/hardware.py: published for accelerators,
  derived from cores, clock and ISA for a CPU, whose simulated devices count once); `override` is per device."""
  devices = list(devices)
  if override:
    return float(override) * (1 if devices[0].platform == "cpu" else len(devices))
  return hardware.total_flops(devices, dtype)


def mfu(model_cfg, seq_len: int, tokens_per_s: float, peak: float | None) -> float | None:
  if not peak:
    return None
  # Training FLOPs per token, the model's flops_per_token: 6 * N + 12 * layers * hidden * seq_len. 6 * N: each
  # matmul weight (N of them, the tied LM head included, lookups excluded) costs 2 FLOPs per token forward and 4
  # backward; attention's Q K^T and probs V add 2 * seq_len * hidden multiply-adds each per layer and token
  # forward, x3 with backward (full, not causal-halved, attention: PaLM's convention).
  return opt_model.flops_per_token(model_cfg, seq_len) * tokens_per_s / peak


# --- the host-side run ----------------------------------------------------------------------------------------------
def setup(tcfg: TrainConfig, model_cfg, params, n_train: int, key, mesh):
  """(state placed on the mesh, its shardings, optimizer) for a run of `n_train` blocks."""
  tx = make_optimizer(tcfg, tcfg.epochs * steps_per_epoch(n_train, tcfg.batch_size))
  state_sh = state_shardings(params, jax.eval_shape(tx.init, params), mesh)
  key = jax.random.key_data(key) if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) else key
  # A copy, not a view: the state is donated, and the caller's params must survive the run.
  init = jax.jit(lambda p, k: TrainState(jnp.zeros((), jnp.int32), jax.tree.map(jnp.copy, p), tx.init(p), k),
                 out_shardings=state_sh)
  return init(params, key), state_sh, tx


def epoch_program(tcfg: TrainConfig, model_cfg, tx, state_sh, mesh):
  """train_epoch jitted for the mesh: (state, blocks, epoch) -> (state, metrics), the state donated."""
  rep = sharding.replicated(mesh)
  fn = functools.partial(train_epoch, model_cfg=model_cfg, tx=tx, batch_size=tcfg.batch_size,
                         batch_sharding=sharding.batch_sharding(mesh), state_shardings=state_sh, epochs=tcfg.epochs)
  return jax.jit(sharding.on_mesh(fn, mesh), in_shardings=(state_sh, rep, rep), out_shardings=(state_sh, rep),
                 donate_argnums=0)


def perplexity_program(tcfg: TrainConfig, model_cfg, params_sh, mesh):
  rep = sharding.replicated(mesh)
  fn = functools.partial(perplexity, model_cfg=model_cfg, eval_batch=tcfg.eval_batch,
                         batch_sharding=sharding.batch_sharding(mesh))
  return jax.jit(sharding.on_mesh(fn, mesh), in_shardings=(params_sh, rep), out_shardings=rep)


def train(tcfg: TrainConfig, model_cfg, params, train_blocks, valid_blocks, key, mesh=None, log=print):
  """Fine-tune `params`; returns (the params best on validation perplexity, history).

  history: 'epochs' (per epoch: train_loss, valid_ppl, seconds, tokens_per_s, mfu), 'best_epoch' (1-based),
  'best_valid_ppl', 'initial_valid_ppl', 'compile_s', 'steps_per_epoch'.
  """
  mesh = sharding.make_lm_mesh(1, 1) if mesh is None else mesh
  train_b, valid_b = as_blocks(train_blocks, "train_blocks"), as_blocks(valid_blocks, "valid_blocks")
  validate(tcfg, model_cfg, train_b, valid_b, mesh)
  n, seq_len = train_b["ids"].shape
  S = steps_per_epoch(n, tcfg.batch_size)
  t0 = time.perf_counter()
  state, state_sh, tx = setup(tcfg, model_cfg, params, n, key, mesh)
  train_d, valid_d = jax.device_put((train_b, valid_b), sharding.replicated(mesh))
  copy_fn = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=state_sh.params)
  # Compiled ahead so the first epoch's rate is a rate, not a compile time.
  epoch_fn = epoch_program(tcfg, model_cfg, tx, state_sh, mesh).lower(state, train_d, jnp.int32(0)).compile()
  ppl_fn = perplexity_program(tcfg, model_cfg, state_sh.params, mesh).lower(state.params, valid_d).compile()
  compile_s = time.perf_counter() - t0
  peak = peak_flops(mesh.devices.flat, model_cfg.dtype, tcfg.peak_flops)
  history = {"epochs": [], "initial_valid_ppl": float(ppl_fn(state.params, valid_d)), "compile_s": compile_s,
             "steps_per_epoch": S, "best_epoch": 0, "best_valid_ppl": math.inf}
  best, t_run = None, time.perf_counter()
  for e in range(tcfg.epochs):
    t = time.perf_counter()
    state, m = epoch_fn(state, train_d, jnp.int32(e))
    loss = float(m["loss"])  # waits for the epoch
    dt = time.perf_counter() - t
    ppl = float(ppl_fn(state.params, valid_d))
    tok_s = n * seq_len / dt
    row = {"epoch": e + 1, "train_loss": loss, "valid_ppl": ppl, "seconds": dt, "tokens_per_s": tok_s,
           "mfu": mfu(model_cfg, seq_len, tok_s, peak)}
    history["epochs"].append(row)
    if ppl < history["best_valid_ppl"]:  # the paper's checkpoint rule: keep the epoch best on validation
      best, history["best_epoch"], history["best_valid_ppl"] = copy_fn(state.params), e + 1, ppl
    if tcfg.verbose:
      eta = (time.perf_counter() - t_run) / (e + 1) * (tcfg.epochs - e - 1)
      mfu_txt = "n/a" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
      log(f"[lm] epoch {e + 1}/{tcfg.epochs} ({100 * (e + 1) / tcfg.epochs:.0f}%)  train loss {loss:.4f}  "
          f"valid ppl {ppl:.3f}{' (best)' if history['best_epoch'] == e + 1 else ''}  {tok_s:.4g} tok/s  "
          f"MFU {mfu_txt}  ETA {progress.fmt_time(eta)}")
  if best is None:  # every epoch's perplexity was NaN: hand back the last model rather than nothing
    best, history["best_epoch"] = state.params, tcfg.epochs
  return best, history
