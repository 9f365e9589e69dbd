"""Loop invariants: sharded == unsharded, kill/resume == uninterrupted, finished runs are not redone,
bad input is refused before compilation with the field named, corrupt checkpoints fall back."""
import json
import os

import jax
import numpy as np
import pytest

from collapse_jax import loop
from collapse_jax.config import ConfigError
from collapse_jax import metrics as metrics_lib
from tests.helpers import cli, load_config, sigkill_then_resume


def _gauss(**kw):
  base = dict(generations=12, chains=13, checkpoint_every=4, plots=False)
  base.update(kw)
  return load_config("gaussian", "100", **base)


def _jsonl(workdir):
  return metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))


def test_sharded_equals_unsharded(tmp_path):
  assert len(jax.devices()) == 8, "conftest sets 8 simulated CPU devices"
  # 13 chains do not divide 8 devices: the loop pads the chain axis, and the padding must not leak into stats.
  one = loop.run(_gauss(num_devices=1), str(tmp_path / "one"))
  eight = loop.run(_gauss(num_devices=8), str(tmp_path / "eight"))
  for k in one["metrics"]:
    np.testing.assert_allclose(one["metrics"][k], eight["metrics"][k], rtol=1e-6, atol=1e-7, err_msg=k)


def test_metrics_jsonl_and_config_written(tmp_path):
  wd = str(tmp_path / "run")
  hist = loop.run(_gauss(plots=True), wd)
  rows = _jsonl(wd)
  assert [r["generation"] for r in rows] == list(range(12))
  assert rows[5]["var_ratio/mean"] == pytest.approx(float(hist["metrics"]["var_ratio"][5, 0]))
  assert rows[0]["train_samples"] == 100
  with open(os.path.join(wd, "config.json")) as fh:
    assert json.load(fh)["chains"] == 13
  assert os.path.exists(os.path.join(wd, "plots", "gaussian_metrics.png"))


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
      (["--config.nope=1"], "unknown config field 'nope'"),
      (["--config.regime.name=foo"], "config.regime.name='foo'"),
      (["--config.regime.real_fraction=2"], "config.regime.real_fraction must be in [0, 1]"),
  ]:
    r = cli("--config=configs/gaussian.py", f"--workdir={tmp_path / 'w'}", *args)
    assert r.returncode == 2, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr


def _corrupt(step_dir):
  """Overwrite every data file of an Orbax step with junk of the same size (a disk-level corruption)."""
  for root, _, files in os.walk(step_dir):
    for f in files:
      p = os.path.join(root, f)
      size = os.path.getsize(p)
      with open(p, "wb") as fh:
        fh.write(b"\x00garbage" * (size // 8 + 1))


def test_corrupt_latest_checkpoint_falls_back(tmp_path, capsys):
  full = loop.run(_gauss(), str(tmp_path / "full"))
  wd = str(tmp_path / "cut")
  loop.run(_gauss(), wd, stop_after=8)
  ck = os.path.join(wd, "checkpoints")
  assert sorted(int(s) for s in os.listdir(ck) if s.isdigit()) == [4, 8]
  _corrupt(os.path.join(ck, "8"))
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
    _corrupt(os.path.join(ck, s))
  with pytest.raises(ConfigError, match=r"no readable checkpoint in .*checkpoints/8"):
    loop.run(_gauss(), wd)
  assert sorted(os.listdir(ck)) == ["4", "8"]


def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path):
  # The README's main job (the paper's GMM recursion), shortened: 2 chains, a checkpoint every 5 generations.
  args = ["--config=configs/gmm.py", "--config.generations=300", "--config.chains=2",
          "--config.checkpoint_every=5", "--config.plots=False"]
  ref, resumed, done = sigkill_then_resume(tmp_path, args, min_checkpoints=2, timeout=120)
  assert 0 < done < 300
  assert resumed == ref
