"""What a run leaves a researcher: summary.md (printed too), outputs after every saved chunk and rebuilt when a
finished workdir lacks them, runs extended by raising `generations`, --print_config, readable figures."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from collapse_jax import loop, metrics as metrics_lib, outputs, plots, tables
from collapse_jax.errors import ConfigError
from tests.helpers import REPO, cli, load_config


def _gauss(**kw):
  base = dict(generations=10, chains=1, checkpoint_every=2, plots=True, checkpoint_min_seconds=0)
  base.update(kw)
  return load_config("gaussian", "100", **base)


def _rows(wd):
  return metrics_lib.read_jsonl(os.path.join(wd, "metrics.jsonl"))


def _table(summary_md: str) -> dict[str, list[str]]:
  """summary.md's table as {metric name: cells}, and the generations of its columns under 'gens'."""
  lines = [l for l in summary_md.splitlines() if l.startswith("|")]
  out = {"gens": [c.strip()[4:] for c in lines[0].strip("|").split("|")[1:]]}
  for line in lines[2:]:
    cells = [c.strip() for c in line.strip("|").split("|")]
    out[re.search(r"`(\w+)`", cells[0]).group(1)] = cells[1:]
  return out


@pytest.mark.parametrize("chains", [1, 3])
def test_summary_printed_and_written_with_the_metrics_and_every_output(tmp_path, capsys, chains):
  wd = str(tmp_path / "run")
  loop.run(_gauss(chains=chains), wd)
  printed = capsys.readouterr().out
  with open(os.path.join(wd, "summary.md")) as fh:
    written = fh.read()
  assert written in printed  # the end of the run prints what it wrote
  table, series = _table(written), metrics_lib.series(_rows(wd))
  assert [int(g) for g in table["gens"]] == tables.spread(10)
  for m in ("var_ratio", "w2"):  # the gaussian family's headline
    want = [tables.fmt(series[m]["mean"][int(g)]) for g in table["gens"]]
    if chains > 1:
      want = [f"{w} +- {tables.fmt(series[m]['std'][int(g)])}" for w, g in zip(want, table["gens"])]
    assert table[m] == want
  listed = re.findall(r"^- (\S+)$", written, re.M)
  assert os.path.join(wd, "plots", "gaussian_metrics.png") in listed and os.path.join(wd, "metrics.jsonl") in listed
  assert all(os.path.exists(p) for p in listed)
  # The progress: a compiling line with its time, the headline metric on every generation line.
  assert re.search(r"compiling the generation loop .*\n.*compiling \d+\.\d+s of it", printed)
  lines = re.findall(r"generation (\d+)/10 .*  var_ratio (\S+)  ", printed)
  assert [int(e) for e, _ in lines] == [2, 4, 6, 8, 10]
  assert [v for _, v in lines] == [tables.fmt(series["var_ratio"]["mean"][int(e) - 1]) for e, _ in lines]
  # Again on the finished run: nothing runs, the same summary is printed.
  loop.run(_gauss(chains=chains), wd)
  again = capsys.readouterr().out
  assert "nothing to run" in again and written in again and "compiling" not in again


def test_outputs_follow_the_saved_chunks_of_a_stopped_run(tmp_path):
  wd = str(tmp_path / "run")
  loop.run(_gauss(), wd, stop_after=4)
  with open(os.path.join(wd, "outputs.json")) as fh:
    manifest = json.load(fh)
  assert manifest["generation"] == 4
  assert all(os.path.exists(os.path.join(wd, f)) for f in manifest["files"])
  assert "plots/gaussian_metrics.png" in manifest["files"]
  with open(os.path.join(wd, "summary.md")) as fh:
    summary = fh.read()
  assert "stopped after 4 of 10 generations" in summary
  assert _table(summary)["gens"] == ["0", "1", "2", "3"]


def test_the_background_drawing_gets_a_copy_of_the_generations_saved():
  """The figures are drawn on another thread while the loop fills the history with the next chunks: they must
  read a copy of the generations saved, unaffected by what the loop writes afterwards."""
  history = {"metrics": {"m": np.arange(10.0)[:, None]}, "arrays": {"h": np.arange(20.0).reshape(10, 2)},
             "snapshots": np.arange(3.0)[:, None]}
  head = outputs._head(history, 4, snap_gens=[1, 5, 8])
  history["metrics"]["m"][:] = -1
  history["arrays"]["h"][:] = -1
  history["snapshots"][:] = -1
  np.testing.assert_array_equal(head["metrics"]["m"], np.arange(4.0)[:, None])
  np.testing.assert_array_equal(head["arrays"]["h"], np.arange(8.0).reshape(4, 2))
  assert list(head["snapshots"]) == [1] and head["snapshots"][1].tolist() == [0.0]


_KILL_WHILE_DRAWING = """
import os, sys
from collapse_jax import config, loop, outputs
real = outputs.Outputs._write
def dying(self, history, done):
  if done == 10:  # checkpoints and metrics.jsonl are complete; the figures of the end are being drawn
    os._exit(9)
  real(self, history, done)
outputs.Outputs._write = dying
loop.run(config.load("gaussian", "100", generations=10, chains=1, checkpoint_every=2, checkpoint_min_seconds=0,
                     num_devices=1), sys.argv[1])
"""


def test_a_run_killed_while_drawing_its_last_outputs_gets_them_rebuilt(tmp_path):
  wd = str(tmp_path / "run")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  died = subprocess.run([sys.executable, "-c", _KILL_WHILE_DRAWING, wd], env=env, cwd=REPO, capture_output=True,
                        text=True, timeout=300)
  assert died.returncode == 9, died.stdout + died.stderr
  assert len(_rows(wd)) == 10  # the run itself was complete
  with open(os.path.join(wd, "outputs.json")) as fh:
    assert json.load(fh)["generation"] < 10  # the outputs were not
  again = cli("--config=gaussian:100", f"--workdir={wd}", "--config.generations=10", "--config.chains=1",
              "--config.checkpoint_every=2", "--config.checkpoint_min_seconds=0", "--config.num_devices=1")
  assert again.returncode == 0, again.stdout + again.stderr
  assert "nothing to run" in again.stdout
  with open(os.path.join(wd, "outputs.json")) as fh:
    manifest = json.load(fh)
  assert manifest["generation"] == 10 and all(os.path.exists(os.path.join(wd, f)) for f in manifest["files"])
  with open(os.path.join(wd, "summary.md")) as fh:
    assert "(finished)" in fh.read()
  # A deleted figure of a finished run is drawn again too.
  os.remove(os.path.join(wd, "plots", "gaussian_metrics.png"))
  loop.run(_gauss(num_devices=1), wd)
  assert os.path.exists(os.path.join(wd, "plots", "gaussian_metrics.png"))


def test_raising_generations_extends_a_run_identically(tmp_path):
  full = loop.run(_gauss(), str(tmp_path / "full"))
  wd = str(tmp_path / "ext")
  loop.run(_gauss(generations=5), wd)  # finished at 5 (a chunk of 1 at the end)
  # An extension killed after writing its config.json, before its first checkpoint: config.json says 7, the
  # checkpoint's history holds 5 (each checkpoint records its own length).
  with open(os.path.join(wd, "config.json")) as fh:
    cfg = json.load(fh)
  with open(os.path.join(wd, "config.json"), "w") as fh:
    json.dump(dict(cfg, generations=7), fh)
  loop.run(_gauss(generations=7), wd, stop_after=6)  # extended, stopped in between
  ext = loop.run(_gauss(), wd)
  with open(os.path.join(str(tmp_path / "full"), "metrics.jsonl"), "rb") as a, open(
      os.path.join(wd, "metrics.jsonl"), "rb") as b:
    assert a.read() == b.read()
  for k, v in full["metrics"].items():
    np.testing.assert_array_equal(ext["metrics"][k], v, err_msg=k)
  with open(os.path.join(wd, "config.json")) as fh:
    assert json.load(fh)["generations"] == 10


def test_lowering_generations_or_extending_an_accumulating_run_is_refused(tmp_path):
  wd = str(tmp_path / "run")
  loop.run(_gauss(generations=4, plots=False), wd)
  with pytest.raises(ConfigError, match=r"config.generations=3 is below the 4 .* can only be extended"):
    loop.run(_gauss(generations=3, plots=False), wd)
  acc = str(tmp_path / "acc")
  loop.run(_gauss(generations=4, plots=False, regime__name="accumulate"), acc)
  with pytest.raises(ConfigError, match=r"config.generations cannot be raised from 4 to 6 .* regime accumulate"):
    loop.run(_gauss(generations=6, plots=False, regime__name="accumulate"), acc)
  with pytest.raises(ConfigError, match=r"another config: config.seed"):  # other fields still refused
    loop.run(_gauss(generations=6, plots=False, seed=3), wd)


def test_print_config_prints_the_resolved_config_and_runs_nothing(tmp_path):
  wd = tmp_path / "never"
  out = cli("--config=gmm:quick", "--config.generations=7", "--config.regime.name=accumulate", "--print_config",
            f"--workdir={wd}")
  assert out.returncode == 0, out.stderr
  cfg = json.loads(out.stdout)
  assert cfg["generations"] == 7 and cfg["regime"]["name"] == "accumulate" and cfg["family"] == "gmm"
  assert cfg["gmm"]["components"] == 2
  assert not wd.exists()


def test_figures_are_titled_in_words_grouped_with_integer_ticks():
  G = 5
  by_stat = {m: {"mean": np.linspace(1, 2, G), "q05": np.zeros(G), "q25": np.zeros(G), "q50": np.ones(G),
                 "q75": np.ones(G), "q95": np.ones(G)} for m in ("a", "b", "c")}
  titles = {"a": "alpha in words", "b": "beta in words", "c": "gamma in words"}
  fig = plots.bands_figure("fam", by_stat, ("a", "b", "c"), 4, titles=titles, groups=(("a and c", ("a", "c")),))
  axes = [ax for ax in fig.axes if ax.has_data()]
  assert [ax.get_title() for ax in axes] == ["a and c", "beta in words"]
  assert [t.get_text() for t in axes[0].get_legend().get_texts()] == ["alpha in words", "gamma in words"]
  fig.canvas.draw()
  for ax in axes:
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks
  # The figure's title sits above every panel's title (constrained layout), not over them.
  renderer = fig.canvas.get_renderer()
  top = fig._suptitle.get_window_extent(renderer).y0
  assert all(ax.title.get_window_extent(renderer).y1 <= top for ax in axes)


def test_a_second_run_on_a_workdir_is_refused_and_a_killed_runs_lock_never_blocks(tmp_path):
  import signal
  import time
  wd = tmp_path / "run"
  args = ("--config=gmm", f"--workdir={wd}", "--config.generations=6000")  # long enough to be caught running
  first = cli(*args, background=True)
  deadline = time.time() + 120
  while time.time() < deadline and first.poll() is None and not (
      (wd / "checkpoints").exists() and any(s.isdigit() for s in os.listdir(wd / "checkpoints"))):
    time.sleep(0.05)
  second = cli(*args)
  assert second.returncode == 2
  assert second.stderr.strip().count("\n") == 0, second.stderr
  assert re.fullmatch(rf"error: workdir {wd} is in use by another run: pid {first.pid} on host \S+ since \S+ "
                      rf"\(lock file {wd}/lock.json\); wait for it or use another --workdir", second.stderr.strip())
  first.send_signal(signal.SIGKILL)
  first.wait()
  third = cli(*args)  # the dead run's lock does not block
  assert third.returncode == 0, third.stdout + third.stderr
  assert "resuming" in third.stdout
  assert len(_rows(str(wd))) == 6000 and not (wd / "lock.json").exists()


def test_every_metric_and_the_summary_reach_tensorboard(tmp_path):
  from tests.test_tracking import _tb_files, tensorboard_view
  wd = str(tmp_path / "run")
  loop.run(_gauss(chains=3), wd, stop_after=6)
  loop.run(_gauss(chains=3), wd)  # resumed: one point per generation all the same
  rows = _rows(wd)
  py, rs = tensorboard_view(_tb_files(wd))
  assert len(_tb_files(wd)) == 2
  for view in (py, rs):
    for key in ("var_ratio/mean", "w2/q95", "train_samples"):
      assert view[key] == [(g, pytest.approx(r[key], rel=1e-7)) for g, r in enumerate(rows)], key


def test_a_run_whose_lock_was_taken_over_stops_before_saving(tmp_path, monkeypatch):
  from collapse_jax import lock
  real = lock.acquire_run

  def taken_over(workdir):
    held = real(workdir)
    held.lost = f"workdir {workdir}: this run's lock was taken over by another run"
    return held

  monkeypatch.setattr(lock, "acquire_run", taken_over)
  wd = tmp_path / "run"
  with pytest.raises(lock.WorkdirBusy, match="taken over by another run"):
    loop.run(_gauss(plots=False), str(wd))
  assert not [s for s in os.listdir(wd / "checkpoints") if s.isdigit()]
