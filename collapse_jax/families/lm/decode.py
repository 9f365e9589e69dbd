"""KV-cache decoding on device with Hugging Face `generate`'s semantics: greedy, sampling (temperature, top-k,
top-p) and beam search (length penalty, early_stopping True / False / "never"), repetition penalty, min/max new
tokens, EOS stopping, left-padded ragged prompts.

One batch: one prefill of the prompts into a preallocated cache, then a `lax.while_loop` of one-token steps that
exits once every row is done. A corpus: `decode_corpus` runs fixed batches through `lax.map` inside one compiled
program, each batch split over the mesh's batch axes, each reporting to collapse_jax.progress.

The model enters as an `LM` (apply + cache constructor + a few ids), so a fake model of known distribution can
stand in for OPT in tests. Caches are pytrees of batch-leading arrays plus scalars shared by every row; beam
search expands a prompt cache to its beams and reorders rows through the LM's hooks, whose defaults copy the
prompt's cache to every beam (`beam_cache`) and gather every batch-leading leaf (`reorder`). OPT's hooks
(`opt_lm`) keep the prompt's K/V once per prompt, read in place by its beams (kv_cache.share_prefix), and never move
the beams' own K/V: reordering moves which beam's slots each row reads (kv_cache.reorder_copies).

HF details kept on purpose (tests/fixtures/decode_hf.json checks them token for token): the logits processors
of warp.py, in HF's order; beam search keeps 2K candidates per step, finished hypotheses enter only from the top
K, and its -1e9 bookkeeping, length penalty (new tokens ** length_penalty) and early-stop heuristic are HF's.

Each loop's carry is a NamedTuple (`SampleState`, `BeamState`, as flax's wmt example's BeamState): its fields name
what they hold and their shapes, so the loop bodies, a planner costing one step, or a debugger read them by name.

Keys: row i of a corpus draws with fold_in(key, i), and step t of that row with fold_in(row key, t), so a
sample does not depend on the batch size, the batch a row lands in, or the mesh.
"""
import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from collapse_jax import fields, ops, progress, sharding
from collapse_jax.errors import ConfigError
from collapse_jax.families.lm import warp

METHODS = ("greedy", "sample", "beam")
NEG = -1.0e9  # HF's "never pick this" score in beam bookkeeping (added, not assigned, as HF does)
ES_FALSE, ES_TRUE, ES_NEVER = 0, 1, 2  # early_stopping as a traced integer
EARLY_STOPPING = {False: ES_FALSE, True: ES_TRUE, "never": ES_NEVER}


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  """How decoding continues prompts: Hugging Face generate's arguments of the same names (`static` and `knobs`
  split them into what a compiled program depends on and what it takes as arguments). Each field carries its rule
  from collapse_jax.fields, the project's one set of field rules; `validate` applies them."""
  method: str = fields.choice(METHODS, default="greedy")
  max_new_tokens: int = fields.integer(lo=1, default=64)
  min_new_tokens: int = fields.integer(lo=0, default=0)  # and <= max_new_tokens
  num_beams: int = fields.integer(lo=1, default=1)
  temperature: float = fields.number(lo=0.0, lo_open=True, default=1.0)
  top_k: int = fields.integer(lo=0, why="0: off", default=0)
  top_p: float = fields.number(0.0, 1.0, lo_open=True, default=1.0)  # 1: off
  repetition_penalty: float = fields.number(lo=0.0, lo_open=True, default=1.0)  # 1: off
  length_penalty: float = fields.number(default=1.0)
  early_stopping: bool | str = fields.choice(tuple(EARLY_STOPPING), default=False)  # HF's True, False or "never"

  def validate(self, prompt_len: int | None = None, cache_len: int | None = None) -> None:
    """Raises a one-line ConfigError naming the field (`DecodeConfig.top_p must be in (0, 1], got 0`), with
    prompt_len and cache_len also if a prompt and its new tokens overrun the model's cache."""
    fields.check(self, "DecodeConfig")
    if self.min_new_tokens > self.max_new_tokens:
      raise ConfigError(f"DecodeConfig.min_new_tokens must be an integer in [0, max_new_tokens="
                        f"{self.max_new_tokens}], got {self.min_new_tokens!r}")
    if prompt_len is not None and cache_len is not None and prompt_len + self.max_new_tokens > cache_len:
      raise ConfigError(f"prompt length {prompt_len} + DecodeConfig.max_new_tokens={self.max_new_tokens} exceeds "
                        f"the model's cache length {cache_len}")


# The paper's LM experiment: every 64-token block continued by 64 new tokens, 5 beams, repetition penalty 3.
PAPER = DecodeConfig(method="beam", max_new_tokens=64, min_new_tokens=64, num_beams=5, repetition_penalty=3.0)


def _repeat_rows(cache, k: int):
  return jax.tree.map(lambda x: x if x.ndim == 0 else jnp.repeat(x, k, axis=0), cache)


def _gather_rows(cache, rows_R):
  return jax.tree.map(lambda x: x if x.ndim == 0 else x[rows_R], cache)


@dataclasses.dataclass(frozen=True)
class LM:
  """What decoding needs of a causal LM. apply(params, ids_BxL, mask_BxL, cache) -> (float32 logits_BxLxV,
  cache) writes the L new tokens into the cache (decoding reads only the last position's logits, so apply may
  return just those, Bx1xV: OPT does, sparing the prefill's LM head over every prompt token); init_cache(batch,
  length) preallocates one. beam_cache(prompt cache, num_beams, new_tokens) -> the cache the beams step with
  (rows b * K + k); reorder(cache, rows_R) picks rows after each beam step (rows_R stays within each prompt's
  beams); with shares_prompt the prompt cache has the prompt's slots only. grow(cache, slots) -> the cache with
  `slots` slots, the new ones empty: greedy/sampling then prefill the prompt's slots only (the prefill attends
  over P slots, not P + new tokens) and grow the cache once. Instances are jit-static: build them once (e.g.
  `opt_lm(cfg)` is cached)."""
  apply: Callable
  init_cache: Callable
  vocab_size: int
  max_len: int
  eos_token_id: int | None
  pad_token_id: int
  beam_cache: Callable = lambda cache, k, new: _repeat_rows(cache, k)
  reorder: Callable = _gather_rows
  shares_prompt: bool = False  # beam_cache keeps the prompt's cache once per prompt: prefill only P slots
  grow: Callable | None = None


@functools.lru_cache(maxsize=None)
def opt_lm(cfg) -> LM:
  """collapse_jax.families.lm.model as an LM (cached per OPTConfig, so jitted programs are reused)."""
  from collapse_jax.families.lm import kv_cache
  from collapse_jax.families.lm import model as opt

  return LM(apply=lambda params, ids, mask, cache: opt.apply(cfg, params, ids, mask, cache=cache, last_only=True),
            init_cache=functools.partial(opt.init_cache, cfg), vocab_size=cfg.vocab_size,
            max_len=cfg.max_position_embeddings, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
            beam_cache=kv_cache.share_prefix, reorder=kv_cache.reorder_copies, shares_prompt=True,
            grow=kv_cache.grow_cache)


# --- one batch ---------------------------------------------------------------------------------------------------

class SampleState(NamedTuple):
  """Greedy / sampling's while_loop carry once tokens 0 .. t - 1 are chosen."""
  t: jax.Array                  # () int32: the step the next body call takes
  tok_B: jax.Array              # int32: each row's last token, the next step's input
  cache: Any                    # the LM's cache, holding every token before tok_B
  seen_BxV: jax.Array | None    # bool: tokens each row has seen (the repetition penalty's); None when it is off
  done_B: jax.Array             # bool: rows past EOS (they emit pad_token_id)
  tokens_BxN: jax.Array         # int32: the new tokens so far, pad_token_id from t on


class BeamState(NamedTuple):
  """Beam search's while_loop carry once steps 0 .. t - 1 are taken: per prompt b, K running beams (cache rows
  b * K + k) and the K best finished hypotheses (HF's BeamHypotheses)."""
  t: jax.Array                  # () int32: the step the next body call takes
  run_seq_BxKxN: jax.Array      # int32: running beams' new tokens, pad_token_id from t on
  run_score_BxK: jax.Array      # float32: their summed processed log-probabilities, best first (NEG: dummy beam)
  fin_seq_BxKxN: jax.Array      # int32: finished hypotheses' new tokens
  fin_score_BxK: jax.Array      # float32: their length-penalised scores, best first (NEG: an empty slot)
  fin_BxK: jax.Array            # bool: slots that hold a finished hypothesis
  open_B: jax.Array             # bool: prompts whose best running beam may still beat a finished one (HF's ~done)
  cache: Any                    # the LM's cache of the running beams, rows b * K + k
  seen_RxV: jax.Array | None    # bool: tokens each running beam has seen; None when the penalty is off
  go: jax.Array                 # () bool: some prompt is open, some candidate runs on, early stopping allows


def _prefill(lm: LM, cfg: DecodeConfig, params, ids_BxP, mask_BxP, slots: int):
  b, p = ids_BxP.shape
  cache = lm.init_cache(b, slots)
  logits_BxPxV, cache = lm.apply(params, ids_BxP, mask_BxP, cache)
  seen_BxV = warp.seen_tokens(ids_BxP, mask_BxP, lm.vocab_size) if cfg.repetition_penalty != 1.0 else None
  return logits_BxPxV[:, -1].astype(jnp.float32), cache, seen_BxV  # left padding: the last slot is real


def _sample_parts(lm: LM, cfg: DecodeConfig, kn, params, ids_BxP, mask_BxP, keys_B):
  """Greedy or sampling. Finished rows (after EOS) emit pad_token_id, as HF."""
  b, n, p = ids_BxP.shape[0], cfg.max_new_tokens, ids_BxP.shape[1]
  logits_BxV, cache, seen_BxV = _prefill(lm, cfg, params, ids_BxP, mask_BxP, p if lm.grow else p + n)
  cache = lm.grow(cache, p + n) if lm.grow else cache

  def choose(t, logits_BxV, seen_BxV, done_B):
    scores_BxV = warp.ban_eos(kn, warp.penalise(kn, logits_BxV, seen_BxV), t)
    if cfg.method == "greedy":
      tok_B = jnp.argmax(scores_BxV, axis=-1)
    else:
      tok_B = warp.draw(cfg, kn, jax.vmap(lambda k: jax.random.fold_in(k, t))(keys_B), scores_BxV)
    tok_B = jnp.where(done_B, lm.pad_token_id, tok_B).astype(jnp.int32)
    return tok_B, warp.mark(seen_BxV, tok_B), done_B | (tok_B == kn["eos"])

  tokens_BxN = jnp.full((b, n), lm.pad_token_id, jnp.int32)
  tok_B, seen_BxV, done_B = choose(0, logits_BxV, seen_BxV, jnp.zeros((b,), bool))
  first = SampleState(jnp.ones((), jnp.int32), tok_B, cache, seen_BxV, done_B, tokens_BxN.at[:, 0].set(tok_B))

  def body(s: SampleState) -> SampleState:
    logits_Bx1xV, cache = lm.apply(params, s.tok_B[:, None], jnp.ones((b, 1), jnp.int32), s.cache)
    tok_B, seen_BxV, done_B = choose(s.t, logits_Bx1xV[:, 0].astype(jnp.float32), s.seen_BxV, s.done_B)
    return SampleState(s.t + 1, tok_B, cache, seen_BxV, done_B,
                       jax.lax.dynamic_update_slice(s.tokens_BxN, tok_B[:, None], (0, s.t)))

  def cond(s: SampleState):
    return (s.t < n) & ~jnp.all(s.done_B)

  def finish(s: SampleState) -> dict:
    return {"tokens": s.tokens_BxN, "scores": jnp.zeros((b,), jnp.float32)}

  return first, body, cond, finish


def _take(x_BxK, idx_BxJ):
  """x[b, idx[b, j]] for arrays of any trailing shape."""
  return jax.vmap(lambda x, i: x[i])(x_BxK, idx_BxJ)


def _beam_parts(lm: LM, cfg: DecodeConfig, kn, params, ids_BxP, mask_BxP):
  """HF's beam search (do_sample=False), one step per loop iteration; returns the best finished hypothesis."""
  b, k, n, v = ids_BxP.shape[0], cfg.num_beams, cfg.max_new_tokens, lm.vocab_size
  lp, es = kn["length_penalty"], kn["early_stopping"]
  p = ids_BxP.shape[1]
  logits_BxV, cache, seen_BxV = _prefill(lm, cfg, params, ids_BxP, mask_BxP, p if lm.shares_prompt else p + n)
  top_k_mask_2K = jnp.arange(2 * k) < k  # only the best K candidates may become finished hypotheses

  def step(s: BeamState, logits_RxV) -> BeamState:
    """Step s.t from the running beams' next-token logits: the next state, its cache rows reordered."""
    t = s.t
    logp_RxV = warp.ban_eos(kn, warp.penalise(kn, jax.nn.log_softmax(logits_RxV, axis=-1), s.seen_RxV), t)
    acc_BxKV = (logp_RxV.reshape(b, k, v) + s.run_score_BxK[:, :, None]).reshape(b, k * v)
    cand_score_Bx2K, cand_idx_Bx2K = jax.lax.top_k(acc_BxKV, 2 * k)
    parent_Bx2K, tok_Bx2K = cand_idx_Bx2K // v, (cand_idx_Bx2K % v).astype(jnp.int32)
    cand_seq_Bx2KxN = jax.lax.dynamic_update_slice(_take(s.run_seq_BxKxN, parent_Bx2K), tok_Bx2K[:, :, None],
                                                   (0, 0, t))
    hits_Bx2K = (tok_Bx2K == kn["eos"]) | (t + 1 >= n)
    # Running beams: the best K candidates that did not just stop.
    run_cand_Bx2K = cand_score_Bx2K + hits_Bx2K.astype(jnp.float32) * NEG
    keep_BxK = jax.lax.top_k(run_cand_Bx2K, k)[1]
    # Finished hypotheses: merge the stopping top-K candidates (length-penalised) into the K kept so far.
    did_Bx2K = hits_Bx2K & top_k_mask_2K
    fin_cand_Bx2K = cand_score_Bx2K / ((t + 1).astype(jnp.float32) ** lp)
    full_Bx1 = jnp.all(s.fin_BxK, axis=-1, keepdims=True) & (es == ES_TRUE)
    fin_cand_Bx2K += full_Bx1.astype(jnp.float32) * NEG
    fin_cand_Bx2K += (~s.open_B).astype(jnp.float32)[:, None] * NEG
    fin_cand_Bx2K += (~did_Bx2K).astype(jnp.float32) * NEG
    merged_Bx3K = jnp.concatenate([s.fin_score_BxK, fin_cand_Bx2K], axis=1)
    best_BxK = jax.lax.top_k(merged_Bx3K, k)[1]
    run_score_BxK = _take(run_cand_Bx2K, keep_BxK)
    fin_score_BxK = _take(merged_Bx3K, best_BxK)
    fin_BxK = _take(jnp.concatenate([s.fin_BxK, did_Bx2K], axis=1), best_BxK)
    # HF's early-stop heuristic: can the best running beam still beat the worst finished one?
    best_len = jnp.where((es == ES_NEVER) & (lp > 0), float(n), (t + 1).astype(jnp.float32))
    best_run_Bx1 = run_score_BxK[:, :1] / best_len**lp
    worst_BxK = jnp.where(fin_BxK, jnp.min(fin_score_BxK, axis=1, keepdims=True), NEG)
    open_B = s.open_B & jnp.any(best_run_Bx1 > worst_BxK, axis=-1)
    go = jnp.any(open_B) & ~jnp.all(hits_Bx2K) & ~(jnp.all(fin_BxK) & (es == ES_TRUE))
    rows_R = (jnp.arange(b)[:, None] * k + _take(parent_Bx2K, keep_BxK)).reshape(-1)
    seen_RxV = None if s.seen_RxV is None else warp.mark(s.seen_RxV[rows_R], _take(tok_Bx2K, keep_BxK).reshape(-1))
    return BeamState(t=t + 1, run_seq_BxKxN=_take(cand_seq_Bx2KxN, keep_BxK), run_score_BxK=run_score_BxK,
                     fin_seq_BxKxN=_take(jnp.concatenate([s.fin_seq_BxKxN, cand_seq_Bx2KxN], axis=1), best_BxK),
                     fin_score_BxK=fin_score_BxK, fin_BxK=fin_BxK, open_B=open_B,
                     cache=lm.reorder(s.cache, rows_R), seen_RxV=seen_RxV, go=go)

  empty_BxKxN = jnp.full((b, k, n), lm.pad_token_id, jnp.int32)
  start = BeamState(
      t=jnp.zeros((), jnp.int32), run_seq_BxKxN=empty_BxKxN,
      run_score_BxK=jnp.tile(jnp.where(jnp.arange(k) == 0, 0.0, NEG).astype(jnp.float32), (b, 1)),
      fin_seq_BxKxN=empty_BxKxN, fin_score_BxK=jnp.full((b, k), NEG, jnp.float32), fin_BxK=jnp.zeros((b, k), bool),
      open_B=jnp.ones((b,), bool), cache=lm.beam_cache(cache, k, n),
      seen_RxV=None if seen_BxV is None else jnp.repeat(seen_BxV, k, axis=0), go=jnp.ones((), bool))
  first = step(start, jnp.repeat(logits_BxV, k, axis=0))

  def body(s: BeamState) -> BeamState:
    tok_R = s.run_seq_BxKxN.reshape(b * k, n)[:, s.t - 1]
    logits_Rx1xV, cache = lm.apply(params, tok_R[:, None], jnp.ones((b * k, 1), jnp.int32), s.cache)
    return step(s._replace(cache=cache), logits_Rx1xV[:, 0].astype(jnp.float32))

  def cond(s: BeamState):
    return (s.t < n) & s.go

  def finish(s: BeamState) -> dict:
    return {"tokens": s.fin_seq_BxKxN[:, 0], "scores": s.fin_score_BxK[:, 0]}

  return first, body, cond, finish


def knobs(lm: LM, cfg: DecodeConfig, eos_token_id: int | None | str = "model") -> dict:
  """The values a compiled program takes as arguments (changing them does not recompile)."""
  eos = lm.eos_token_id if eos_token_id == "model" else eos_token_id
  return {"temperature": np.float32(cfg.temperature), "top_p": np.float32(cfg.top_p),
          "repetition_penalty": np.float32(cfg.repetition_penalty), "length_penalty": np.float32(cfg.length_penalty),
          "min_new_tokens": np.int32(cfg.min_new_tokens), "eos": np.int32(-1 if eos is None else eos),
          "early_stopping": np.int32(EARLY_STOPPING[cfg.early_stopping])}


def static(cfg: DecodeConfig) -> DecodeConfig:
  """cfg with its knobs at canonical values: what a compiled program depends on (method, lengths, beams, top-k,
  and whether top-p and the repetition penalty are on at all)."""
  return dataclasses.replace(cfg, temperature=1.0, top_p=0.5 if cfg.top_p < 1.0 else 1.0, min_new_tokens=0,
                             repetition_penalty=2.0 if cfg.repetition_penalty != 1.0 else 1.0,
                             length_penalty=1.0, early_stopping=False)


def generate_batch(lm: LM, cfg: DecodeConfig, params, ids_BxP, mask_BxP, keys_B=None, kn=None):
  """One batch, traceable (call inside jit): {"tokens": [B, max_new_tokens] int32, "scores": [B] (beam search:
  HF's sequences_scores; else 0)}. keys_B: one key per row (sampling only); kn: `knobs(...)`, by default from
  cfg and the LM's EOS. Prompts are left-padded."""
  state, body, cond, finish = loop_parts(lm, cfg, params, ids_BxP, mask_BxP, keys_B, kn)
  return finish(jax.lax.while_loop(cond, body, state))


def loop_parts(lm: LM, cfg: DecodeConfig, params, ids_BxP, mask_BxP, keys_B=None, kn=None):
  """One batch's decoding as (state after the prefill and first token: a SampleState or BeamState, body: one more
  token, cond, finish: state -> generate_batch's result); generate_batch runs body in a while_loop. Apart, they
  let a planner cost the prefill and one step (XLA's cost analysis counts a loop body once)."""
  kn = knobs(lm, cfg) if kn is None else kn
  cfg = static(cfg)
  if cfg.method == "beam":
    return _beam_parts(lm, cfg, kn, params, ids_BxP, mask_BxP)
  return _sample_parts(lm, cfg, kn, params, ids_BxP, mask_BxP, keys_B)


# --- a corpus ----------------------------------------------------------------------------------------------------

def check(lm: LM, cfg: DecodeConfig, ids_NxP, mask_NxP, batch_size: int, mesh=None, key=None) -> None:
  """Every ConfigError decode_corpus can raise, from shapes alone: nothing is traced or compiled."""
  shape = getattr(ids_NxP, "shape", None)
  if shape is None or len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
    raise ConfigError(f"prompt ids must be a non-empty [rows, length] array, got shape {shape}")
  if getattr(mask_NxP, "shape", None) != shape:
    raise ConfigError(f"prompt mask shape {getattr(mask_NxP, 'shape', None)} must equal the ids' shape {shape}")
  cfg.validate(prompt_len=shape[1], cache_len=lm.max_len)
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
  if mesh is not None:
    if batch_size % sharding.batch_shards(mesh):
      raise ConfigError(f"batch_size={batch_size} is not a multiple of the mesh's {sharding.batch_shards(mesh)} "
                        "batch shards")
  if cfg.method == "sample" and key is None:
    raise ConfigError("DecodeConfig.method='sample' needs a key")


@functools.lru_cache(maxsize=None)
def _program(lm: LM, cfg: DecodeConfig, mesh):
  constrain = lambda x: x  # noqa: E731
  if mesh is not None:
    constrain = functools.partial(jax.lax.with_sharding_constraint, shardings=sharding.batch_sharding(mesh))

  def run(params, ids_MxBxP, mask_MxBxP, key, kn):
    bs = ids_MxBxP.shape[1]

    def one(args):
      i, ids_BxP, mask_BxP = args
      keys_B = jax.vmap(lambda r: jax.random.fold_in(key, r))(i * bs + jnp.arange(bs))
      out = generate_batch(lm, cfg, params, constrain(ids_BxP), constrain(mask_BxP), keys_B, kn)
      real_B = jnp.any(mask_BxP > 0, axis=1)  # the last batch's filler rows are empty
      new_tokens = jnp.sum((out["tokens"] != lm.pad_token_id) & real_B[:, None])
      progress.report("decode", i, ids_MxBxP.shape[0], tag=key, unit="batch",
                      amounts={"prompts": jnp.sum(real_B), "new tok": new_tokens})
      return jax.tree.map(constrain, out)

    return jax.lax.map(one, (jnp.arange(ids_MxBxP.shape[0]), ids_MxBxP, mask_MxBxP))

  return jax.jit(run if mesh is None else sharding.on_mesh(run, mesh))


def decode_corpus(lm: LM, params, ids_NxP, mask_NxP, cfg: DecodeConfig, key=None, *, batch_size: int,
                  mesh=None, eos_token_id: int | None | str = "model") -> dict:
  """Every row of a left-padded corpus continued by cfg.max_new_tokens tokens in one compiled program: rows are
  cut into batches of batch_size (the last one filled with empty rows), lax.map runs the batches, each split over
  the mesh's batch axes; eos_token_id overrides the LM's (None: no EOS), as generate's argument. Returns
  {"tokens": [N, max_new_tokens], "scores": [N]} on device."""
  check(lm, cfg, ids_NxP, mask_NxP, batch_size, mesh, key)
  ids = ops.to_chunks(jnp.asarray(ids_NxP, jnp.int32), batch_size, fill=lm.pad_token_id)
  mask = ops.to_chunks(jnp.asarray(mask_NxP, jnp.int32), batch_size)
  if mesh is not None:
    where = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, sharding.batch_axes(mesh)))
    ids, mask = jax.device_put(ids, where), jax.device_put(mask, where)
  key = jax.random.key(0) if key is None else key
  out = _program(lm, static(cfg), mesh)(params, ids, mask, key, knobs(lm, cfg, eos_token_id))
  return ops.from_chunks(out, ids_NxP.shape[0])
