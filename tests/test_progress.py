"""collapse_jax/progress.py: lines from inside compiled programs. A tiny OPT (tests/test_lm_train.py's) trained by
lm_train.train and continued by decode.decode_corpus, on one device and on a 4 x 2 mesh: every step and batch
is printed exactly once with interval 0, only the first and last with a long interval, outputs are bit-identical
with progress off; per-device callbacks (shard_map) are deduplicated; only process 0 prints; a bad interval in
the environment is refused."""
import contextlib
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from collapse_jax import progress, sharding
from collapse_jax.families.lm import decode
from collapse_jax.families.lm import train as lm_train
from collapse_jax.errors import ConfigError
from collapse_jax.families.lm import model as opt
from collapse_jax.families.lm import sizes

V = 32
TRAIN_RE = re.compile(r"^\[lm train\] epoch (\d+)/(\d+) step (\d+)/(\d+) ")
DECODE_RE = re.compile(r"^\[decode\] batch (\d+)/(\d+) ")
TOY_RE = re.compile(r"^\[toy\] epoch (\d+)/(\d+) step (\d+)/(\d+) ")


@contextlib.contextmanager
def captured(every: float):
  lines, old = [], progress.SINK
  progress.SINK = lines.append
  try:
    with progress.every(every):
      yield lines
  finally:
    progress.SINK = old


def _counters(lines, pattern):
  return [tuple(int(g) for g in m.groups()) for m in map(pattern.match, lines) if m]


def _tiny():
  cfg = sizes.get_size("tiny", vocab_size=V, hidden_size=32, num_heads=2, ffn_dim=64, max_position_embeddings=16,
                     dropout=0.0, dtype="float32")
  rng = np.random.default_rng(0)
  return cfg, opt.init_params(cfg, jax.random.key(0)), rng.integers(0, V, (20, 8)).astype(np.int32), \
      rng.integers(0, V, (8, 8)).astype(np.int32)


# 20 blocks in batches of 8 for 2 epochs: 3 steps an epoch; 20 prompts in batches of 8: 3 decode batches.
TCFG = lm_train.TrainConfig(lr=1e-3, end_lr=1e-4, batch_size=8, epochs=2, eval_batch=8, verbose=False)
DCFG = decode.DecodeConfig(method="greedy", max_new_tokens=4)
ALL_STEPS = [(e, 2, s, 3) for e in (1, 2) for s in (1, 2, 3)]


@functools.lru_cache(maxsize=None)
def _epoch_program(mesh_shape):
  """lm_train's jitted epoch for the mesh, built once so the tests share its compilation."""
  mesh = sharding.make_lm_mesh(*mesh_shape)
  cfg, params, train_x, _ = _tiny()
  _, state_sh, tx = lm_train.setup(TCFG, cfg, params, len(train_x), jax.random.key(1), mesh)
  return mesh, cfg, lm_train.epoch_program(TCFG, cfg, tx, state_sh, mesh)


def _train_and_decode(mesh_shape):
  """lm_train's epochs as its train() runs them, then every block's first 4 tokens continued."""
  mesh, cfg, epoch_fn = _epoch_program(mesh_shape)
  _, params, train_x, _ = _tiny()
  state = lm_train.setup(TCFG, cfg, params, len(train_x), jax.random.key(1), mesh)[0]
  blocks = jax.device_put(lm_train.as_blocks(train_x), sharding.replicated(mesh))
  losses = []
  for e in range(TCFG.epochs):
    state, m = epoch_fn(state, blocks, jnp.int32(e))
    losses.append(float(m["loss"]))
  prompts = train_x[:, :4]
  out = decode.decode_corpus(decode.opt_lm(cfg), state.params, prompts, np.ones_like(prompts), DCFG, batch_size=8,
                             mesh=mesh)
  return jax.tree.map(np.asarray, state.params), losses, np.asarray(out["tokens"])


@pytest.mark.parametrize("mesh_shape", [(1, 1), (4, 2)])
def test_every_step_and_batch_printed_once(mesh_shape):
  with captured(0) as lines:
    _train_and_decode(mesh_shape)
  assert _counters(lines, TRAIN_RE) == ALL_STEPS, lines
  assert _counters(lines, DECODE_RE) == [(1, 3), (2, 3), (3, 3)], lines
  train = [ln for ln in lines if TRAIN_RE.match(ln)]
  assert re.search(r"\(6/6, 100%\)  loss \d\.\d+  [\d.e+]+ step/s  [\d.e+]+ tok/s$", train[-1]), train[-1]
  assert re.search(r"ETA \d:\d\d:\d\d$", train[-2]), train[-2]


def test_long_interval_prints_first_and_last_only():
  with captured(1e9) as lines:
    _train_and_decode((1, 1))
  assert _counters(lines, TRAIN_RE) == [ALL_STEPS[0], ALL_STEPS[-1]], lines
  assert _counters(lines, DECODE_RE) == [(1, 3), (3, 3)], lines


def _recompile():
  jax.clear_caches()  # ENABLED acts when tracing: drop every program traced under the other setting
  decode._program.cache_clear()


def test_outputs_bit_identical_with_progress_off(monkeypatch):
  with captured(0) as lines:
    p_on, loss_on, tok_on = _train_and_decode((1, 1))
  assert lines
  monkeypatch.setattr(progress, "ENABLED", False)
  _recompile()
  try:
    with captured(0) as lines:
      p_off, loss_off, tok_off = _train_and_decode((1, 1))
  finally:
    monkeypatch.undo()
    _recompile()
  assert lines == []
  for a, b in zip(jax.tree.leaves(p_on), jax.tree.leaves(p_off)):
    np.testing.assert_array_equal(a, b)
  assert loss_on == loss_off
  np.testing.assert_array_equal(tok_on, tok_off)


# --- the host side on a toy program ---------------------------------------------------------------------------


def _toy(steps=4, epochs=2):
  def run(key):
    def body(c, es):
      progress.report("toy", es[1], steps, epoch=es[0], epochs=epochs, tag=key, amounts={"things": 2.0})
      return c, None
    e_X, s_X = jnp.divmod(jnp.arange(steps * epochs), steps)
    return jax.lax.scan(body, jnp.zeros(()), (e_X, s_X))[0]
  return run


def test_per_device_calls_print_each_step_once():
  """Under shard_map every device runs the callback: 8 calls a step, one line."""
  mesh = sharding.make_mesh(8)
  toy = _toy()
  f = jax.jit(jax.shard_map(lambda x, key: x + toy(key), mesh=mesh, in_specs=(P(sharding.AXIS), P()),
                            out_specs=P(sharding.AXIS)))
  calls = []
  with captured(0) as lines:
    real = progress._on_report
    with pytest.MonkeyPatch.context() as mp:
      mp.setattr(progress, "_on_report", lambda *a: (calls.append(1), real(*a)))
      jax.clear_caches()
      jax.block_until_ready(f(jnp.zeros(8), jax.random.key(0)))
      jax.block_until_ready(f(jnp.zeros(8), jax.random.key(0)))  # a rerun with the same key prints again
  assert len(calls) == 2 * 8 * 8, len(calls)
  want = [(e, 2, s, 4) for e in (1, 2) for s in (1, 2, 3, 4)]
  assert _counters(lines, TOY_RE) == want + want, lines
  assert re.search(r" [\d.e+]+ things/s", lines[1]), lines[1]


def test_new_key_is_a_new_run_and_only_process_0_prints(monkeypatch):
  f = jax.jit(_toy(steps=3, epochs=1))
  with captured(1e9) as lines:
    f(jax.random.key(0)).block_until_ready()
    f(jax.random.key(1)).block_until_ready()
  assert _counters(lines, TOY_RE) == [(1, 1, 1, 3), (1, 1, 3, 3)] * 2, lines
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  with captured(0) as lines:
    f(jax.random.key(2)).block_until_ready()
  assert lines == []


@pytest.mark.parametrize("text", ["abc", "-1", "nan"])
def test_bad_interval_env_is_refused(monkeypatch, text):
  monkeypatch.setenv("COLLAPSE_JAX_PROGRESS_EVERY", text)
  with pytest.raises(ConfigError, match=r"^COLLAPSE_JAX_PROGRESS_EVERY must be a number of seconds >= 0, got "):
    progress._every_from_env()
  monkeypatch.setenv("COLLAPSE_JAX_PROGRESS_EVERY", "0")
  assert progress._every_from_env() == 0.0
