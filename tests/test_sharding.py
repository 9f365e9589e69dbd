"""Meshes and shardings: the 1-D 'data' mesh the Gaussian/GMM/VAE families use, and the LM's 2-D ('data',
'fsdp') mesh with logical-axis rules; a sharded LM training step equals the single-device one within float32 bounds."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from collapse_jax import ops, sharding
from collapse_jax.families.lm import train as lm_train
from collapse_jax.families.lm import model as opt
from collapse_jax.families.lm import sizes
from tests.helpers import U32, adam_interval, check_adam, grad_bound, inside, names, token_grads


def test_1d_mesh_unchanged():
  mesh = sharding.make_mesh(4)
  assert mesh.axis_names == (sharding.AXIS,) and mesh.devices.size == 4
  assert mesh.axis_types == (AxisType.Auto,)
  assert sharding.leading(mesh).spec == P("data") and sharding.replicated(mesh).spec == P()
  assert sharding.pad_to_mesh(5, mesh) == 8 and sharding.pad_to_mesh(8, mesh) == 8
  # The batch helpers read the 1-D mesh as 'data' only (no 'fsdp' axis to split over).
  assert sharding.batch_axes(mesh) == ("data",) and sharding.batch_shards(mesh) == 4
  assert sharding.logical_spec(("embed", "mlp"), (32, 64), mesh) == P(None, None)


def test_lm_mesh_and_batch_sharding():
  mesh = sharding.make_lm_mesh(2, 2, 2)
  assert mesh.axis_names == ("data", "fsdp", "tensor") and dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert mesh.axis_types == (AxisType.Auto,) * 3
  # The batch never splits over 'tensor': its devices hold the same rows (and different heads).
  assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp")) and sharding.batch_shards(mesh) == 4
  x = jax.device_put(jnp.arange(16.0).reshape(8, 2), sharding.batch_sharding(mesh))
  assert {s.data.shape for s in x.addressable_shards} == {(2, 2)}
  with pytest.raises(ValueError, match="needs 16 devices"):
    sharding.make_lm_mesh(4, 2, 2)


@pytest.mark.parametrize("mesh_shape,names,shape,fill,want", [
    ((4, 2, 1), ("vocab", "embed"), (50272, 768), (), P(None, "fsdp")),  # size-1 axes are never named
    ((4, 2, 1), ("vocab", "embed"), (50272, 767), (), P("fsdp", None)),  # an odd width leaves it to "vocab"
    ((4, 2, 1), ("embed", "mlp"), (32, 64), (), P("fsdp", None)),        # one use of a mesh axis per array
    ((4, 2, 1), ("mlp",), (64,), (), P("fsdp")),                          # a bias without "embed" still splits
    ((4, 2, 1), ("embed",), (5,), (), P(None)),                           # not divisible: replicated, no error
    ((4, 2, 1), ("heads", "kv"), (3, 4), (), P(None, None)),              # "kv" is never split
    ((4, 2, 1), ("embed", "heads", "kv"), (7, 4, 8), (), P(None, "fsdp", None)),
    # Megatron's layout under 'tensor': q/k/v column-parallel by heads, out_proj row-parallel, FSDP on embed.
    ((2, 2, 2), ("embed", "heads", "kv"), (2048, 32, 64), (), P("fsdp", "tensor", None)),
    ((2, 2, 2), ("heads", "kv", "embed"), (32, 64, 2048), (), P("tensor", None, "fsdp")),
    ((2, 2, 2), ("embed", "mlp"), (2048, 8192), (), P("fsdp", "tensor")),
    ((2, 2, 2), ("vocab", "embed"), (8192, 2048), (), P("tensor", "fsdp")),
    ((2, 2, 2), ("batch", None, "heads", "kv"), (8, 5, 32, 64), (), P(("data", "fsdp"), None, "tensor", None)),
    # Parameters fill: no byte left replicated over fsdp x tensor where a dimension divides (never "layers").
    ((2, 2, 2), ("layers", "mlp"), (2, 8192), sharding.PARAM_AXES, P(None, ("tensor", "fsdp"))),
    ((2, 2, 2), ("layers", "embed"), (8, 2048), sharding.PARAM_AXES, P(None, ("fsdp", "tensor"))),
    ((1, 4, 2), ("position", "embed"), (130, 2048), sharding.PARAM_AXES, P(None, ("fsdp", "tensor"))),
])
def test_logical_spec_rules(mesh_shape, names, shape, fill, want):
  assert sharding.logical_spec(names, shape, sharding.make_lm_mesh(*mesh_shape), fill=fill) == want


def test_opt_state_mirrors_param_shardings():
  mesh = sharding.make_lm_mesh(2, 2)
  params = {"w": jax.ShapeDtypeStruct((4, 6), jnp.float32), "b": jax.ShapeDtypeStruct((5,), jnp.float32)}
  axes = {"w": ("embed", "mlp"), "b": ("embed",)}
  p_sh = sharding.param_shardings(params, axes, mesh)
  assert p_sh["w"].spec == P("fsdp", None) and p_sh["b"].spec == P(None)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
  state = jax.eval_shape(tx.init, params)
  o_sh = sharding.opt_state_shardings(state, params, p_sh, mesh)
  adam = o_sh[1][0]
  assert adam.mu["w"].spec == adam.nu["w"].spec == P("fsdp", None)
  assert adam.mu["b"].spec == P(None) and adam.count.spec == P()
  # Every leaf of the state has a sharding: the trees line up for jit's out_shardings.
  assert jax.tree.structure(o_sh) == jax.tree.structure(state)


def _markov_blocks(n, length, vocab, seed):
  rng = np.random.default_rng(seed)
  x = np.zeros((n, length), np.int32)
  x[:, 0] = rng.integers(0, vocab, n)
  for t in range(1, length):
    x[:, t] = np.where(rng.random(n) < 0.8, (x[:, t - 1] * 5 + 1) % vocab, rng.integers(0, vocab, n))
  return x


# A sharded step and a single-device one compute the same function in another float32 order (per-shard batch
# shapes compile to other loop orders, and the shards' sums are added in another order), so nothing after Adam is
# bitwise reproducible: Adam's early steps are ~lr * sign(g), so a gradient that is rounding noise (a key bias's,
# which softmax's shift invariance makes exactly 0) moves its weight by +-lr either way. What is invariant, and
# checked here step by step from the same state: the loss and the gradient within a float32 summation bound, and
# Adam's update within the interval the update rule maps that gradient bound to.
B, N_BLOCKS, L = 16, 12, 8  # one step per epoch; the batch's last 4 rows are the epoch's masked remainder
CAPTURE = optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p),
                                       lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g))  # state := grads


@pytest.fixture(scope="module")
def setting():
  # Dropout on: the sharded step must draw the same masks as the single-device one.
  cfg = sizes.get_size("tiny", vocab_size=64, hidden_size=32, num_heads=2, ffn_dim=64, max_position_embeddings=16,
                     dropout=0.1, dtype="float32")
  params = opt.init_params(cfg, jax.random.key(0))
  blocks = lm_train.as_blocks(_markov_blocks(N_BLOCKS, L, 64, 0))
  blocks["mask"][3, 5:] = 0
  tcfg = lm_train.TrainConfig(lr=1e-3, end_lr=1e-4, batch_size=B, epochs=2, weight_decay=0.01, verbose=False)
  state0, _, _ = lm_train.setup(tcfg, cfg, params, N_BLOCKS, jax.random.key(7), sharding.make_lm_mesh(1, 1))
  # Epoch 0 from the fresh state (Adam's moments 0), epoch 1 from the single-device state after it (moments not 0).
  single = sharding.make_lm_mesh(1, 1)
  states = [jax.tree.map(np.asarray, state0)]
  states.append(jax.tree.map(np.asarray, _epoch(tcfg, cfg, states[0], blocks, 0, single)[0]))
  refs = []
  for e, state in enumerate(states):
    g, m = _epoch(tcfg, cfg, state, blocks, e, single, CAPTURE)
    g = jax.tree.map(lambda a: np.asarray(a, np.float64), g.opt_state)
    jac = _per_token_grads(cfg, state, blocks, e)
    tau = grad_bound(jac)
    for name, a, j, t in zip(names(g), jax.tree.leaves(g), jax.tree.leaves(jac), jax.tree.leaves(tau)):
      # The per-token terms sum to the gradient: the bound is this function's.
      inside(name + " (sum of per-token terms)", j.sum(-1), (a - t, a + t))
    lo, hi = jax.tree.map(lambda g, t: g - t, g, tau), jax.tree.map(lambda g, t: g + t, g, tau)
    box = adam_interval(tcfg, state, lo, hi, tcfg.epochs * lm_train.steps_per_epoch(N_BLOCKS, B))
    # The single-device step lies in the interval too: a check of the interval's arithmetic against optax.
    check_adam(_epoch(tcfg, cfg, state, blocks, e, single)[0], state, box, "single device")
    refs.append({"grads": g, "loss": float(m["loss"]), "tokens": float(m["tokens"]), "tau": tau, "box": box})
  return tcfg, cfg, blocks, states, refs


_PROGRAMS = {}


def _epoch(tcfg, cfg, state, blocks, e, mesh, tx=None):
  """lm_train's epoch program on `mesh` from a host copy of `state` (one step here); tx=CAPTURE: the gradients."""
  capture = tx is CAPTURE
  if capture:
    state = state._replace(opt_state=jax.tree.map(np.zeros_like, state.params))
  state_sh = lm_train.state_shardings(state.params, state.opt_state, mesh)
  rep = sharding.replicated(mesh)
  key = (tuple(mesh.shape.items()), capture)  # one compilation per mesh and optimizer, for both epochs
  if key not in _PROGRAMS:
    tx = tx or lm_train.make_optimizer(tcfg, tcfg.epochs * lm_train.steps_per_epoch(N_BLOCKS, B))
    _PROGRAMS[key] = lm_train.epoch_program(tcfg, cfg, tx, state_sh, mesh)
  return _PROGRAMS[key](jax.device_put(state, state_sh), jax.device_put(blocks, rep), jnp.int32(e))


def _per_token_grads(cfg, state, blocks, e):
  """d(loss)/d(params) of each (row, target) token of epoch e's batch, float32, in float64: the N terms whose sum
  is the gradient. The batch, its order, masks and dropout key are rebuilt as lm_train.train_epoch draws them."""
  key = jnp.asarray(state.key)
  order = ops.permutation_valid_first(jax.random.fold_in(jax.random.fold_in(key, lm_train.SHUFFLE), e),
                                      jnp.ones(N_BLOCKS, bool))
  order, keep = jnp.pad(order, (0, B - N_BLOCKS)), (jnp.arange(B) < N_BLOCKS).astype(jnp.int32)
  ids, mask = jnp.asarray(blocks["ids"])[order], jnp.asarray(blocks["mask"])[order] * keep[:, None]
  drop = jax.random.fold_in(jax.random.fold_in(key, lm_train.DROPOUT), state.step)
  return token_grads(cfg, state.params, ids, mask, drop)


@pytest.mark.parametrize("epoch", [0, 1])
@pytest.mark.parametrize("data,fsdp", [(4, 2), (8, 1)])
def test_sharded_step_equals_single_device(setting, data, fsdp, epoch):
  tcfg, cfg, blocks, states, refs = setting
  state, ref = states[epoch], refs[epoch]
  mesh = sharding.make_lm_mesh(data, fsdp)
  # 1. Loss and gradient before the optimizer: the same within float32 summation bounds.
  g, m = _epoch(tcfg, cfg, state, blocks, epoch, mesh, CAPTURE)
  # The token count is a sum of 0/1 weights, exact in float32 far past these sizes.
  assert float(m["tokens"]) == ref["tokens"] == float((blocks["mask"][:, 1:] * blocks["mask"][:, :-1]).sum())
  # loss = (sum of N positive per-token NLLs) / count: two orders of the sum differ by <= 2 gamma_N * loss; each
  # NLL's log-sum-exp over 64 logits adds <= gamma_64 relative (the logits are O(1), the NLLs O(log 64)).
  n = B * (L - 1) + 64
  np.testing.assert_allclose(float(m["loss"]), ref["loss"], rtol=2 * n * U32 / (1 - n * U32))
  for name, a, b, t in zip(names(ref["grads"]), jax.tree.leaves(g.opt_state), jax.tree.leaves(ref["grads"]),
                           jax.tree.leaves(ref["tau"])):
    inside(name, a, (b - t, b + t))
  # 2. Adam's step from the same state: params and moments inside the interval the update rule maps
  # [g - tau, g + tau] to.
  out, _ = _epoch(tcfg, cfg, state, blocks, epoch, mesh)
  check_adam(out, state, ref["box"], str(dict(mesh.shape)))
  # 3. Parameters and both Adam moments are really split over 'fsdp' (every dimension of this model is even).
  adam = out.opt_state[0]
  axes = opt.logical_axes(state.params)
  split = 0
  for logical, p, mu, nu in zip(jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple)),
                                jax.tree.leaves(out.params), jax.tree.leaves(adam.mu), jax.tree.leaves(adam.nu)):
    want = sharding.logical_spec(logical, p.shape, mesh)
    assert p.sharding.spec == mu.sharding.spec == nu.sharding.spec == want
    if fsdp > 1:
      assert "fsdp" in want, logical
      assert p.addressable_shards[0].data.size * fsdp == p.size
      split += 1
  assert split == (len(jax.tree.leaves(out.params)) if fsdp > 1 else 0)
