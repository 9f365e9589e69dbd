"""Checkpoints: the stored layout (one array per dtype) round-trips bit for bit, onto another mesh too, and saves
are asynchronous (the next chunk starts while the previous save is still being written)."""
import threading

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from collapse_jax import checkpoint, loop, sharding
from tests.helpers import load_config


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(x, y)


def test_host_pack_round_trips_bit_for_bit():
  rng = np.random.default_rng(0)
  tree = {"metrics": {"b": rng.normal(size=(5, 3)).astype(np.float32), "a": rng.normal(size=(5, 3)).astype(np.float32)},
          "arrays": {"hist": rng.integers(0, 9, size=(5, 4)).astype(np.int32), "none": np.zeros((5, 0), np.float32)},
          "snapshots": rng.normal(size=(2, 7, 1)).astype(np.float32), "next_gen": np.asarray(3, np.int64)}
  packed = checkpoint.pack_host(tree)
  assert sorted(packed) == ["float32", "int32", "int64"]  # one array per dtype; the empty leaf stores nothing
  like = jax.tree.map(np.zeros_like, tree)
  back = checkpoint.unpack_host(packed, like)
  _assert_trees_equal(back, tree)
  back["metrics"]["a"][0, 0] = 7.0  # the loop writes the restored history in place: writable, no view
  assert not (packed["float32"] == 7.0).any()


def _carry(mesh, n):
  lead = sharding.leading(mesh)
  tree = {"x": jnp.arange(n * 6, dtype=jnp.float32).reshape(n, 3, 2) / 7, "n": jnp.arange(n, dtype=jnp.int32) * 3,
          "ok": jnp.arange(n) % 3 == 0, "key": jax.vmap(lambda c: jax.random.fold_in(jax.random.PRNGKey(1), c))(
              jnp.arange(n)), "empty": jnp.zeros((n, 0), jnp.float32), "y": -jnp.ones((n,), jnp.float32)}
  shards = jax.tree.map(lambda _: lead, tree)
  return jax.device_put(tree, shards), shards


def test_chain_packer_round_trips_through_async_checkpoints_onto_another_mesh(tmp_path):
  carry8, sh8 = _carry(sharding.make_mesh(8), 8)
  shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), carry8)
  assert checkpoint.ChainPacker.applies(shapes, sh8)
  p8 = checkpoint.ChainPacker(shapes, sh8)
  assert sorted(p8.abstract) == ["bool", "float32", "int32", "uint32"]
  ck = checkpoint.Checkpoints(str(tmp_path), keep=2)
  ck.save(1, {"carry": p8.pack(carry8)})
  ck.close()
  _, sh2 = _carry(sharding.make_mesh(2), 8)
  p2 = checkpoint.ChainPacker(shapes, sh2)
  ck = checkpoint.Checkpoints(str(tmp_path), keep=2)
  step, state = ck.restore_latest({"carry": p2.abstract})
  ck.close()
  assert step == 1
  back = p2.unpack(state["carry"])
  _assert_trees_equal(back, carry8)
  assert all(a.sharding == s for a, s in zip(jax.tree.leaves(back), jax.tree.leaves(sh2)))


def test_saves_are_asynchronous_the_next_chunk_starts_before_the_save_is_done(tmp_path, monkeypatch):
  """Each save's completion (Orbax's finalize step) is held until the chunk after it has started: an
  asynchronous save lets the loop reach that chunk; a synchronous one would wait for its own completion first
  (the hold then ends by its timeout and the order below is wrong). The timeout only turns that deadlock into a
  failure; nothing here depends on speed."""
  log, lock, released = [], threading.Lock(), {}
  events = {}
  event = lambda step: events.setdefault(step, threading.Event())

  finalize = ocp.CheckpointManager._finalize

  def held_finalize(self, step, *a, **k):
    released[step] = event(step).wait(timeout=10)
    with lock:
      log.append(("saved", step))
    return finalize(self, step, *a, **k)

  close = checkpoint.Checkpoints.close

  def closing(self):  # the last save has no next chunk: closing releases it
    for s in range(0, 100):
      event(s).set()
    close(self)

  chunk_fn = loop.Experiment.chunk_fn

  def spied_chunk_fn(self):
    fn = chunk_fn(self)

    def spy(carry, gs, shared):
      if isinstance(gs, np.ndarray):  # a real call, not jax.eval_shape's trace
        with lock:
          log.append(("chunk", int(gs[0])))
        event(int(gs[0])).set()
      return fn(carry, gs, shared)
    return spy

  monkeypatch.setattr(ocp.CheckpointManager, "_finalize", held_finalize)
  monkeypatch.setattr(checkpoint.Checkpoints, "close", closing)
  monkeypatch.setattr(loop.Experiment, "chunk_fn", spied_chunk_fn)
  cfg = load_config("gaussian", "100", generations=12, chains=3, checkpoint_every=4, plots=False,
                    checkpoint_min_seconds=0)
  loop.run(cfg, str(tmp_path / "run"))
  assert log == [("chunk", 0), ("chunk", 4), ("saved", 4), ("chunk", 8), ("saved", 8), ("saved", 12)], log
  assert released == {4: True, 8: True, 12: True}
