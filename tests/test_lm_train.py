"""The LM trainer: loss and perplexity against hand computations, two AdamW steps against a hand-run of the update,
the epoch's shuffle and remainder, learning on a Markov source (fp32 and bf16), best-on-validation selection, and
bad input refused before compilation. A tiny OPT on tiny corpora, one device (the sharded runs: test_sharding.py).
lm_train.train runs lm_train.fit, the function the LM family runs each generation (test_lm.py checks it there).
"""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from collapse_jax import sharding
from collapse_jax.families.lm import loss as lm_loss
from collapse_jax.families.lm import train as lm_train
from collapse_jax.errors import ConfigError
from collapse_jax.families.lm import model as opt
from collapse_jax.families.lm import sizes
from tests import helpers

V = 32


def _cfg(**kw):
  base = dict(vocab_size=V, hidden_size=32, num_heads=2, ffn_dim=64, max_position_embeddings=16, dropout=0.0,
              dtype="float32")
  return sizes.get_size("tiny", **{**base, **kw})


def _transitions(strength: float, skew: float = 0.0) -> np.ndarray:
  """Row a: most mass on one successor (a * 5 + 3) % V, a little on every token, `skew` extra on tokens 0-3."""
  T = np.full((V, V), 0.02)
  T[np.arange(V), (np.arange(V) * 5 + 3) % V] += strength
  T[:, :4] += skew
  return T / T.sum(1, keepdims=True)


def _chain(T, n, length, rng) -> np.ndarray:
  x = np.zeros((n, length), np.int32)
  x[:, 0] = rng.integers(0, V, n)
  for t in range(1, length):
    cdf = np.cumsum(T[x[:, t - 1]], axis=1)
    x[:, t] = np.minimum((rng.random(n)[:, None] > cdf).sum(1), V - 1)
  return x


def _hand_nll(logits_BxLxV, ids_BxL, mask_BxL):
  """Summed next-token NLL and count, written independently: position t predicts ids[t + 1]."""
  nll, count = 0.0, 0.0
  for t in range(ids_BxL.shape[1] - 1):
    lse_B = jax.scipy.special.logsumexp(logits_BxLxV[:, t], axis=-1)
    picked_B = jnp.take_along_axis(logits_BxLxV[:, t], ids_BxL[:, t + 1, None], axis=-1)[:, 0]
    w_B = mask_BxL[:, t] * mask_BxL[:, t + 1]
    nll, count = nll + jnp.sum((lse_B - picked_B) * w_B), count + jnp.sum(w_B)
  return nll, count


# --- loss, perplexity, schedule -------------------------------------------------------------------------------------


def test_token_nll_shift_and_mask():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(3, 6, V)), jnp.float32)
  ids = jnp.asarray(rng.integers(0, V, (3, 6)), jnp.int32)
  mask = jnp.ones((3, 6), jnp.int32).at[1, 4:].set(0).at[2, 0].set(0)
  nll, count = lm_loss.token_nll(logits, ids, mask)
  want_nll, want_count = _hand_nll(logits, ids, mask)
  assert float(count) == 15 - 2 - 1 == float(want_count)
  # float32, 13 terms of O(5) + logsumexp over V: gamma(13) ~ 8e-7 of sum|terms| / nll ~ 1: rtol 1e-6 is at the
  # worst case (random walk ~2e-7); judged at risk.
  np.testing.assert_allclose(nll, want_nll, rtol=1e-6)


def test_token_nll_gradient_is_autodiffs():
  """token_nll's hand-written backward (softmax - one-hot, one pass) against autodiff of the hand NLL; the last
  position (predicts nothing) and masked tokens get zero gradient, even where their logits would overflow exp."""
  rng = np.random.default_rng(4)
  logits = jnp.asarray(rng.normal(size=(3, 6, V)) * 4, jnp.float32).at[0, -1, 0].set(1e4).at[1, 5, 3].set(-1e4)
  ids = jnp.asarray(rng.integers(0, V, (3, 6)), jnp.int32)
  mask = jnp.ones((3, 6), jnp.int32).at[1, 4:].set(0).at[2, 0].set(0)
  got = jax.grad(lambda l: lm_loss.token_nll(l, ids, mask)[0])(logits)
  want = jax.grad(lambda l: _hand_nll(l, ids, mask)[0])(logits)
  # float32 softmax - onehot vs autodiff of logsumexp: a few roundings of values <= 1, ~4 u = 2.4e-7 relative.
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  assert not np.asarray(got[:, -1]).any() and not np.asarray(got[1, 4:]).any()
  assert np.isfinite(np.asarray(got)).all()


def test_perplexity_batched_equals_one_pass():
  cfg = _cfg()
  params = opt.init_params(cfg, jax.random.key(1))
  blocks = lm_train.as_blocks(_chain(_transitions(3.0), 7, 8, np.random.default_rng(1)))
  blocks["mask"][2, 6:] = 0
  # 7 blocks in batches of 3: the third batch is padded with masked rows, which must count for nothing.
  ppl = jax.jit(functools.partial(lm_train.perplexity, model_cfg=cfg, eval_batch=3))(params, blocks)
  logits = jax.jit(functools.partial(opt.apply, cfg))(params, blocks["ids"], blocks["mask"])
  nll, count = jax.jit(_hand_nll)(logits, blocks["ids"], blocks["mask"])
  assert float(count) == 7 * 7 - 2
  # float32 sums of 47 NLLs (~log V) in batches of 3 vs one pass: 2 gamma(47) ~ 6e-6 relative < 1e-5.
  np.testing.assert_allclose(ppl, math.exp(float(nll) / float(count)), rtol=1e-5)


def test_schedule_over_a_traced_step_count():
  """A ragged buffer's schedule ends at its valid steps (a traced count): the static schedule of that length to
  float rounding; a full buffer's (valid == total) is the static one exactly."""
  tcfg = lm_train.TrainConfig(lr=2e-3, end_lr=1e-5, warmup_steps=3)
  counts = jnp.arange(16)
  ragged = jax.jit(lambda v: jax.vmap(lm_train.schedule(tcfg, 30, v))(counts))
  # 1 + cos(x) near x = pi cancels: compared to 1e-6 of the peak learning rate.
  np.testing.assert_allclose(ragged(jnp.int32(13)), jax.vmap(lm_train.schedule(tcfg, 13))(counts), rtol=1e-6,
                             atol=1e-6 * tcfg.lr)
  # In one program (another program may fuse, and round, the static one differently): measured, the traced
  # arithmetic alone differs from the static schedule at 6 of these 16 counts.
  full, static = jax.jit(lambda v: (jax.vmap(lm_train.schedule(tcfg, 30, v))(counts),
                                    jax.vmap(lm_train.schedule(tcfg, 30))(counts)))(jnp.int32(30))
  np.testing.assert_array_equal(full, static)


def test_schedule_hand_values():
  tcfg = lm_train.TrainConfig(lr=2e-5, end_lr=1e-6, warmup_steps=10)
  s = lm_train.schedule(tcfg, 110)
  assert float(s(0)) == 0.0
  np.testing.assert_allclose(float(s(5)), 1e-5, rtol=1e-6)  # float32, a few ops: ~4 u = 2.4e-7
  for t in (10, 35, 60, 109, 110):
    want = 1e-6 + (2e-5 - 1e-6) * 0.5 * (1 + math.cos(math.pi * (t - 10) / 100))
    # float32 cosine: its argument's rounding u * pi enters 1 + cos near t = 110 via the end_lr floor: <= 1e-5.
    np.testing.assert_allclose(float(s(t)), want, rtol=1e-5)
  assert lm_train.TrainConfig() == lm_train.TrainConfig(lr=2e-5, end_lr=1e-6, batch_size=128, epochs=5)


# --- one step ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weight_decay,clip", [(0.1, 0.0), (0.0, 0.05)])
def test_two_steps_match_hand_adamw(weight_decay, clip):
  cfg = _cfg()
  params = opt.init_params(cfg, jax.random.key(2))
  rng = np.random.default_rng(2)
  batch = {"ids": jnp.asarray(rng.integers(0, V, (4, 8)), jnp.int32),
           "mask": jnp.ones((4, 8), jnp.int32).at[3, 6:].set(0)}
  # eps 1e-4, not 1e-8: Adam's step is lr * g / (|g| + eps), and where |g| is near a tiny eps the float32
  # rounding of g (the jitted step's reductions vs the hand run's) would move an update by ~1e-3 of a step.
  tcfg = lm_train.TrainConfig(lr=1e-2, end_lr=1e-3, weight_decay=weight_decay, grad_clip=clip, batch_size=4,
                              epochs=2, eps=1e-4)
  # 12 blocks in batches of 4 for 2 epochs: the cosine runs over 6 steps.
  state, _, tx = lm_train.setup(tcfg, cfg, params, 12, jax.random.key(0), sharding.make_lm_mesh(1, 1))
  step = jax.jit(functools.partial(lm_train.train_step, model_cfg=cfg, tx=tx))
  state1, m1 = step(state, batch)
  state2, _ = step(state1, batch)

  @jax.jit
  def loss(p):
    nll, count = _hand_nll(opt.apply(cfg, p, batch["ids"], batch["mask"]), batch["ids"], batch["mask"])
    return nll / count

  assert int(state2.step) == 2
  sched = lm_train.schedule(tcfg, 6)  # the cosine from lr to end_lr over the 6 steps, by hand
  for t in range(6):
    assert float(sched(t)) == pytest.approx(1e-3 + (1e-2 - 1e-3) * 0.5 * (1 + math.cos(math.pi * t / 6)), rel=1e-6)

  # float32, two programs: a mean of 31 NLLs (~log V), 2 gamma(31) ~ 4e-6 worst case > 1e-6, ~2 sqrt(31) u ~ 7e-7
  # as a random walk: judged at risk.
  np.testing.assert_allclose(m1["loss"], loss(params), rtol=1e-6)
  # Each step against AdamW by hand from the program's own state before it, in interval arithmetic
  # (helpers.adam_interval): the gradient is the sum of the per-token gradients (helpers.token_grads), within
  # helpers.grad_bound of the program's (any summation order: CPUs differ); the clip scales that box by
  # clip / max(||g||, clip) over every ||g|| the box allows (+ 4 u for the scaling's own roundings). Where |g|
  # is near eps an update's sensitivity to g is lr / eps: a float comparison of two orders fails there.
  adam_of = (lambda st: st._replace(opt_state=st.opt_state[1])) if clip else (lambda st: st)
  for t, (before, after) in enumerate(((state, state1), (state1, state2))):
    before = jax.tree.map(np.asarray, before)
    jac = helpers.token_grads(cfg, before.params, np.asarray(batch["ids"]), np.asarray(batch["mask"]), None)
    g, tau = jax.tree.map(lambda j: j.sum(-1), jac), helpers.grad_bound(jac)
    lo, hi = jax.tree.map(np.subtract, g, tau), jax.tree.map(np.add, g, tau)
    if clip:
      norm_lo = math.sqrt(sum(float(np.sum(np.maximum(np.abs(a) - b, 0) ** 2)) for a, b in
                              zip(jax.tree.leaves(g), jax.tree.leaves(tau))))
      norm_hi = math.sqrt(sum(float(np.sum((np.abs(a) + b) ** 2)) for a, b in
                              zip(jax.tree.leaves(g), jax.tree.leaves(tau))))
      s_lo, s_hi = clip / max(norm_hi, clip) * (1 - 4 * helpers.U32), clip / max(norm_lo, clip) * (1 + 4 * helpers.U32)
      assert s_hi < 1  # the clip is active
      lo, hi = (jax.tree.map(lambda a, b: np.minimum(a * s_lo, a * s_hi), lo, hi),
                jax.tree.map(lambda a, b: np.maximum(b * s_lo, b * s_hi), lo, hi))
    box = helpers.adam_interval(tcfg, adam_of(before), lo, hi, 6)
    helpers.check_adam(adam_of(jax.tree.map(np.asarray, after)), adam_of(before), box, f"step {t + 1}")


def test_dropout_key_follows_step():
  cfg = _cfg(dropout=0.3)
  params = opt.init_params(cfg, jax.random.key(3))
  batch = {"ids": jnp.asarray(np.random.default_rng(3).integers(0, V, (4, 8)), jnp.int32),
           "mask": jnp.ones((4, 8), jnp.int32)}
  tcfg = lm_train.TrainConfig(lr=1e-3, batch_size=4, epochs=1)
  state, _, tx = lm_train.setup(tcfg, cfg, params, 40, jax.random.key(0), sharding.make_lm_mesh(1, 1))
  step = jax.jit(functools.partial(lm_train.train_step, model_cfg=cfg, tx=tx))
  loss = lambda s: float(step(s, batch)[1]["loss"])
  # Same state, same masks; the same state at another step count, other masks.
  assert loss(state) == loss(state)
  assert loss(state) != loss(state._replace(step=state.step + 1))


# --- the epoch ------------------------------------------------------------------------------------------------------


def _recorder(B):
  """train_step replaced by a recorder of the rows each step batches (block i starts with token i)."""
  def record(state, batch, *, model_cfg, tx):
    seen_N, order_S = state.params
    first_B = batch["ids"][:, 0]
    seen_N = seen_N.at[first_B].add(batch["mask"][:, 0])
    order_S = jax.lax.dynamic_update_slice_in_dim(order_S, jnp.where(batch["mask"][:, 0] > 0, first_B, -1),
                                                  state.step * B, 0)
    return state._replace(step=state.step + 1, params=(seen_N, order_S)), {"nll": 0.0, "tokens": 1.0, "loss": 0.0}
  return record


def _record_epoch(monkeypatch, n, B, e, key=0, valid_N=None):
  """(times each block was batched, the rows in batch order (-1: masked), steps taken) of one epoch."""
  monkeypatch.setattr(lm_train, "train_step", _recorder(B))
  blocks = {"ids": jnp.tile(jnp.arange(n)[:, None], (1, 5)), "mask": jnp.ones((n, 5), jnp.int32)}
  epoch = jax.jit(functools.partial(lm_train.train_epoch, model_cfg=None, tx=None, batch_size=B))
  S = lm_train.steps_per_epoch(n, B)
  state = lm_train.TrainState(jnp.int32(0), (jnp.zeros(n, jnp.int32), jnp.full(S * B, -2, jnp.int32)), None,
                              jax.random.key_data(jax.random.key(key)))
  state = epoch(state, blocks, e, valid_N=valid_N)[0]
  return np.asarray(state.params[0]), np.asarray(state.params[1]), int(state.step)


def _shuffle_key(key, e):
  return jax.random.fold_in(jax.random.fold_in(jax.random.key_data(jax.random.key(key)), lm_train.SHUFFLE), e)


def test_epoch_sees_every_block_once_in_a_fresh_order(monkeypatch):
  n, B = 10, 4  # 3 steps; the last batch holds 2 real blocks and 2 masked rows
  seen0, order0, steps = _record_epoch(monkeypatch, n, B, 0)
  np.testing.assert_array_equal(seen0, np.ones(n))
  assert sorted(order0[order0 >= 0]) == list(range(n)) and (order0 < 0).sum() == 2 and steps == 3
  # A full buffer is visited in jax.random.permutation's order, as before ragged buffers were handled.
  np.testing.assert_array_equal(order0[:n], jax.random.permutation(_shuffle_key(0, 0), n))
  _, order1, _ = _record_epoch(monkeypatch, n, B, 1)
  assert not np.array_equal(order0, order1)                             # reshuffled each epoch
  np.testing.assert_array_equal(_record_epoch(monkeypatch, n, B, 0)[1], order0)      # by fold_in(key, epoch)
  assert not np.array_equal(_record_epoch(monkeypatch, n, B, 0, key=1)[1], order0)  # and by the run's key


def test_ragged_epoch_batches_valid_rows_in_permutation_order_and_skips_the_rest(monkeypatch):
  """Capacity 10, valid rows 0-5: two steps (the second with 2 masked slots), the third skipped; the valid rows
  come in the order jax.random.permutation(key, 6) gives, as an epoch over those 6 rows alone would take."""
  n, B = 10, 4
  seen, order, steps = _record_epoch(monkeypatch, n, B, 0, valid_N=jnp.arange(n) < 6)
  assert steps == 2
  np.testing.assert_array_equal(seen, [1] * 6 + [0] * 4)
  np.testing.assert_array_equal(order[:6], jax.random.permutation(_shuffle_key(0, 0), 6))
  np.testing.assert_array_equal(order[6:], [-1, -1, -2, -2, -2, -2])  # masked, then never written (skipped)
  # Valid rows anywhere in the buffer: each batched once, nothing else.
  valid = np.zeros(n, bool)
  valid[[1, 4, 5, 8, 9]] = True
  seen, order, steps = _record_epoch(monkeypatch, n, B, 1, valid_N=jnp.asarray(valid))
  assert steps == 2 and sorted(order[order >= 0]) == [1, 4, 5, 8, 9]
  np.testing.assert_array_equal(seen, valid.astype(int))


def test_ragged_buffer_trains_as_its_valid_rows_alone():
  """An OPT trained 2 epochs on a capacity-28 buffer with 13 valid rows (junk, unmasked, in the rest) equals the
  same training on a buffer of those 13 rows: parameters, Adam's moments and count, step, losses (measured:
  bit-identical on CPU; the tolerance leaves room for other backends' fusion)."""
  cfg, B, E, n, C = _cfg(), 4, 2, 13, 28
  params = opt.init_params(cfg, jax.random.key(7))
  rows = _chain(_transitions(3.0), n, 8, np.random.default_rng(7))
  junk = np.concatenate([rows, np.full((C - n, 8), 5, np.int32)])
  tcfg = lm_train.TrainConfig(lr=3e-3, end_lr=1e-4, batch_size=B, epochs=E)
  key = jax.random.key_data(jax.random.key(8))

  def run(blocks, total, valid_N=None):
    tx = lm_train.make_optimizer(tcfg, total, None if valid_N is None else E * -(-n // B))
    state = lm_train.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), key)
    epoch, losses = jax.jit(functools.partial(lm_train.train_epoch, model_cfg=cfg, tx=tx, batch_size=B)), []
    for e in range(E):
      state, m = epoch(state, lm_train.as_blocks(blocks), jnp.int32(e), valid_N=valid_N)
      losses.append(float(m["loss"]))
    return state, losses

  want, want_loss = run(rows, E * lm_train.steps_per_epoch(n, B))
  got, got_loss = run(junk, E * lm_train.steps_per_epoch(C, B), jnp.arange(C) < n)
  assert int(got.step) == int(want.step) == E * 4
  # Same-device, same batches: measured bit-identical (docstring); the tolerances are headroom for other backends.
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path((got.params, got.opt_state)),
                          jax.tree.leaves((want.params, want.opt_state))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path))


# --- learning and selection ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_learns_markov_source_below_unigram_bound(dtype):
  rng = np.random.default_rng(4)
  T = _transitions(3.0)
  train_x, valid_x = _chain(T, 1024, 16, rng), _chain(T, 128, 16, rng)
  # The unigram bound: validation perplexity of the training data's token frequencies (what any model that
  # ignores context can reach, up to smoothing); the floor: the true source's perplexity on the same tokens.
  freq = (np.bincount(train_x[:, 1:].ravel(), minlength=V) + 1.0) / (train_x[:, 1:].size + V)
  unigram = math.exp(-np.mean(np.log(freq[valid_x[:, 1:]])))
  floor = math.exp(-np.mean(np.log(T[valid_x[:, :-1], valid_x[:, 1:]])))
  assert unigram > 3 * floor  # the source has strong bigram structure
  cfg = _cfg(dtype=dtype)
  tcfg = lm_train.TrainConfig(lr=3e-3, end_lr=1e-4, warmup_steps=10, batch_size=32, epochs=5, eval_batch=64,
                              verbose=False)
  _, h = lm_train.train(tcfg, cfg, opt.init_params(cfg, jax.random.key(5)), train_x, valid_x, jax.random.key(6))
  assert h["steps_per_epoch"] == 32
  ppl = h["best_valid_ppl"]
  assert h["initial_valid_ppl"] > 0.8 * V  # an untrained model is near uniform
  assert 0.95 * floor < ppl < 1.5 * floor < 0.25 * unigram, (floor, ppl, unigram)
  assert [r["epoch"] for r in h["epochs"]] == [1, 2, 3, 4, 5]
  assert h["best_valid_ppl"] == min(r["valid_ppl"] for r in h["epochs"])
  # MFU against the host CPU's derived peak (hardware.cpu; None only where /proc/cpuinfo gives no clock): a
  # fraction, and exactly flops_per_token x tokens/s / peak, the rate of the whole compiled fit (its validation
  # passes included), compilation apart.
  peak = lm_train.peak_flops(jax.devices()[:1], cfg.dtype)
  assert h["tokens_per_s"] > 0 and h["compile_s"] > 0
  np.testing.assert_allclose(h["tokens_per_s"], 5 * train_x.size / h["seconds"])
  assert (h["mfu"] is None) if peak is None else (0 < h["mfu"] < 1 and np.isclose(
      h["mfu"], sizes.flops_per_token(cfg, train_x.shape[1]) * h["tokens_per_s"] / peak))


def test_keeps_the_epoch_best_on_validation():
  """Train on a Markov chain, validate on i.i.d. tokens with the same frequencies: the unigram is the best model
  for validation, so its perplexity falls while the model learns token frequencies, then rises as it learns the
  bigrams (epoch 3 best here, computed once and fixed by the seeds)."""
  rng = np.random.default_rng(0)
  T = _transitions(6.0, skew=0.6)
  train_x = _chain(T, 256, 16, rng)
  freq = np.bincount(train_x.ravel(), minlength=V) / train_x.size
  valid_x = rng.choice(V, size=(64, 16), p=freq).astype(np.int32)
  cfg = _cfg()
  params0 = opt.init_params(cfg, jax.random.key(0))
  tcfg = lm_train.TrainConfig(lr=1e-3, end_lr=1e-4, batch_size=32, epochs=6, eval_batch=64, verbose=False)
  best, h = lm_train.train(tcfg, cfg, params0, train_x, valid_x, jax.random.key(1))
  ppls = [r["valid_ppl"] for r in h["epochs"]]
  assert h["best_epoch"] == 1 + int(np.argmin(ppls)) and 1 < h["best_epoch"] < tcfg.epochs, ppls
  assert ppls[-1] > 1.03 * min(ppls)
  ppl = lm_train.perplexity(best, lm_train.as_blocks(valid_x), model_cfg=cfg, eval_batch=64)
  np.testing.assert_allclose(ppl, min(ppls), rtol=1e-5)  # the same params and eval program: equal up to u
  # The caller's params are not consumed by the donated training state.
  fresh = opt.init_params(cfg, jax.random.key(0))
  assert float(jnp.sum(params0["embed_tokens"])) == float(jnp.sum(fresh["embed_tokens"]))


# --- bad input ------------------------------------------------------------------------------------------------------

_ok = np.ones((8, 8), np.int32)


# TrainConfig's own fields (lr > 0, epochs >= 1, grad_clip >= 0, ...) are the experiment's config.lm fields,
# refused by name there (test_lm_config.py); here what needs the mesh or the data.
@pytest.mark.parametrize("change,blocks,match", [
    (dict(batch_size=12), _ok, r"^TrainConfig\.batch_size=12 must be a multiple of the 8 batch shards"),
    (dict(eval_batch=4), _ok, r"^TrainConfig\.eval_batch=4 must be a multiple of the 8 batch shards"),
    (dict(warmup_steps=2), _ok, r"^TrainConfig\.warmup_steps must be < the run's 2 steps"),
    ({}, np.ones((0, 8), np.int32), r"train_blocks is empty"),
    ({}, np.ones((8, 17), np.int32), r"train_blocks blocks have length 17 > model max_position_embeddings 16"),
    ({}, np.full((8, 8), V, np.int32), r"train_blocks holds token id 32 outside the model's vocab_size 32"),
    ({}, np.ones((8, 8), np.float32), r"train_blocks must be an integer array"),
])
def test_bad_input_refused_before_compiling(monkeypatch, change, blocks, match):
  monkeypatch.setattr(lm_train, "program", lambda *a, **k: pytest.fail("got past validation"))
  tcfg = dataclasses.replace(lm_train.TrainConfig(batch_size=8, epochs=2, eval_batch=8), **change)
  with pytest.raises(ConfigError, match=match):
    lm_train.train(tcfg, _cfg(), {}, blocks, _ok, jax.random.key(0), sharding.make_lm_mesh(4, 2))
