"""OPT at opt-1.3b's width (hidden 2048, 32 heads, ffn 8192; 2 layers, a 4096-token vocabulary) on 8 simulated
devices: a training step and 5-beam decoding under (fsdp 8), (fsdp 4 x tensor 2) and (data 2 x fsdp 2 x tensor 2)
equal the single-device results, the parameters and Adam's moments are split 1/8 per device over fsdp x tensor,
and rematerialisation does not change the gradients.

Tolerance (training): a sharded step computes the same function in another float32 order: the batch's per-token
gradient terms are summed in another order (<= 2 gamma_N sum_t |J_t| per coordinate) and, under 'tensor', the
row-parallel contractions (out_proj over heads, fc2 over the MLP's units, the LM head's over the vocabulary's
shards) add partial sums in another order, which the per-token term's own bound (2 gamma_k times the layer's
largest magnitude, k = 8192 the widest contraction) covers: helpers.grad_bound, from sums of |J_t| accumulated
without storing the N terms (helpers.token_grad_sums). Adam's first step maps that gradient interval to a
parameter interval (helpers.adam_first_interval). Decoding: tokens equal exactly; the token table is drawn 25x
wider than OPT's init (std 0.5) so that logits are O(10) apart at the top, far beyond float32 rounding, and no
beam choice is a near tie.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from collapse_jax import sharding
from collapse_jax.families.lm import decode
from collapse_jax.families.lm import train as lm_train
from collapse_jax.families.lm import model as opt
from helpers import U32, adam_first_interval, bound_from_sums, inside, names, token_grad_sums

CFG = opt.OPTConfig(vocab_size=4096, hidden_size=2048, num_layers=2, num_heads=32, ffn_dim=8192,
                    max_position_embeddings=64, word_embed_proj_dim=2048, dropout=0.1, dtype="float32")
MESHES = [(1, 8, 1), (1, 4, 2), (2, 2, 2)]
B, L, LR = 8, 4, 1e-3
CAPTURE = optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p),
                                       lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g))  # state := grads


def _step(state, batch, mesh, tx, model_cfg=CFG):
  """lm_train.train_step jitted for the mesh (state and batch placed as the trainer places them)."""
  sh = lm_train.state_shardings(state.params, state.opt_state, mesh)
  fn = jax.jit(sharding.on_mesh(lambda s, b: lm_train.train_step(s, b, model_cfg=model_cfg, tx=tx), mesh),
               in_shardings=(sh, sharding.batch_sharding(mesh)), out_shardings=(sh, sharding.replicated(mesh)))
  return fn(jax.device_put(state, sh), jax.device_put(batch, sharding.batch_sharding(mesh)))


@pytest.fixture(scope="module")
def setting():
  params = jax.tree.map(np.asarray, opt.init_params(CFG, jax.random.key(0)))
  rng = np.random.default_rng(0)
  batch = {"ids": rng.integers(3, CFG.vocab_size, (B, L)).astype(np.int32), "mask": np.ones((B, L), np.int32)}
  batch["mask"][1, 3:] = 0
  key = jax.random.key_data(jax.random.key(7))
  tx = optax.adamw(LR, weight_decay=0.0)
  state = lm_train.TrainState(np.int32(0), params, tx.init(params), np.asarray(key))
  grad_state = state._replace(opt_state=jax.tree.map(np.zeros_like, params))
  single = sharding.make_lm_mesh(1, 1, 1)
  ref_g, ref_m = _step(grad_state, batch, single, CAPTURE)
  drop = jax.random.fold_in(jax.random.fold_in(jnp.asarray(key), lm_train.DROPOUT), 0)
  sums, total, n = token_grad_sums(CFG, params, batch["ids"], batch["mask"], drop)
  tau = bound_from_sums(sums, n, k=CFG.ffn_dim)
  g = jax.tree.map(lambda a: np.asarray(a, np.float64), ref_g.opt_state)
  for name, a, s, t in zip(names(g), jax.tree.leaves(g), jax.tree.leaves(total), jax.tree.leaves(tau)):
    inside(name + " (sum of per-token terms)", s, (a - t, a + t))  # the bound is this step's
  return state, grad_state, batch, tx, g, tau, float(ref_m["loss"])


@pytest.mark.parametrize("data,fsdp,tensor", MESHES)
def test_train_step_sharded_equals_single_device(setting, data, fsdp, tensor):
  state, grad_state, batch, tx, g_ref, tau, loss_ref = setting
  mesh = sharding.make_lm_mesh(data, fsdp, tensor)
  g, m = _step(grad_state, batch, mesh, CAPTURE)
  n = B * (L - 1) + CFG.vocab_size  # the loss's sum over tokens and each token's log-sum-exp
  np.testing.assert_allclose(float(m["loss"]), loss_ref, rtol=2 * n * U32 / (1 - n * U32))
  for name, a, b, t in zip(names(g_ref), jax.tree.leaves(g.opt_state), jax.tree.leaves(g_ref), jax.tree.leaves(tau)):
    inside(f"{name} {dict(mesh.shape)}", np.asarray(a, np.float64), (b - t, b + t))
  out, _ = _step(state, batch, mesh, tx)
  lo, hi = zip(*[adam_first_interval(p, b - t, b + t, LR) for p, b, t in
                 zip(jax.tree.leaves(state.params), jax.tree.leaves(g_ref), jax.tree.leaves(tau))])
  for name, p, a, b in zip(names(g_ref), jax.tree.leaves(out.params), lo, hi):
    inside(f"{name} after Adam {dict(mesh.shape)}", np.asarray(p, np.float64), (a, b))
  # Each device holds 1/(fsdp x tensor) of every parameter and of both Adam moments, read off the arrays: 1/8 on
  # (fsdp 8) and (fsdp 4 x tensor 2); 'data' holds replicas (its devices split the batch, not the weights).
  adam = out.opt_state[0]
  for tree in (out.params, adam.mu, adam.nu):
    for leaf in jax.tree.leaves(tree):
      held = {d: 0 for d in mesh.devices.flat}
      for shard in leaf.addressable_shards:
        held[shard.device] += shard.data.nbytes
      assert set(held.values()) == {leaf.nbytes // (fsdp * tensor)}, (leaf.shape, leaf.sharding.spec)


@pytest.mark.parametrize("policy", ["dots", "full"])
def test_remat_gives_the_same_gradients(setting, policy):
  """Recomputing activations in the backward pass changes no gradient beyond the step's float32 bound (remat may
  fuse differently, so the order of sums may change)."""
  _, grad_state, batch, _, g_ref, tau, loss_ref = setting
  single = sharding.make_lm_mesh(1, 1, 1)
  g, m = _step(grad_state, batch, single, CAPTURE, dataclasses.replace(CFG, remat=policy))
  for name, a, b, t in zip(names(g_ref), jax.tree.leaves(g.opt_state), jax.tree.leaves(g_ref), jax.tree.leaves(tau)):
    inside(f"{name} remat={policy}", np.asarray(a, np.float64), (b - t, b + t))
  # And it is really on: the step keeps fewer activations for the backward pass.
  def temps(cfg):
    fn = jax.jit(lambda s, b: lm_train.train_step(s, b, model_cfg=cfg, tx=CAPTURE))
    return fn.lower(grad_state, batch).compile().memory_analysis().temp_size_in_bytes
  assert temps(dataclasses.replace(CFG, remat=policy)) < temps(CFG)


def test_beam_search_sharded_equals_single_device(setting):
  params = dict(setting[0].params, embed_tokens=np.asarray(
      jax.random.normal(jax.random.key(1), (CFG.vocab_size, CFG.hidden_size)) * 0.5, np.float32))
  lm = decode.opt_lm(dataclasses.replace(CFG, dropout=0.0))
  rng = np.random.default_rng(1)
  ids, mask = rng.integers(3, CFG.vocab_size, (8, 6)).astype(np.int32), np.ones((8, 6), np.int32)
  mask[2, :2] = 0  # one left-padded prompt
  dcfg = decode.DecodeConfig(method="beam", num_beams=5, max_new_tokens=6, min_new_tokens=6, repetition_penalty=3.0)
  want = decode.decode_corpus(lm, params, ids, mask, dcfg, batch_size=8, mesh=sharding.make_lm_mesh(1, 1, 1))
  for shape in MESHES:
    mesh = sharding.make_lm_mesh(*shape)
    p_sh = sharding.param_shardings(params, opt.logical_axes(params), mesh)
    got = decode.decode_corpus(lm, jax.device_put(params, p_sh), ids, mask, dcfg, batch_size=8, mesh=mesh)
    np.testing.assert_array_equal(np.asarray(got["tokens"]), np.asarray(want["tokens"]), err_msg=str(shape))
