"""Loop invariants: sharded == unsharded, kill/resume == uninterrupted, finished runs are not redone,
bad input is refused before compilation with the field named, corrupt checkpoints fall back."""
import json
import os
import shutil

import jax
import numpy as np
import pytest

from collapse_jax import checkpoint, loop
from collapse_jax.errors import ConfigError
from collapse_jax import metrics as metrics_lib
from tests.helpers import chain_stats_close, cli, corrupt_checkpoint, load_config, sigkill_then_resume


def _gauss(**kw):
  base = dict(generations=12, chains=13, checkpoint_every=4, plots=False, checkpoint_min_seconds=0)
  base.update(kw)
  return load_config("gaussian", "100", **base)


def _jsonl(workdir):
  return metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))


def test_sharded_equals_unsharded(tmp_path):
  assert len(jax.devices()) == 8, "conftest sets 8 simulated CPU devices"
  # 13 chains do not divide 8 devices: the loop pads the chain axis, and the padding must not leak into stats.
  one = loop.run(_gauss(num_devices=1), str(tmp_path / "one"))
  eight = loop.run(_gauss(num_devices=8), str(tmp_path / "eight"))
  # Each chain runs the same program on both meshes; the 13 chains' mean/std are reduced in another order: within
  # (2 gamma_12 + 2u) * rms (~1.55e-6 relative to this non-negative metrics' values; was rtol 1e-6 atol 1e-7,
  # below the worst case for the mean and, via atol, up to 5e-5 relative for the smallest values, 0.0023).
  for k in one["metrics"]:
    chain_stats_close(one["metrics"][k], eight["metrics"][k], 13, err_msg=k)


def test_metrics_jsonl_and_config_written(tmp_path):
  wd = str(tmp_path / "run")
  hist = loop.run(_gauss(plots=True), wd)
  rows = _jsonl(wd)
  assert [r["generation"] for r in rows] == list(range(12))
  # The same float32 value through JSON (repr round-trips): equal; approx's default rel 1e-6 is 8 float32 ulps.
  assert rows[5]["var_ratio/mean"] == pytest.approx(float(hist["metrics"]["var_ratio"][5, 0]))
  assert rows[0]["train_samples"] == 100
  assert set(rows[0]) == {"generation", "train_samples"} | {f"{m}/{s}" for m in hist["metrics"] for s in
                                                             ("mean", "std", "q05", "q25", "q50", "q75", "q95")}
  with open(os.path.join(wd, "config.json")) as fh:
    assert json.load(fh)["chains"] == 13
  assert os.path.exists(os.path.join(wd, "plots", "gaussian_metrics.png"))


def test_one_chain_writes_one_value_per_metric(tmp_path):
  """With one chain, std and quantiles say nothing: metrics.jsonl holds `name: value`, and metrics.series reads
  both forms into the same {metric: {stat: values}}."""
  wd = str(tmp_path / "run")
  hist = loop.run(_gauss(chains=1, plots=False), wd)
  rows = _jsonl(wd)
  assert set(rows[0]) == {"generation", "train_samples", *hist["metrics"]}
  assert rows[3]["var_ratio"] == pytest.approx(float(hist["metrics"]["var_ratio"][3, 0]))
  got = metrics_lib.series(rows)
  np.testing.assert_array_equal(got["var_ratio"]["mean"], hist["metrics"]["var_ratio"][:, 0])
  assert list(got["var_ratio"]) == ["mean"]


def test_interrupted_in_process_equals_uninterrupted(tmp_path):
  full = loop.run(_gauss(), str(tmp_path / "full"))
  wd = str(tmp_path / "cut")
  loop.run(_gauss(), wd, stop_after=4)
  assert len(_jsonl(wd)) == 4
  resumed = loop.run(_gauss(), wd)
  for k in full["metrics"]:
    np.testing.assert_array_equal(full["metrics"][k], resumed["metrics"][k], err_msg=k)
  assert _jsonl(wd) == _jsonl(str(tmp_path / "full"))


def test_finished_workdir_is_not_redone(tmp_path, capsys):
  wd = str(tmp_path / "run")
  loop.run(_gauss(), wd)
  before = sorted(os.listdir(os.path.join(wd, "checkpoints")))
  mtime = os.path.getmtime(os.path.join(wd, "metrics.jsonl"))
  capsys.readouterr()
  loop.run(_gauss(), wd)
  assert "already holds a finished run" in capsys.readouterr().out
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == before
  assert os.path.getmtime(os.path.join(wd, "metrics.jsonl")) == mtime


def test_changed_config_is_refused_on_resume(tmp_path):
  wd = str(tmp_path / "run")
  loop.run(_gauss(), wd, stop_after=4)
  with pytest.raises(ConfigError, match=r"config\.seed \(0 -> 1\)"):
    loop.run(_gauss(seed=1), wd)
  loop.run(_gauss(checkpoint_every=3), wd)  # a different chunking changes no result, so it may resume


@pytest.mark.parametrize("field,value,match", [
    ("regime__name", "keep_all", r"config\.regime\.name='keep_all'"),
    ("generations", 0, r"config\.generations must be a positive integer"),
    ("samples__n", -5, r"config\.samples\.n must be a positive integer"),
    ("chains", 0, r"config\.chains must be a positive integer"),
    ("checkpoint_every", 0, r"config\.checkpoint_every"),
    ("regime__real_fraction", 1.5, r"config\.regime\.real_fraction must be in \[0, 1\]"),
    ("regime__real_fraction", -0.1, r"config\.regime\.real_fraction must be in \[0, 1\]"),
    ("samples__schedule", "cubic", r"config\.samples\.schedule"),
    ("gaussian__estimator", "median", r"config\.gaussian\.estimator"),
    ("family", "hmm", r"config\.family='hmm'"),
])
def test_bad_config_refused_before_compilation(tmp_path, monkeypatch, field, value, match):
  def no_compile(*a, **k):
    raise AssertionError("compiled before validating")
  cfg = _gauss(**{field: value})
  monkeypatch.setattr(jax, "jit", no_compile)
  with pytest.raises(ConfigError, match=match):
    loop.run(cfg, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_real_fraction_larger_than_real_data_is_refused(tmp_path):
  with pytest.raises(ConfigError, match=r"real_fraction=1\.0 asks for 100 real data.*only 10"):
    loop.run(_gauss(regime__name="real_fraction", regime__real_fraction=1.0, n_real=10), str(tmp_path / "r"))


def test_unwritable_workdir(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  with pytest.raises(ConfigError, match=r"workdir .*file/run cannot be created"):
    loop.run(_gauss(), str(blocker / "run"))


def test_cli_errors_are_one_line(tmp_path):
  for args, needle in [
      (["--config.nope=1"], "error: unknown config field nope"),
      (["--config.regime.name=foo"], "config.regime.name='foo'"),
      (["--config.regime.real_fraction=2"], "config.regime.real_fraction must be in [0, 1]"),
  ]:
    r = cli("--config=configs/gaussian.py", f"--workdir={tmp_path / 'w'}", *args)
    assert r.returncode == 2, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr


def test_corrupt_latest_checkpoint_falls_back(tmp_path, capsys):
  full = loop.run(_gauss(), str(tmp_path / "full"))
  wd = str(tmp_path / "cut")
  loop.run(_gauss(), wd, stop_after=8)
  ck = os.path.join(wd, "checkpoints")
  assert sorted(int(s) for s in os.listdir(ck) if s.isdigit()) == [4, 8]
  corrupt_checkpoint(os.path.join(ck, "8"))
  os.makedirs(os.path.join(ck, "12.orbax-checkpoint-tmp-123"))  # a save killed half-way
  capsys.readouterr()
  resumed = loop.run(_gauss(), wd)
  out = capsys.readouterr().out
  assert "checkpoints/8 is unreadable" in out and "resuming" in out and "generation 4/12" in out
  assert os.path.isdir(os.path.join(ck, "unreadable-8"))  # set aside, not deleted
  for k in full["metrics"]:
    np.testing.assert_array_equal(full["metrics"][k], resumed["metrics"][k], err_msg=k)


def test_all_checkpoints_corrupt_is_an_error_that_keeps_the_files(tmp_path):
  wd = str(tmp_path / "run")
  loop.run(_gauss(), wd, stop_after=8)
  ck = os.path.join(wd, "checkpoints")
  for s in ("4", "8"):
    corrupt_checkpoint(os.path.join(ck, s))
  with pytest.raises(ConfigError, match=r"no readable checkpoint in .*checkpoints/8"):
    loop.run(_gauss(), wd)
  assert sorted(os.listdir(ck)) == ["4", "8"]


def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path):
  # The README's main job (the paper's GMM recursion), shortened: 2 chains, a checkpoint every 5 generations.
  args = ["--config=configs/gmm.py", "--config.generations=300", "--config.chains=2",
          "--config.checkpoint_every=5", "--config.plots=False",
          "--config.checkpoint_min_seconds=0"]  # every chunk saved, so the kill finds two checkpoints in time
  ref, resumed, done = sigkill_then_resume(tmp_path, args, min_checkpoints=2, timeout=120)
  assert 0 < done < 300
  assert resumed == ref


@pytest.mark.parametrize("why", ["busy", "recent"])
def test_a_chunk_is_not_saved_while_a_save_is_busy_or_recent_but_a_stop_and_the_last_one_are(
    tmp_path, monkeypatch, why):
  # Orbax made to look busy at every chunk's end, or a minimum interval no chunk reaches: after the run's first
  # chunk only the stop_after chunk and the last one are saved, and the run resumed from the stop_after
  # checkpoint still ends identical to an uninterrupted one.
  cfg = lambda: _gauss(checkpoint_every=2, checkpoint_min_seconds=1e-9 if why == "busy" else 3600.0)
  exp = loop.Experiment(cfg())
  full = loop.run(cfg(), str(tmp_path / "full"), experiment=exp)
  monkeypatch.setattr(checkpoint.Checkpoints, "busy", lambda self: why == "busy")
  wd = str(tmp_path / "cut")
  loop.run(cfg(), wd, stop_after=8, experiment=exp)
  ck = os.path.join(wd, "checkpoints")
  assert sorted(int(s) for s in os.listdir(ck) if s.isdigit()) == [2, 8]
  resumed = loop.run(cfg(), wd, experiment=exp)
  assert sorted(int(s) for s in os.listdir(ck) if s.isdigit()) == [8, 10, 12]  # keep_checkpoints=3
  for k in full["metrics"]:
    np.testing.assert_array_equal(full["metrics"][k], resumed["metrics"][k], err_msg=k)
  assert _jsonl(wd) == _jsonl(str(tmp_path / "full"))


def test_nan_error_names_the_checkpoint_a_rerun_resumes_from_when_saves_were_skipped(tmp_path, monkeypatch):
  # Saves after the first are skipped (Orbax looks busy); a NaN at generation 9 stops the run in chunk 8-9, and
  # the one-line error points at the checkpoint that really exists (2), not at the chunk's start.
  orig = loop.Experiment._generation

  def nan_at_9(self, carry, g, shared):
    carry, metrics, snap = orig(self, carry, g, shared)
    name = sorted(metrics)[0]
    return carry, dict(metrics, **{name: jax.numpy.where(g == 9, jax.numpy.nan, metrics[name])}), snap

  monkeypatch.setattr(loop.Experiment, "_generation", nan_at_9)
  monkeypatch.setattr(checkpoint.Checkpoints, "busy", lambda self: True)
  wd = str(tmp_path / "run")
  with pytest.raises(loop.NonFiniteError, match=r"^generation 9: .* resumes at generation 2 from"):
    loop.run(_gauss(checkpoint_every=2, checkpoint_min_seconds=1e-9), wd)
  assert sorted(int(s) for s in os.listdir(os.path.join(wd, "checkpoints")) if s.isdigit()) == [2]


@pytest.mark.parametrize("case", ["append_landed_save_did_not", "save_landed_append_did_not", "torn_last_line"])
def test_metrics_jsonl_follows_the_checkpoint_after_a_kill_byte_for_byte(tmp_path, case):
  # The chunk's lines are appended while its checkpoint is still being saved, so a kill can leave the file ahead
  # of the newest checkpoint on disk (and a kill mid-append a torn last line) or behind it.
  exp = loop.Experiment(_gauss())
  loop.run(_gauss(), str(tmp_path / "full"), experiment=exp)
  with open(tmp_path / "full" / "metrics.jsonl", "rb") as fh:
    ref = fh.read()
  lines = ref.splitlines(keepends=True)
  wd = tmp_path / "cut"
  loop.run(_gauss(), str(wd), stop_after=8, experiment=exp)
  ck = wd / "checkpoints"
  if case == "append_landed_save_did_not":  # killed mid-save of step 8, then mid-append of generation 8's line
    shutil.rmtree(ck / "8")
    os.makedirs(ck / "8.orbax-checkpoint-tmp-1")
    text = b"".join(lines[:8]) + lines[8][:25]
  elif case == "save_landed_append_did_not":
    text = b"".join(lines[:4])
  else:
    text = b"".join(lines[:8]) + lines[8][:-9]
  (wd / "metrics.jsonl").write_bytes(text)
  loop.run(_gauss(), str(wd), experiment=exp)
  assert (wd / "metrics.jsonl").read_bytes() == ref


# --- the key schedule, the stats and the snapshots against a by-hand recursion ---------------------------------
HAND = dict(seed=5, generations=5, chains=5, num_devices=4, checkpoint_every=2, n_real=60,
            snapshot_generations=(0, 3, 4, 9), snapshot_size=7)


def _by_hand(seed, chains, G, R, M):
  """Chain c of the 1-D MLE Gaussian recursion in float64 numpy, from the documented keys only:
  chain = fold_in(PRNGKey(seed), c); real data from fold_in(chain, 1); generation g's key
  fold_in(fold_in(chain, 0), g), whose fold_in 2 draws the samples. Returns mean_CxG, var_CxG, samples_CxGxM."""
  mean, var, samples = np.zeros((chains, G)), np.zeros((chains, G)), np.zeros((chains, G, M))
  for c in range(chains):
    chain = jax.random.fold_in(jax.random.PRNGKey(seed), c)
    x = np.asarray(jax.random.normal(jax.random.fold_in(chain, 1), (R, 1)), np.float64)[:, 0]
    for g in range(G):
      mean[c, g], var[c, g] = x.mean(), x.var()
      key = jax.random.fold_in(jax.random.fold_in(chain, 0), g)
      z = np.asarray(jax.random.normal(jax.random.fold_in(key, 2), (M, 1)), np.float64)[:, 0]
      samples[c, g] = x = mean[c, g] + np.sqrt(var[c, g]) * z
  return mean, var, samples


@pytest.fixture(scope="module")
def hand_run(tmp_path_factory):
  """One Gaussian run (5 chains padded to 8 on 4 devices, chunks of 2) and its by-hand recomputation."""
  hist = loop.run(_gauss(**HAND), str(tmp_path_factory.mktemp("hand") / "run"))
  mean, var, samples = _by_hand(HAND["seed"], HAND["chains"], HAND["generations"], HAND["n_real"], 100)
  sd = np.sqrt(var)
  per_chain = {"var_ratio": var, "mean_abs_err": np.abs(mean), "std_abs_err": np.abs(sd - 1),
               "cov_frob_err": np.abs(var - 1), "w2": np.sqrt(mean**2 + (sd - 1) ** 2)}  # 1-D closed forms
  return hist, per_chain, samples


# float32 loop vs float64 numpy: sums of 60-100 float32 values and a 5-generation recursion stay within ~1e-6
# relative; any wrong key or chain changes these values by O(1). Worst case gamma(100) = 6e-6 per generation,
# ~3e-5 over 5 (each fit seeds the next draw) > rtol 2e-5; random walk sqrt(100) u * 5 ~ 3e-6: judged at risk.
TOL = dict(rtol=2e-5, atol=2e-6)


def test_key_schedule_recomputed_by_hand(hand_run):
  hist, per_chain, _ = hand_run
  for name in ("var_ratio", "mean_abs_err"):
    np.testing.assert_allclose(hist["metrics"][name][:, 0], per_chain[name].mean(0), **TOL, err_msg=name)


def test_stats_are_numpy_over_the_real_chains_only(hand_run):
  hist, per_chain, _ = hand_run
  qs = _gauss().quantiles
  for name, v_CxG in per_chain.items():
    want = np.stack([v_CxG.mean(0), v_CxG.std(0)] + [np.quantile(v_CxG, q, axis=0) for q in qs], axis=1)
    np.testing.assert_allclose(hist["metrics"][name], want, **TOL, err_msg=name)


def test_snapshots_are_chain_0s_samples_of_exactly_those_generations(hand_run):
  hist, _, samples = hand_run
  # Generation 9 >= generations is dropped; 3 sits inside the chunk [2, 4), 4 starts the chunk [4, 5).
  assert hist["snapshots"].shape == (3, 7, 1)
  for i, g in enumerate((0, 3, 4)):
    np.testing.assert_allclose(hist["snapshots"][i, :, 0], samples[0, g, :7], **TOL, err_msg=f"generation {g}")


def test_results_do_not_depend_on_checkpoint_every_or_where_a_run_stops(tmp_path):
  # accumulate_subsample: the training set depends on the whole carried pool and on the mixing key, so a resume
  # that re-runs early generations on the restored pool, or a chunk that reuses keys, changes the results.
  kw = dict(generations=12, chains=3, regime__name="accumulate_subsample", regime__subsample=150)
  ref = loop.run(_gauss(checkpoint_every=12, **kw), str(tmp_path / "ref"))
  for every in (1, 3):
    other = loop.run(_gauss(checkpoint_every=every, **kw), str(tmp_path / f"every{every}"))
    for k in ref["metrics"]:
      np.testing.assert_array_equal(ref["metrics"][k], other["metrics"][k], err_msg=f"{k}, every {every}")
  # Stopped at generation 5 (not a multiple of the 4 it resumes with), resumed in chunks 5-9, 9-12.
  wd = str(tmp_path / "cut")
  loop.run(_gauss(checkpoint_every=5, **kw), wd, stop_after=5)
  assert len(_jsonl(wd)) == 5
  loop.run(_gauss(checkpoint_every=4, **kw), wd)
  assert _jsonl(wd) == _jsonl(str(tmp_path / "ref"))


def test_progress_pace_reads_seconds_per_generation_when_slow():
  assert loop._pace(250.0, 500) == "250 gen/s  ETA 0:00:02"
  assert loop._pace(1 / 42.5, 3) == "42.5 s/gen  ETA 0:02:07"
  assert loop._pace(1.0, 3600) == "1 gen/s  ETA 1:00:00"
