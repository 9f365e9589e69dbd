"""The LM's side of plan mode (collapse_jax/plan.py): its inputs as abstract shapes (no weights, no data read when
the config gives the block counts) and its one-step programs, each with how often a generation runs it.

XLA's cost analysis counts a loop body once (an epoch's scan reports one step, decoding its prefill and one
token), so the planner compiles single steps and counts them: a training step of batch_size blocks (epochs x
steps per epoch, over the generation with the largest training set), an evaluation chunk of eval_batch blocks
(validation perplexity each epoch, test perplexity, the training blocks scored by generation 0), and per decoding
batch the prefill with the first token and one more token (max_new_tokens - 1 times). Textbook FLOPs per call
(for the MFU) from sizes.flops_per_token: training 6N + attention per token, a forward pass a third of that.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp

from collapse_jax import ops, plan, regimes, sharding
from collapse_jax.families.lm import decode
from collapse_jax.families.lm import train as lm_train
from collapse_jax.families.lm import kv_cache
from collapse_jax.families.lm import model as opt_model
from collapse_jax.families.lm import sizes


def abstract_shared(fam) -> dict:
  """The family's shared arrays as ShapeDtypeStructs: the initial parameters' shapes (no weights read) and the
  blocks, by the counts load_data found (fam.counts)."""
  n_train, n_valid, n_test = fam.counts
  L, i32 = fam.c.block_len, jnp.int32
  out = {"init": jax.eval_shape(lambda: opt_model.init_params(fam.model_cfg, jax.random.PRNGKey(0))),
         "train": jax.ShapeDtypeStruct((n_train, L), i32), "valid": jax.ShapeDtypeStruct((n_valid, L), i32),
         "test": jax.ShapeDtypeStruct((n_test, L), i32), "prompts": jax.ShapeDtypeStruct((fam.c.text_samples, L), i32)}
  if fam.markov:
    from collapse_jax.families.lm import markov
    m = fam.c.markov
    out["source"] = jax.eval_shape(lambda: markov.make_source(m.vocab, m.branching, m.zipf_exponent, m.seed,
                                                              m.concentration))
  return out


def _decode_spec(x, mesh):
  if x.ndim == len(kv_cache.KV_AXES):
    return sharding.logical_spec(kv_cache.KV_AXES, x.shape, mesh)
  if x.ndim and x.shape[0] % sharding.batch_shards(mesh) == 0:
    return jax.sharding.PartitionSpec(sharding.batch_axes(mesh))
  return jax.sharding.PartitionSpec()


def _placed(shape_tree, sharding_tree):
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shape_tree, sharding_tree)


def step_programs(fam, exp) -> list:
  """plan.Step per program of one generation (the one with the largest training set); a scanned model's steps
  carry 1- and 2-layer unrolled probes for XLA's counts."""
  real = _programs(fam, exp, fam.model_cfg)
  if not fam.model_cfg.scan_layers:
    return [plan.Step(*s) for s in real]
  probes = [_programs(fam, exp, dataclasses.replace(fam.model_cfg, num_layers=n, scan_layers=False)) for n in (1, 2)]
  return [plan.Step(*s, probes=((p1[2], p1[3]), (p2[2], p2[3]), fam.model_cfg.num_layers))
          for s, p1, p2 in zip(real, *probes)]


def _programs(fam, exp, mcfg) -> list[tuple]:
  """(name, phase, jitted fn, abstract args, count, model FLOPs per call) of each step, for model config mcfg."""
  c, mesh, L = fam.c, fam.mesh, fam.c.block_len
  n_train, n_valid, n_test = fam.counts
  rep, bs = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  params = jax.eval_shape(lambda: opt_model.init_params(mcfg, jax.random.PRNGKey(0)))
  per_token = sizes.flops_per_token(fam.model_cfg, L)
  steps = []

  # Training: the largest training set of the run, its valid rows batched.
  rows = max(regimes.train_sizes(exp.spec, exp.counts))
  B = fam.tcfg.batch_size
  tx = lm_train.make_optimizer(fam.tcfg, 1)
  state = jax.eval_shape(lambda p: lm_train.TrainState(jnp.zeros((), jnp.int32), p, tx.init(p),
                                                       jax.random.PRNGKey(0)), params)
  state_sh = lm_train.state_shardings(params, state.opt_state, mesh)
  p_sh = state_sh.params
  batch = {k: jax.ShapeDtypeStruct((B, L), jnp.int32, sharding=bs) for k in ("ids", "mask")}
  train = jax.jit(sharding.on_mesh(lambda s, b: lm_train.train_step(s, b, model_cfg=mcfg, tx=tx), mesh),
                  out_shardings=(state_sh, rep), donate_argnums=0)
  steps.append(("train step", "train", train, (_placed(state, state_sh), batch),
                c.epochs * lm_train.steps_per_epoch(rows, B), per_token * B * L))

  # Evaluation: validation each epoch, test once, this generation's training blocks under generation 0.
  # Each set is cut into chunks of its own size (ops.chunk_size); the program is costed at the largest, and
  # the count is the rows evaluated in units of it.
  sets = [(n_valid, c.epochs), (n_test, 1), (rows, 1)]
  chunk_rows = [ops.chunk_size(n, c.eval_batch, sharding.batch_shards(mesh)) for n, _ in sets]
  E = max(chunk_rows)
  chunk = {k: jax.ShapeDtypeStruct((E, L), jnp.int32, sharding=bs) for k in ("ids", "mask")}
  evaluate = jax.jit(sharding.on_mesh(lambda p, b: lm_train.eval_step(p, b, model_cfg=mcfg), mesh),
                     out_shardings=rep)
  chunks = math.ceil(sum(times * math.ceil(n / e) * e for (n, times), e in zip(sets, chunk_rows)) / E)
  steps.append(("eval chunk", "eval", evaluate, (_placed(params, p_sh), chunk), chunks, per_token / 3 * E * L))

  # Decoding: every prompt (samples.n of them, and the fixed text prompts) in batches of decode_batch.
  D, dcfg = c.decode_batch, fam.dcfg
  lm = decode.opt_lm(mcfg)
  n_batches = math.ceil((exp.run.samples.n + c.text_samples) / D)
  kn = decode.knobs(lm, dcfg)
  ids = jax.ShapeDtypeStruct((D, L), jnp.int32, sharding=bs)
  keys = jax.ShapeDtypeStruct((D, 2), jnp.uint32, sharding=bs)  # threefry key data, one per row

  def parts(p, i, m, k):
    return decode.loop_parts(lm, dcfg, p, i, m, jax.random.wrap_key_data(k), kn)

  start = jax.jit(sharding.on_mesh(lambda p, i, m, k: parts(p, i, m, k)[0], mesh))
  start_args = (_placed(params, p_sh), ids, ids, keys)
  # The loop state placed as decoding places it: K/V split over heads and rows, per-row arrays over the batch axes.
  shapes = jax.eval_shape(start, *start_args)
  state_sh = jax.tree.map(lambda x: jax.sharding.NamedSharding(mesh, _decode_spec(x, mesh)), shapes)
  state = _placed(shapes, state_sh)
  body = jax.jit(sharding.on_mesh(lambda p, i, m, k, s: parts(p, i, m, k)[1](s), mesh), donate_argnums=4,
                 out_shardings=state_sh)
  rows_d = D * (dcfg.num_beams if dcfg.method == "beam" else 1)
  new = dcfg.max_new_tokens
  fwd = sizes.flops_per_token(fam.model_cfg, L + new // 2) / 3  # a token's forward at the mean context length
  steps.append(("decode prefill + token 1", "decode", start, start_args, n_batches, per_token / 3 * D * L))
  steps.append(("decode token", "decode", body, (*start_args, state), n_batches * (new - 1), fwd * rows_d))
  return steps
