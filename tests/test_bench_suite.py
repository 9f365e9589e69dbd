"""The benchmark methodology (benchmarks/common.py) and the suite (benchmarks/suite.py): the quiet check sees other
processes, a loaded machine is refused or its rows marked, rounds alternate, ratios are medians of per-round rate
ratios; `--short` writes its JSON and Markdown, and `compare` lays reports side by side."""
import argparse
import copy
import json
import os
import subprocess
import sys
import time

import pytest

from benchmarks import common, suite

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _args(**kw):
  a = common.add_args(argparse.ArgumentParser()).parse_args([])
  for k, v in kw.items():
    setattr(a, k, v)
  return a


def test_quiet_check_sees_a_busy_process():
  busy = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 20: pass"])
  try:
    time.sleep(0.5)  # past the interpreter's start-up
    # One process spinning is one core's worth of other load (less whatever the scheduler lends this one).
    assert common.others_load(1.5) > 0.6
  finally:
    busy.kill()
    busy.wait()


def test_own_work_is_not_counted_as_load(monkeypatch):
  # Over the window the host's busy CPU time grows by 3 s, of which 2 s are this process's own (its threads):
  # the other processes used 1 s. Real clocks would make this depend on whatever else runs; these are fixed.
  busy, own = iter([100.0, 103.0]), iter([(5.0, 1.0), (6.5, 1.5)])
  monkeypatch.setattr(common, "_busy_s", lambda: next(busy))
  monkeypatch.setattr(common.os, "times", lambda: next(own))
  clock = iter([10.0, 12.0])
  monkeypatch.setattr(common.time, "perf_counter", lambda: next(clock))
  monkeypatch.setattr(common.time, "sleep", lambda s: None)
  assert common.others_load(2.0) == pytest.approx(0.5)  # (3 - 2) s of others' CPU over 2 s of wall time


def test_loaded_machine_is_refused_or_marked():
  # max_load below zero: any machine counts as loaded, deterministically.
  with pytest.raises(SystemExit, match="refused: other processes use"):
    common.wait_quiet(_args(max_load=-1.0, wait=0.0), "t")
  state = common.wait_quiet(_args(max_load=-1.0, wait=0.0, allow_loaded=True), "t")
  assert state["loaded"] is True and state["others_cores_at_start"] >= 0.0 and "loadavg_1m_at_start" in state
  assert common.wait_quiet(_args(max_load=1e9, wait=0.0), "t")["loaded"] is False


def test_rounds_floor():
  with pytest.raises(SystemExit, match="at least 5 rounds"):
    common.check_rounds(_args(rounds=4))
  common.check_rounds(_args(rounds=5))


def test_rounds_alternate_and_ratio_is_median_of_round_rates():
  calls = []
  times = common.alternate({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 5)
  assert calls == ["a", "b", "b", "a", "a", "b", "b", "a", "a", "b"] and len(times["a"]) == 5
  # JAX does 100 units in 1 s per round; the peer 10 units in 0.5, 1, 2, 4, 8 s: per-round ratios 5, 10, 20, 40, 80.
  r = common.ratio([1.0] * 5, [0.5, 1.0, 2.0, 4.0, 8.0], jax_work=100, peer_work=10)
  assert r == {"ratio": 20.0, "ratio_min": 5.0, "ratio_max": 80.0}
  s = common.summary([1.0, 2.0, 4.0])
  assert s["median_s"] == 2.0 and s["spread"] == 1.5 and s["rounds"] == 3


def test_machine_record():
  m = common.machine()
  assert m["isa"] in ("avx512", "avx2", "sse", "unknown") and m["cores"] >= 1 and m["commit"]
  assert m["device_count"] == 8  # this test run's simulated devices
  assert {"python", "jax", "jaxlib", "flax", "optax", "numpy"} <= set(common.versions())


@pytest.fixture(scope="module")
def short_report(tmp_path_factory):
  out = tmp_path_factory.mktemp("suite")
  # One device, as a user's run has; the test machine is busy with this test run, hence --allow_loaded.
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  r = subprocess.run([sys.executable, "-m", "benchmarks.suite", "--short", "--allow_loaded", "--wait=0",
                      f"--out={out}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  return out, r.stdout


@pytest.mark.slow
def test_short_suite_writes_json_and_table(short_report):
  out, stdout = short_report
  with open(out / "suite.json") as f:
    rep = json.load(f)
  assert rep["short"] is True and rep["machine"]["device_count"] == 1 and rep["machine"]["isa"]
  assert rep["versions"]["jax"] and rep["machine"]["commit"] and rep["host_cpu"]["cores"] >= 1
  names = {x["name"] for x in rep["benchmarks"]}
  assert names == {n for n, b in suite.BENCHES.items() if (False, True) in b[-1]}, names
  for x in rep["benchmarks"]:
    assert x["rate"] > 0 and x["spread"] >= 0 and x["loaded"] in (True, False)
    if x["ratio"] is not None:  # a peer ran: its rate and the ratio's range are recorded with it
      assert x["peer_rate"] > 0 and x["ratio_min"] <= x["ratio"] <= x["ratio_max"]
  gmm = next(x for x in rep["benchmarks"] if x["name"] == "gmm")
  assert gmm["peer"] == "sklearn-1thread" and gmm["ratio"] > 0  # scikit-learn is a test dependency
  lm = next(x for x in rep["benchmarks"] if x["name"] == "lm_train")
  assert rep["peak"] is None or 0 < lm["mfu"] < 1  # MFU against the host's derived peak
  md = (out / "suite.md").read_text()
  assert md.count("\n| ") == 2 + len(rep["benchmarks"]) and rep["machine"]["cpu"] in md
  assert "written:" in stdout


@pytest.mark.slow
def test_compare_two_reports(short_report, tmp_path):
  out, _ = short_report
  with open(out / "suite.json") as f:
    a = json.load(f)
  b = copy.deepcopy(a)
  b["machine"].update(device_kind="TPU v5 lite", device_count=4)
  for x in b["benchmarks"]:
    x["rate"] *= 3.0
    x["ratio"] = None if x["ratio"] is None else x["ratio"] * 3.0
  (tmp_path / "b.json").write_text(json.dumps(b))
  md = suite.compare([str(out / "suite.json"), str(tmp_path / "b.json")], str(tmp_path / "cmp"))
  assert "TPU v5 lite x4" in md and "[1] rate" in md
  for xa, xb in zip(a["benchmarks"], b["benchmarks"]):
    row = next(ln for ln in md.splitlines() if ln.startswith(f"| {xa['label']} |"))
    assert f"{xa['rate']:.4g}" in row and f"{xb['rate']:.4g}" in row
    if xa["ratio"] is not None:
      assert f"{xa['ratio']:.2f}x" in row and f"{xb['ratio']:.2f}x" in row
  png = (tmp_path / "cmp" / "compare.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
  with pytest.raises(SystemExit, match="cannot read report"):
    suite.compare([str(out / "suite.json"), str(tmp_path / "missing.json")], str(tmp_path / "cmp2"))
