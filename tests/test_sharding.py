"""Meshes and shardings: the 1-D 'data' mesh the Gaussian/GMM/VAE families use, and the LM's 2-D ('data',
'fsdp') mesh with logical-axis rules; a sharded LM epoch equals the single-device one."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from collapse_jax import lm_train, sharding
from collapse_jax.models import opt


def test_1d_mesh_unchanged():
  mesh = sharding.make_mesh(4)
  assert mesh.axis_names == (sharding.AXIS,) and mesh.devices.size == 4
  assert mesh.axis_types == (AxisType.Auto,)
  assert sharding.leading(mesh).spec == P("data") and sharding.replicated(mesh).spec == P()
  assert sharding.pad_to_mesh(5, mesh) == 8 and sharding.pad_to_mesh(8, mesh) == 8
  # The batch helpers read the 1-D mesh as 'data' only (no 'fsdp' axis to split over).
  assert sharding.batch_axes(mesh) == ("data",) and sharding.batch_shards(mesh) == 4
  assert sharding.logical_spec(("embed", "mlp"), (32, 64), mesh) == P(None, None)


def test_2d_mesh_and_batch_sharding():
  mesh = sharding.make_mesh_2d(4, 2)
  assert mesh.axis_names == ("data", "fsdp") and dict(mesh.shape) == {"data": 4, "fsdp": 2}
  assert mesh.axis_types == (AxisType.Auto, AxisType.Auto)
  assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp")) and sharding.batch_shards(mesh) == 8
  x = jax.device_put(jnp.arange(16.0).reshape(8, 2), sharding.batch_sharding(mesh))
  assert {s.data.shape for s in x.addressable_shards} == {(1, 2)}
  with pytest.raises(ValueError, match="needs 16 devices"):
    sharding.make_mesh_2d(8, 2)


@pytest.mark.parametrize("names,shape,want", [
    (("vocab", "embed"), (50272, 768), P("fsdp", None)),   # 50272 = 2^5 * 1571: splits over 2
    (("vocab", "embed"), (50273, 768), P(None, "fsdp")),   # an odd vocabulary leaves the split to "embed"
    (("embed", "mlp"), (32, 64), P("fsdp", None)),         # one mesh axis per array: "mlp" stays whole
    (("mlp",), (64,), P("fsdp")),                           # a bias without "embed" still gets split
    (("embed",), (5,), P(None)),                            # not divisible: replicated, not an error
    (("heads", "kv"), (3, 4), P(None, None)),               # "kv" is never split
    (("embed", "heads", "kv"), (7, 4, 8), P(None, "fsdp", None)),
])
def test_logical_spec_rules(names, shape, want):
  assert sharding.logical_spec(names, shape, sharding.make_mesh_2d(4, 2)) == want


def test_opt_state_mirrors_param_shardings():
  mesh = sharding.make_mesh_2d(2, 2)
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


def _epoch(tcfg, cfg, params, blocks, mesh):
  state, state_sh, tx = lm_train.setup(tcfg, cfg, params, blocks["ids"].shape[0], jax.random.key(7), mesh)
  blocks = jax.device_put(blocks, sharding.replicated(mesh))
  return lm_train.epoch_program(tcfg, cfg, tx, state_sh, mesh)(state, blocks, jnp.int32(0))


@pytest.fixture(scope="module")
def reference_epoch():
  # Dropout on: the sharded run must draw the same masks as the single-device one.
  cfg = opt.get_size("tiny", vocab_size=64, hidden_size=32, num_heads=2, ffn_dim=64, max_position_embeddings=16,
                     dropout=0.1, dtype="float32")
  params = opt.init_params(cfg, jax.random.key(0))
  # 40 blocks in batches of 16: three steps, the last half masked.
  blocks = lm_train.as_blocks(_markov_blocks(40, 8, 64, 0))
  blocks["mask"][3, 5:] = 0
  tcfg = lm_train.TrainConfig(lr=1e-3, end_lr=1e-4, batch_size=16, epochs=1, weight_decay=0.01, verbose=False)
  return tcfg, cfg, params, blocks, _epoch(tcfg, cfg, params, blocks, sharding.make_mesh_2d(1, 1))


@pytest.mark.parametrize("data,fsdp", [(4, 2), (8, 1)])
def test_sharded_epoch_equals_single_device(reference_epoch, data, fsdp):
  tcfg, cfg, params, blocks, (ref_state, ref_m) = reference_epoch
  mesh = sharding.make_mesh_2d(data, fsdp)
  state, m = _epoch(tcfg, cfg, params, blocks, mesh)
  # Tolerance: float32 sums over 8 shards in another order; Adam's first steps move each weight by about lr
  # (1e-3) whatever the gradient's size, so 1e-5 absolute on weights of scale 0.02 is a tight bound.
  np.testing.assert_allclose(m["loss"], ref_m["loss"], rtol=1e-5)
  for got, want in zip(jax.tree.leaves((state.params, state.opt_state)), jax.tree.leaves((ref_state.params,
                                                                                          ref_state.opt_state))):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)
  assert int(state.step) == 3
  # Parameters and both Adam moments are really split over 'fsdp' (every dimension of this model is even).
  axes = opt.logical_axes(params)
  adam = state.opt_state[0]
  split = 0
  for names, p, mu, nu in zip(jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple)),
                              jax.tree.leaves(state.params), jax.tree.leaves(adam.mu), jax.tree.leaves(adam.nu)):
    want = sharding.logical_spec(names, p.shape, mesh)
    assert p.sharding.spec == mu.sharding.spec == nu.sharding.spec == want
    if fsdp > 1:
      assert "fsdp" in want, names
      assert p.addressable_shards[0].data.size * fsdp == p.size
      split += 1
  assert split == (len(jax.tree.leaves(state.params)) if fsdp > 1 else 0)
