"""Fine-tuning an OPT language model on 64-token blocks, as the paper's main experiment does with OPT-125m on
wikitext-2: AdamW (lr 2e-5) with cosine decay to 1e-6 over the run's steps, batch 128, 5 epochs, the model
best on validation perplexity kept. `fit` is that whole fine-tune as one pure function: the LM family runs it
inside each generation, and `train` compiles the same function for blocks on the host (tests, benchmarks).

Data: blocks of token ids `ids_NxL` (int) with an optional `mask_NxL` (1 = real token). They live on the device
(wikitext-2's ~2.4M tokens are ~10 MB as int32), replicated; each batch is gathered from them and split over the
mesh's batch axes. An epoch is one `lax.scan` over ceil(N / batch) steps in an order drawn by
fold_in(shuffle key, epoch); the last batch's rows past N are masked (a DataLoader with drop_last=False: every
block is seen once per epoch, the last step averages over fewer tokens).

Ragged buffers (the accumulate regimes: a static capacity N, only some rows valid): the order puts the valid
rows first, shuffled among themselves (ops.permutation_valid_first: a full buffer's order is
jax.random.permutation(key, N)), and the steps past ceil(n_valid / batch) are skipped whole (ops.ragged_scan),
so the parameters, Adam's moments and step count are those of training on the valid rows alone (given an
optimizer whose schedule ends at the valid rows' steps: make_optimizer's valid_steps).

Loss: loss.token_nll's next-token cross-entropy, averaged over the batch's real tokens.

Keys: the state carries one training key; the shuffle of epoch e is fold_in(fold_in(key, 0), e), the dropout of
step s fold_in(fold_in(key, 1), s), so any step can be replayed alone.

Sharding: parameters and Adam's moments are split over 'fsdp' by `sharding.param_shardings` (logical axes from
the model), batches over ('data', 'fsdp'); on one device it is plain jit.
"""
import dataclasses
import functools
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from collapse_jax import hardware, ops, progress, sharding
from collapse_jax.errors import ConfigError
from collapse_jax.families.lm import model as opt_model
from collapse_jax.families.lm import sizes
from collapse_jax.families.lm.loss import token_nll

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


# --- input (host side, before anything is compiled) ---------------------------------------------------------------
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


def check_batch_shards(mesh, batches: dict) -> None:
  """Each {name: batch size} a whole multiple of the mesh's batch shards (a batch is split over them)."""
  shards = sharding.batch_shards(mesh)
  for name, value in batches.items():
    if value % shards:
      raise ConfigError(f"{name}={value} must be a multiple of the {shards} batch shards "
                        f"({' x '.join(sharding.batch_axes(mesh))})")


def validate(tcfg: TrainConfig, model_cfg, train_blocks: dict, valid_blocks: dict, name: str = "TrainConfig") -> None:
  """What only the data can refuse (blocks empty, too short or long for the model, ids outside its vocabulary;
  a warmup as long as the run), before anything is compiled. TrainConfig's own fields come checked: the
  experiment's from config.lm (config.py); `name` is what an error calls them."""
  for what, b in (("train_blocks", train_blocks), ("valid_blocks", valid_blocks)):
    n, length = b["ids"].shape
    if n == 0 or not b["mask"].any():
      raise ConfigError(f"{what} is empty: no blocks (or all masked)")
    if length < 2:
      raise ConfigError(f"{what} blocks have length {length}; next-token prediction needs at least 2")
    if length > model_cfg.max_position_embeddings:
      raise ConfigError(f"{what} blocks have length {length} > model max_position_embeddings "
                        f"{model_cfg.max_position_embeddings}")
    lo, hi = int(b["ids"].min()), int(b["ids"].max())
    if lo < 0 or hi >= model_cfg.vocab_size:
      raise ConfigError(f"{what} holds token id {hi if hi >= model_cfg.vocab_size else lo} outside the model's "
                        f"vocab_size {model_cfg.vocab_size} (tokenizer and model disagree)")
  total = tcfg.epochs * steps_per_epoch(train_blocks["ids"].shape[0], tcfg.batch_size)
  if tcfg.warmup_steps >= total:
    raise ConfigError(f"{name}.warmup_steps must be < the run's {total} steps, got {tcfg.warmup_steps!r}")


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


def optimizer(tcfg: TrainConfig, n_blocks: int, n_valid=None) -> optax.GradientTransformation:
  """AdamW for a run on n_blocks: the cosine over epochs x its steps per epoch, or, given a ragged buffer's valid
  rows n_valid (traced), over theirs."""
  E, B = tcfg.epochs, tcfg.batch_size
  return make_optimizer(tcfg, E * steps_per_epoch(n_blocks, B),
                        None if n_valid is None else E * steps_per_epoch(n_valid, B))


# --- the pure steps -------------------------------------------------------------------------------------------------
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
  order = ops.permutation_valid_first(jax.random.fold_in(jax.random.fold_in(state.key, SHUFFLE), epoch), valid_N)
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

  # Past the valid rows a batch would be all padding: no step, so Adam's count and moments stay put.
  state, (nll_S, tokens_S) = ops.ragged_scan(train, state, S, steps if ragged else None)
  return state, {"loss": jnp.sum(nll_S) / jnp.maximum(jnp.sum(tokens_S), 1.0), "tokens": jnp.sum(tokens_S)}


def state_shardings(params, opt_state, mesh) -> "TrainState":
  """Where a TrainState lives: the parameters by their logical axes, every params-shaped optimizer subtree (Adam's
  moments) as the parameters, the step, counts and key replicated."""
  rep = sharding.replicated(mesh)
  p_sh = sharding.param_shardings(params, opt_model.logical_axes(params), mesh)
  return TrainState(rep, p_sh, sharding.opt_state_shardings(opt_state, params, p_sh, mesh), rep)


def perplexity(params, blocks: dict, *, model_cfg, eval_batch: int, batch_sharding=None):
  """Token-weighted perplexity exp(total NLL / predicted tokens) of `blocks`, in batches of `eval_batch`."""
  ids_NxL, mask_NxL = blocks["ids"], blocks["mask"]
  shards = 1 if batch_sharding is None else sharding.batch_shards(batch_sharding.mesh)
  E = ops.chunk_size(ids_NxL.shape[0], eval_batch, shards)
  ids_CxExL = ops.to_chunks(ids_NxL, E)
  mask_CxExL = ops.to_chunks(mask_NxL, E)  # padded rows carry mask 0: they count for nothing

  def body(acc, xs):
    batch = _constrain({"ids": xs[0], "mask": xs[1]}, batch_sharding)
    nll, count = eval_step(params, batch, model_cfg=model_cfg)
    return (acc[0] + nll, acc[1] + count), None

  (nll, count), _ = jax.lax.scan(body, (jnp.zeros(()), jnp.zeros(())), (ids_CxExL, mask_CxExL))
  return jnp.exp(nll / jnp.maximum(count, 1.0))


# --- the fine-tune: what the experiment runs each generation -------------------------------------------------------
def fit(tcfg: TrainConfig, model_cfg, start, train_blocks: dict, valid_blocks: dict, key, *, mesh, valid_N=None):
  """tcfg.epochs epochs of `train_epoch` from the parameters `start` in one lax.scan, validation perplexity after
  each, the parameters best on it kept (the paper's rule; NaN is never better, so a diverged run keeps an earlier
  model, or `start` at epoch 0). Pure: it sits inside the loop's generation, or jitted alone (`program`).

  key: the run's training key (uint32[2]); valid_N: which training rows are valid (a ragged buffer; None: all),
  the cosine then ending at the valid rows' steps. Returns (best, per_epoch): best = {'params', 'valid_ppl',
  'best_epoch' (1-based), 'train_loss' (the last epoch's)}, per_epoch = {'train_loss', 'valid_ppl'}, each [epochs].
  """
  E, bs = tcfg.epochs, sharding.batch_sharding(mesh)
  tx = optimizer(tcfg, train_blocks["ids"].shape[0], None if valid_N is None else jnp.sum(valid_N, dtype=jnp.int32))
  state_sh = state_shardings(start, jax.eval_shape(tx.init, start), mesh)
  state = TrainState(jnp.zeros((), jnp.int32), start, tx.init(start), key)

  def epoch(carry, e):
    state, best, _ = carry
    state, m = train_epoch(state, train_blocks, e, model_cfg=model_cfg, tx=tx, batch_size=tcfg.batch_size,
                           batch_sharding=bs, state_shardings=state_sh, valid_N=valid_N, epochs=E)
    ppl = perplexity(state.params, valid_blocks, model_cfg=model_cfg, eval_batch=tcfg.eval_batch, batch_sharding=bs)
    better = ppl < best["valid_ppl"]
    new = {"params": state.params, "valid_ppl": ppl, "best_epoch": e + 1}
    best = jax.tree.map(lambda a, b: jnp.where(better, a, b), new, best)
    return (state, best, m["loss"]), {"train_loss": m["loss"], "valid_ppl": ppl}

  best = {"params": start, "valid_ppl": jnp.asarray(jnp.inf, jnp.float32), "best_epoch": jnp.int32(0)}
  carry = (state, best, jnp.zeros((), jnp.float32))
  (_, best, last_loss), per_epoch = jax.lax.scan(epoch, carry, jnp.arange(E, dtype=jnp.int32))
  return dict(best, train_loss=last_loss), per_epoch


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
  return sizes.flops_per_token(model_cfg, seq_len) * tokens_per_s / peak


# --- the host-side run ----------------------------------------------------------------------------------------------
def setup(tcfg: TrainConfig, model_cfg, params, n_train: int, key, mesh):
  """(state placed on the mesh, its shardings, optimizer) for a run of `n_train` blocks."""
  tx = optimizer(tcfg, n_train)
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


def program(tcfg: TrainConfig, model_cfg, params, mesh):
  """`fit` jitted for the mesh, after the validation perplexity of the parameters it starts from: (params,
  train blocks, valid blocks, key) -> (initial valid ppl, best, per_epoch); the parameters are placed by their
  logical axes (FSDP), the blocks replicated. Nothing is donated: the caller's parameters survive."""
  rep, bs = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  p_sh = sharding.param_shardings(params, opt_model.logical_axes(params), mesh)

  def run(params, train_b, valid_b, key):
    ppl0 = perplexity(params, valid_b, model_cfg=model_cfg, eval_batch=tcfg.eval_batch, batch_sharding=bs)
    return (ppl0, *fit(tcfg, model_cfg, params, train_b, valid_b, key, mesh=mesh))

  best_sh = {"params": p_sh, "valid_ppl": rep, "best_epoch": rep, "train_loss": rep}
  return jax.jit(sharding.on_mesh(run, mesh), in_shardings=(p_sh, rep, rep, rep), out_shardings=(rep, best_sh, rep))


def train(tcfg: TrainConfig, model_cfg, params, train_blocks, valid_blocks, key, mesh=None, log=print):
  """Fine-tune `params` on the host's blocks with the experiment's trainer (`fit`, compiled by `program`); returns
  (the params best on validation perplexity, history).

  history: 'epochs' (per epoch: epoch, train_loss, valid_ppl), 'best_epoch' (1-based; 0: no epoch's perplexity
  was finite), 'best_valid_ppl', 'initial_valid_ppl', 'steps_per_epoch', 'compile_s', and for the one compiled
  call (every epoch with its validation): 'seconds', 'tokens_per_s' (training tokens), 'mfu' (None: no peak known).
  """
  mesh = sharding.make_lm_mesh(1, 1) if mesh is None else mesh
  check_batch_shards(mesh, {"TrainConfig.batch_size": tcfg.batch_size, "TrainConfig.eval_batch": tcfg.eval_batch})
  train_b, valid_b = as_blocks(train_blocks, "train_blocks"), as_blocks(valid_blocks, "valid_blocks")
  validate(tcfg, model_cfg, train_b, valid_b)
  n, seq_len = train_b["ids"].shape
  key = jax.random.key_data(key) if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) else key
  t0 = time.perf_counter()
  fn = program(tcfg, model_cfg, params, mesh)
  args = (params, train_b, valid_b, key)
  compiled = fn.lower(*args).compile()  # ahead, so that the rate below is a rate, not a compile time
  compile_s = time.perf_counter() - t0
  t = time.perf_counter()
  ppl0, best, per_epoch = jax.block_until_ready(compiled(*args))
  seconds = time.perf_counter() - t
  tok_s = tcfg.epochs * n * seq_len / seconds
  losses, ppls = np.asarray(per_epoch["train_loss"]), np.asarray(per_epoch["valid_ppl"])
  history = {"epochs": [{"epoch": e + 1, "train_loss": float(losses[e]), "valid_ppl": float(ppls[e])}
                        for e in range(tcfg.epochs)],
             "best_epoch": int(best["best_epoch"]), "best_valid_ppl": float(best["valid_ppl"]),
             "initial_valid_ppl": float(ppl0), "steps_per_epoch": steps_per_epoch(n, tcfg.batch_size),
             "compile_s": compile_s, "seconds": seconds, "tokens_per_s": tok_s,
             "mfu": mfu(model_cfg, seq_len, tok_s, peak_flops(mesh.devices.flat, model_cfg.dtype, tcfg.peak_flops))}
  if tcfg.verbose:
    for r in history["epochs"]:
      log(f"[lm] epoch {r['epoch']}/{tcfg.epochs}  train loss {r['train_loss']:.4f}  valid ppl {r['valid_ppl']:.3f}"
          f"{' (best)' if history['best_epoch'] == r['epoch'] else ''}")
    mfu_txt = "n/a" if history["mfu"] is None else f"{100 * history['mfu']:.1f}%"
    log(f"[lm] {tcfg.epochs} epochs in {seconds:.3g} s (compiled in {compile_s:.3g} s)  {tok_s:.4g} tok/s  "
        f"MFU {mfu_txt}")
  return best["params"], history
