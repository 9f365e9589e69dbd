"""The LM family through the loop: the paper's recursion on the tiny synthetic Markov language (configs/lm.py:ci).

Compiling one generation (train epochs + beam decoding + metrics) is the cost here, so the module compiles as
few as it can: one Experiment serves the uninterrupted, interrupted and NaN-resumed replace runs (loop.run's
`experiment=`), and real_fraction, the NaN-injected run and the 8-device run compile one program each. Every
metric of generation 0 and 1 is recomputed independently from the checkpointed models and the kept samples.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from collapse_jax import family as family_lib, loop, metrics as metrics_lib
from collapse_jax.families.lm import decode
from collapse_jax.families.lm import train as lm_train
from collapse_jax.families.lm.family import HIST_BINS
from collapse_jax.families.lm.text_metrics import ngram_rates
from collapse_jax.families.lm import model as opt_model
from tests import helpers
from tests.helpers import load_config

G = 3
N_BLOCKS = 28  # configs/lm.py:ci


def _cfg(*variants, **kw):
  # dropout 0: fewer random-bit generators to compile (lm_train's tests cover dropout); every sample kept; every
  # generation checkpointed (tests restore the models of generations 0 and 1).
  base = dict(generations=G, lm__dropout=0.0, snapshot_generations=tuple(range(G)), snapshot_size=N_BLOCKS,
              checkpoint_min_seconds=0)
  return load_config("lm", ",".join(("ci",) + variants), **{**base, **kw})


def _jsonl(wd):
  return metrics_lib.read_jsonl(os.path.join(wd, "metrics.jsonl"))


def _gen(shared, x, w, model, g=0):
  """What the loop hands fit and sample at generation g (`model` as both the previous and generation 0's)."""
  return family_lib.Generation(jnp.int32(g), x, w, model, model, {}, shared)


# --- corpus statistics --------------------------------------------------------------------------------------------


def test_ngram_rates_match_python_sets():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 4, (7, 11)).astype(np.int32)  # 4 symbols: many repeats within and across blocks
  tokens[3] = tokens[5]  # a duplicated block: repeats across blocks only
  for n in (1, 2, 4):
    grams = [tuple(b[i:i + n]) for b in tokens for i in range(len(b) - n + 1)]
    within = sum(len({tuple(b[i:i + n]) for i in range(len(b) - n + 1)}) for b in tokens)
    distinct, rep = ngram_rates(tokens, n)
    # Ratios of integer counts (<= 77): exact in float32 up to one division's rounding, u = 6e-8 < 1e-7.
    assert float(distinct) == pytest.approx(len(set(grams)) / len(grams), abs=1e-7), n
    assert float(rep) == pytest.approx(1 - within / len(grams), abs=1e-7), n


# --- through the loop ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
  """The uninterrupted replace run (plots on) and its Experiment, whose compiled chunk later runs reuse."""
  cfg = _cfg()
  exp = loop.Experiment(cfg)
  wd = str(tmp_path_factory.mktemp("lm") / "ref")
  hist = loop.run(cfg, wd, experiment=exp)
  return dict(cfg=cfg, exp=exp, wd=wd, hist=hist)


def test_loop_writes_every_metric_figure_and_text_and_compiles_once(ref):
  rows, fam = _jsonl(ref["wd"]), ref["exp"].family
  assert [r["generation"] for r in rows] == list(range(G))
  for name in fam.metric_names:
    assert all(np.isfinite(r[name]) for r in rows), name
  arrays = ref["hist"]["arrays"]
  assert arrays["data_logppl0_hist"].shape == (G, HIST_BINS)
  assert arrays["text_continuations"].shape == (G, 4, 8)
  for name in ("plots/lm_metrics.png", "plots/lm_data_ppl0.png") + tuple(f"samples/gen_{g:04d}.txt" for g in range(G)):
    assert os.path.getsize(os.path.join(ref["wd"], name)) > 0, name
  text = open(os.path.join(ref["wd"], "samples", "gen_0002.txt")).read()
  assert text.count("=== prompt") == 4
  # The continuation written is generation 2's, as token ids (the Markov language has no text).
  assert " ".join(map(str, arrays["text_continuations"][2, 3])) in text
  assert ref["exp"]._chunk._cache_size() == 1  # three generations, one compilation


def test_loop_sends_every_generations_sample_texts_and_metrics_to_tensorboard(ref):
  from tests.test_tracking import _tb_files, tensorboard_view
  rows, arrays = _jsonl(ref["wd"]), ref["hist"]["arrays"]
  view, _ = tensorboard_view(_tb_files(ref["wd"]))
  assert view["test_ppl"] == [(g, pytest.approx(r["test_ppl"], rel=1e-7)) for g, r in enumerate(rows)]
  for i in range(4):  # each fixed prompt's continuation, every generation, as the samples file shows it
    texts = view[f"sample_{i}/text_summary"]
    assert [g for g, _ in texts] == list(range(G))
    for g, t in texts:
      assert t.endswith(" ".join(map(str, arrays["text_continuations"][g, i]))), (i, g)


@pytest.fixture(scope="module")
def recomputed(ref):
  """Generations 0 and 1 redone outside the loop from the checkpointed models: decoding by decode.py on its own,
  and every metric in numpy from the model's logits."""
  fam, exp = ref["exp"].family, ref["exp"]
  shared = jax.tree.map(np.asarray, exp.data.shared)
  c0, c1 = helpers.restore_carry(ref["wd"], 1), helpers.restore_carry(ref["wd"], 2)
  models = {0: c0["model0"]["params"], 1: c1["prev"]["params"]}
  snaps = ref["hist"]["snapshots"]
  prompts = {0: shared["train"], 1: snaps[0]}  # the paper's way: a generation continues its own training blocks
  # The paper's decoder, from the config's fields: exactly block_len new tokens, beams, repetition penalty.
  d = ref["cfg"].lm.decode
  dcfg = decode.DecodeConfig(method="beam", max_new_tokens=8, min_new_tokens=8, num_beams=d.num_beams,
                             repetition_penalty=d.repetition_penalty)
  out = {}
  for g in (0, 1):
    rows = np.concatenate([prompts[g], shared["prompts"]])
    out[g] = np.asarray(decode.decode_corpus(decode.opt_lm(fam.model_cfg), models[g], rows, np.ones_like(rows),
                                             dcfg, batch_size=8, mesh=exp.mesh)["tokens"])
  return dict(fam=fam, shared=shared, models=models, prompts=prompts, decoded=out, snaps=snaps)


def _logp(fam, params, ids):
  logits = opt_model.apply(fam.model_cfg, params, ids, np.ones_like(ids))
  return np.asarray(jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1))


def test_each_generation_continues_its_own_training_blocks(ref, recomputed):
  r = recomputed
  for g in (0, 1):
    # The new tokens only (not the prompt) are the next generation's blocks; the fixed prompts' ride along.
    np.testing.assert_array_equal(r["snaps"][g], r["decoded"][g][:N_BLOCKS], err_msg=f"generation {g}")
    np.testing.assert_array_equal(ref["hist"]["arrays"]["text_continuations"][g], r["decoded"][g][N_BLOCKS:])
  assert not np.array_equal(r["snaps"][0], r["snaps"][1])


def _per_block_logppl(fam, params, blocks):
  logp = _logp(fam, params, blocks)
  nll = -np.take_along_axis(logp[:, :-1], blocks[:, 1:, None], axis=-1)[..., 0]
  return nll.mean(axis=1)


def test_metrics_recomputed_in_numpy(ref, recomputed):
  r, m = recomputed, ref["hist"]["metrics"]
  fam, shared, src = r["fam"], r["shared"], r["shared"]["source"]
  P, pi = np.asarray(src.P_VxV, np.float64), np.asarray(src.pi_V, np.float64)
  for g in (0, 1):
    params = r["models"][g]
    # Real test perplexity: token-weighted over all test blocks.
    test = shared["test"]
    logp = _logp(fam, params, test)
    nll = -np.take_along_axis(logp[:, :-1], test[:, 1:, None], axis=-1)[..., 0]
    # The loop's float32 metrics vs numpy on the same float32 logits (_logp): a float32 mean of the N test NLLs
    # (~log 52) has worst case gamma(N) * 4, ~sqrt(N) u * 4 as a random walk; 2e-5 holds the latter for N up to
    # ~7e3 but not the worst case: judged at risk (likewise the other rtol 2e-5 / 1e-5 token means below).
    np.testing.assert_allclose(m["test_ppl"][g, 0], np.exp(nll.mean()), rtol=2e-5)
    # KL(source || model) at every real test context: P's row of the context token vs the model's language part.
    q = logp[..., 4:]
    p = P[test - 4]
    kl = np.sum(np.where(p > 0, p * (np.log(np.where(p > 0, p, 1)) - q), 0), axis=-1)
    np.testing.assert_allclose(m["test_kl"][g, 0], kl.mean(), rtol=2e-5)
    # The kept model's validation perplexity is that model's.
    valid = shared["valid"]
    nll_v = -np.take_along_axis(_logp(fam, params, valid)[:, :-1], valid[:, 1:, None], axis=-1)[..., 0]
    np.testing.assert_allclose(m["valid_ppl"][g, 0], np.exp(nll_v.mean()), rtol=2e-5)
    assert m["best_epoch"][g, 0] in (1, 2)
    # This generation's training blocks (real at 0, generation 0's samples at 1) under the generation-0 model.
    lp = _per_block_logppl(fam, r["models"][0], r["prompts"][g])
    ppl = np.exp(lp)
    np.testing.assert_allclose(m["data_ppl0_mean"][g, 0], ppl.mean(), rtol=2e-5)
    for q_ in (5, 50, 95):
      np.testing.assert_allclose(m[f"data_ppl0_q{q_:02d}"][g, 0], np.quantile(ppl, q_ / 100), rtol=2e-5)
    hi = fam.log_ppl_range()
    counts, _ = np.histogram(lp, HIST_BINS, (0, hi))
    # Integer counts recovered through a float32 density: count * few u << 1e-3; a value within rounding of a bin
    # edge would move a whole count (discrete, not covered by any tolerance).
    np.testing.assert_allclose(ref["hist"]["arrays"]["data_logppl0_hist"][g] * len(lp) * hi / HIST_BINS, counts,
                               atol=1e-3)
    # The generated corpus: n-gram rates by sets, true log-likelihood from P with the prompt's last token first.
    new, prompts = r["snaps"][g], r["prompts"][g]
    grams = [tuple(b[i:i + 2]) for b in new for i in range(len(b) - 1)]
    assert m["gen_distinct_2"][g, 0] == pytest.approx(len(set(grams)) / len(grams), abs=1e-6)  # count ratio: u
    both = np.concatenate([prompts[:, -1:], new], axis=1) - 4  # language ids; specials (ids 0-3) fall below 0
    ok = (both[:, :-1] >= 0) & (both[:, 1:] >= 0)
    tp = np.where(ok, P[np.maximum(both[:, :-1], 0), np.maximum(both[:, 1:], 0)], 0.0)
    np.testing.assert_allclose(m["gen_impossible"][g, 0], np.mean(tp == 0), atol=1e-6)  # count ratio: u
    np.testing.assert_allclose(m["gen_true_loglik"][g, 0], np.log(tp[tp > 0]).mean(), rtol=1e-5)
    # Tail tokens: the half of the language with the smallest stationary mass; the share of its mass present.
    tail = np.argsort(pi)[:len(pi) // 2]
    present = np.isin(tail, new - 4)
    # float32 sums of <= 26 masses of one sign: gamma(26) ~ 1.6e-6 each, a ratio of two: < 1e-5.
    np.testing.assert_allclose(m["gen_tail_token_frac"][g, 0], pi[tail][present].sum() / pi[tail].sum(), rtol=1e-5)


def test_fit_starts_from_the_initial_model_keeps_the_best_epoch_and_ignores_rows_of_weight_0(ref):
  fam = ref["exp"].family
  shared = jax.device_put(ref["exp"].data.shared)
  jitted = jax.jit(fam.fit)
  fit = lambda x, w, key, prev, g: jitted(_gen(shared, x, w, prev, g), key)  # noqa: E731
  x, key = shared["train"], jax.random.PRNGKey(3)
  ones = jnp.ones((N_BLOCKS,), jnp.float32)
  m0 = fit(x, ones, key, fam.init_model(key, shared), 0)
  # lm.start='initial': generation 1 starts from the initial model whatever the previous one is.
  other = jax.tree.map(lambda a: a + 0.5 if a.dtype == np.float32 else a, m0)
  a = fit(x, ones, key, m0, 1)
  b = fit(x, ones, key, other, 1)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(u, v)
  # Rows of weight 0 hold junk that must not train anything.
  w = (np.arange(N_BLOCKS) < 20).astype(np.float32)
  junk = np.asarray(x).copy()
  junk[20:] = 7
  c = fit(jnp.asarray(junk), w, key, m0, 1)
  d = fit(x, w, key, m0, 1)
  for u, v in zip(jax.tree.leaves(c), jax.tree.leaves(d)):
    np.testing.assert_array_equal(u, v)
  # ... nor take batch slots or optimizer steps: the 28-row buffer with 20 valid rows trains as those 20 rows
  # alone (the accumulate regimes' buffers), up to the rounding of a cosine over a traced step count.
  e = fit(x[:20], ones[:20], key, m0, 1)
  assert int(e["best_epoch"]) == int(d["best_epoch"])
  for (path, u), v in zip(jax.tree_util.tree_leaves_with_path(d), jax.tree.leaves(e)):
    # Same batches, one program shape apart: only the cosine's rounding (~u * lr per step) differs, so parameters
    # differ by ~steps * lr * few u << 1e-6, provided Adam does not amplify it (near-zero gradients are mapped to
    # +-lr: tests/helpers.adam_interval). Not derived for that case: judged at risk.
    np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
  # Training on one repeated token makes the real validation perplexity worse every epoch: the first is kept.
  bad = fit(jnp.full_like(x, 9), ones, key, m0, 1)
  assert int(bad["best_epoch"]) == 1, bad["best_epoch"]
  valid = np.asarray(shared["valid"])
  nll = -np.take_along_axis(_logp(fam, bad["params"], valid)[:, :-1], valid[:, 1:, None], axis=-1)[..., 0]
  np.testing.assert_allclose(bad["valid_ppl"], np.exp(nll.mean()), rtol=2e-5)  # as test_ppl above


def test_stop_after_then_resume_equals_uninterrupted(ref, tmp_path):
  wd = str(tmp_path / "cut")
  loop.run(ref["cfg"], wd, stop_after=1, experiment=ref["exp"])
  assert len(_jsonl(wd)) == 1
  resumed = loop.run(ref["cfg"], wd, experiment=ref["exp"])
  for k in ref["hist"]["metrics"]:
    np.testing.assert_array_equal(ref["hist"]["metrics"][k], resumed["metrics"][k], err_msg=k)
  np.testing.assert_array_equal(ref["hist"]["snapshots"], resumed["snapshots"])
  assert _jsonl(wd) == _jsonl(ref["wd"])


def test_nan_metric_stops_before_checkpointing_and_a_rerun_resumes(ref, tmp_path, monkeypatch, capsys):
  orig = loop.Experiment._generation

  def nan_at_2(self, carry, g, shared):
    carry, metrics, snap = orig(self, carry, g, shared)
    return carry, dict(metrics, test_ppl=jax.numpy.where(g == 2, jax.numpy.nan, metrics["test_ppl"])), snap

  monkeypatch.setattr(loop.Experiment, "_generation", nan_at_2)
  wd = str(tmp_path / "nan")
  with pytest.raises(loop.NonFiniteError) as err:
    loop.run(ref["cfg"], wd)
  msg = str(err.value)
  assert msg.startswith("generation 2: metric 'test_ppl' is not finite") and "resumes at generation 2" in msg
  assert "\n" not in msg
  assert sorted(int(s) for s in os.listdir(os.path.join(wd, "checkpoints")) if s.isdigit()) == [1, 2]
  assert [r["generation"] for r in _jsonl(wd)] == [0, 1]
  monkeypatch.undo()
  capsys.readouterr()
  resumed = loop.run(ref["cfg"], wd, experiment=ref["exp"])
  assert "resuming" in capsys.readouterr().out
  for k in ref["hist"]["metrics"]:
    np.testing.assert_array_equal(ref["hist"]["metrics"][k], resumed["metrics"][k], err_msg=k)


def test_real_fraction_shares_generation_0_and_then_differs(ref, tmp_path):
  # The paper's real_fraction runs 10 epochs; 2 here, so generation 0 is the replace run's exactly.
  cfg = _cfg("real_fraction", lm__epochs=2, plots=False)
  hist = loop.run(cfg, str(tmp_path / "rf"))
  rows = _jsonl(str(tmp_path / "rf"))
  assert [r["generation"] for r in rows] == list(range(G))
  m, m_ref = hist["metrics"], ref["hist"]["metrics"]
  for k in m:
    np.testing.assert_array_equal(m[k][0], m_ref[k][0], err_msg=k)
  assert m["test_ppl"][1, 0] != m_ref["test_ppl"][1, 0]
  # Generation 1 trains on 3 real blocks (round(0.1 * 28)) and 25 of generation 0's: the real ones are continued
  # too, so its training data under generation 0 hold both kinds.
  assert np.isfinite(m["data_ppl0_mean"]).all()


# The contractions a logit passes through in the ci model, in series (q/k/v 32, q.k over a head's 16, attention
# over <= 16 positions, out 32, fc1 32, fc2 64, tied head 32): two float32 orders of each differ by <= 2 gamma_K
# relative to its terms' magnitudes; layer norm and softmax pass relative errors on at first order, so a logit's
# two evaluations differ by <= sum 2 gamma_K * max|logit| (first order; ~2.6e-5 relative).
_K_SERIES = (32, 16, 16, 32, 32, 64, 32)


def _one_step_fit(exp, key):
  fam = exp.family
  shared = jax.device_put(exp.data.shared, exp.shared_shardings)
  ones = jnp.ones((N_BLOCKS,), jnp.float32)
  out = jax.jit(fam.fit)(_gen(shared, shared["train"], ones, fam.init_model(key, shared)), key)
  return jax.tree.map(np.asarray, out)


def test_eight_devices_agree_with_one_and_hold_models_fsdp_sharded(ref, recomputed):
  """8 devices (4 data x 2 fsdp) vs 1, compared where they compute the same function in another float32 order, from
  the same inputs: after Adam steps nothing is bitwise reproducible (a gradient that is rounding noise moves its
  weight by +-lr either way: tests/test_sharding.py), and a beam search from such models may flip a near-tie."""
  assert len(jax.devices()) == 8, "conftest sets 8 simulated CPU devices"
  # 1. The family's fit, reduced to one AdamW step (one epoch, the 28 blocks in one batch of 32) from the initial
  # model, on both meshes: training loss within a summation bound, parameters inside the interval AdamW maps the
  # gradient's float32 bound to (the gradient's terms: one per predicted token, in float64).
  kw = dict(lm__epochs=1, lm__batch_size=32, plots=False)
  exps = {n: loop.Experiment(_cfg(num_devices=n, lm__mesh_fsdp=min(n, 2), **kw)) for n in (1, 8)}
  key = jax.random.PRNGKey(3)
  fits = {n: _one_step_fit(e, key) for n, e in exps.items()}
  fam = exps[1].family
  init = jax.tree.map(np.asarray, exps[1].data.shared["init"])
  train = np.asarray(exps[1].data.shared["train"])
  ids = np.concatenate([train, np.full((32 - N_BLOCKS, train.shape[1]), fam.model_cfg.pad_token_id, train.dtype)])
  mask = (np.arange(32) < N_BLOCKS)[:, None] * (ids != fam.model_cfg.pad_token_id)
  jac = helpers.token_grads(fam.model_cfg, init, ids, mask.astype(np.int32), None)  # dropout 0 (_cfg)
  g, tau = jax.tree.map(lambda j: j.sum(-1), jac), helpers.grad_bound(jac)
  tx = lm_train.make_optimizer(fam.tcfg, 1)
  state = lm_train.TrainState(np.int32(0), init, jax.tree.map(np.asarray, tx.init(init)), key)
  box = helpers.adam_interval(fam.tcfg, state, jax.tree.map(np.subtract, g, tau), jax.tree.map(np.add, g, tau), 1)
  for n, fit in fits.items():
    assert int(fit["best_epoch"]) == 1
    for name, p, (p_i, _, _) in zip(helpers.names(init), jax.tree.leaves(fit["params"]),
                                    jax.tree.leaves(box, is_leaf=lambda x: isinstance(x, tuple))):
      helpers.inside(f"params{name} on {n} devices", p, p_i)
  # loss = (sum of N positive per-token NLLs) / count: two orders differ by <= 2 gamma_N relative, plus each NLL's
  # log-sum-exp over the 52 logits (<= gamma_64 relative: logits O(1), NLLs O(log 52)).
  n_terms = 32 * (train.shape[1] - 1) + 64
  np.testing.assert_allclose(fits[8]["train_loss"], fits[1]["train_loss"], rtol=2 * helpers.gamma(n_terms))
  # 2. Beam decoding of the reference's generation-0 model on 8 devices: the reference's samples and continuations
  # (decoded by the 1-device loop from the same parameters and prompts), token for token, unless a near-tie.
  fam8 = exps[8].family
  shared8 = jax.device_put(exps[8].data.shared, exps[8].shared_shardings)
  model = {"params": jax.device_put(recomputed["models"][0], fam8.param_shardings(recomputed["models"][0]))}
  ones = jnp.ones((N_BLOCKS,), jnp.float32)
  sample = jax.jit(fam8.sample, static_argnums=1)
  new, m = jax.tree.map(np.asarray, sample(model, N_BLOCKS, key, _gen(shared8, shared8["train"], ones, model)))
  got = np.concatenate([new, m["text_continuations"]])
  want = np.concatenate([ref["hist"]["snapshots"][0], ref["hist"]["arrays"]["text_continuations"][0]])
  differ = np.flatnonzero((got != want).any(axis=1))
  if differ.size:  # a near-tie: the two decodes' best hypotheses must score the same within float32 noise
    _same_score_within_rounding(exps, recomputed, ref["cfg"], differ)
  # 3. In the loop's carry the models (and so their Adam state, test_sharding) are split over 'fsdp'.
  abstract = exps[8].carry_abstract
  specs = {str(a.sharding.spec) for a in jax.tree.leaves(abstract["model0"]["params"])}
  assert any("fsdp" in s for s in specs), specs


def _same_score_within_rounding(exps, recomputed, cfg, rows):
  """The rows two decodes chose differently: their best hypotheses' beam scores (a sum of 8 penalised log-probs,
  each <= 2 logit errors) within 16 * sum 2 gamma_K * max|logit| of each other: a tie in float32, not a bug."""
  fam, r = exps[1].family, recomputed
  prompts = np.concatenate([r["prompts"][0], r["shared"]["prompts"]])[rows]
  d = cfg.lm.decode
  dcfg = decode.DecodeConfig(method="beam", max_new_tokens=8, min_new_tokens=8, num_beams=d.num_beams,
                             repetition_penalty=d.repetition_penalty)
  scores = {}
  for n, e in exps.items():
    pad = -(-len(rows) // 8) * 8 - len(rows)
    ids = np.concatenate([prompts, np.repeat(prompts[:1], pad, 0)])
    params = jax.device_put(r["models"][0], e.family.param_shardings(r["models"][0]))
    out = decode.decode_corpus(decode.opt_lm(fam.model_cfg), params, ids, np.ones_like(ids), dcfg, batch_size=8,
                               mesh=e.mesh)
    scores[n] = np.asarray(out["scores"])[:len(rows)]
  logits = opt_model.apply(fam.model_cfg, r["models"][0], prompts, np.ones_like(prompts))
  eps = 16 * sum(2 * helpers.gamma(k) for k in _K_SERIES) * float(np.abs(np.asarray(logits)).max())
  np.testing.assert_allclose(scores[8], scores[1], rtol=0, atol=eps, err_msg=f"rows {rows} decoded differently")
