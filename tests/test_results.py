"""benchmarks/results.py: the blocks of measured results in the docs. The pure parts (markers, replacing a block,
formatting one, what --check compares) without running experiments; --check and the rewrite through main() with
the measurement stubbed; one tiny real run through the CLI."""
import ast
import json
import os

import numpy as np
import pytest

from benchmarks import results
from collapse_jax import metrics

MACHINE = {"cpu": "Test CPU 9000", "isa": "avx512", "cores": 3, "jax": "0.1.2", "jaxlib": "0.1.3",
           "commit": "abc1234+dirty", "date": "2030-01-02"}

PY = '''"""Summary line.

Prose before.
Measured (python -m benchmarks.results --only demo; commit old, 2029-01-01):
stale line
(end of measured block demo)
Prose after.
"""
X = 1
'''

MD = "# T\n\nbefore\n<!-- results:demo -->\nstale line\n<!-- /results:demo -->\nafter\n"


class Fam:
  headline = ("a", "b")
  titles = {"a": "metric A", "b": "KL(p || q)"}


def _series(chains: int, n: int = 7) -> dict:
  """metrics.series of a made-up metrics.jsonl: one chain writes `name: value`, several `name/stat`."""
  rows = []
  for g in range(n):
    row = {"generation": g, "train_samples": 10}
    for name, base in (("a", 1.0), ("b", -2.0), ("c", 5.0)):
      v = base + 0.123456 * g
      if chains == 1:
        row[name] = v
      else:
        row.update({f"{name}/mean": v, f"{name}/std": v / 10, f"{name}/q50": v + 1})
    rows.append(row)
  return metrics.series(rows)


def _parse_table(lines: list[str]) -> tuple[list[int], dict[str, list[float]]]:
  """A Markdown table read back: generations of the header, label -> floats."""
  rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines if line.startswith("|")]
  gens = [int(g) for g in rows[0][1:]]
  return gens, {r[0]: [float(x) for x in r[1:]] for r in rows[2:]}


def test_replace_swaps_exactly_the_block_in_a_docstring_and_in_markdown():
  new_py = ["Measured (python -m benchmarks.results --only demo; commit new, 2030):", "fresh", "",
            "(end of measured block demo)"]
  out = results.replace(PY, "demo", "configs/demo.py", new_py)
  assert "stale line" not in out and "commit old" not in out
  assert ast.get_docstring(ast.parse(out)) == "Summary line.\n\nProse before.\n" + "\n".join(new_py) + "\nProse after."
  assert out.endswith('"""\nX = 1\n')
  # Markdown: markers kept, everything outside untouched; replacing twice is the same as once.
  new_md = ["<!-- results:demo -->", "fresh", "<!-- /results:demo -->"]
  out = results.replace(MD, "demo", "WORKSPACE.md", new_md)
  assert out == "# T\n\nbefore\n<!-- results:demo -->\nfresh\n<!-- /results:demo -->\nafter\n"
  assert results.replace(out, "demo", "WORKSPACE.md", new_md) == out
  assert results.extract(out, "demo", "WORKSPACE.md") == new_md


def test_an_indented_block_keeps_its_indentation():
  text = "  Measured (python -m benchmarks.results --only demo; x):\n  old\n  (end of measured block demo)\n"
  out = results.replace(text, "demo", "a.py", ["Measured (python -m benchmarks.results --only demo; y):", "",
                                               "(end of measured block demo)"])
  assert out == "  Measured (python -m benchmarks.results --only demo; y):\n\n  (end of measured block demo)\n"


@pytest.mark.parametrize("text, what", [
    (MD.replace("<!-- /results:demo -->\n", ""), "the marker `<!-- /results:demo -->` occurs 0 times"),
    (MD + "<!-- results:demo -->\n", "the marker `<!-- results:demo -->` occurs 2 times"),
    ("<!-- /results:demo -->\nx\n<!-- results:demo -->\n", "block demo ends (line 1) before it starts (line 3)"),
    (MD.replace("demo", "other"), "the marker `<!-- results:demo -->` occurs 0 times"),
])
def test_missing_doubled_or_reversed_markers_name_the_file(text, what):
  for fn in (lambda: results.extract(text, "demo", "docs/X.md"),
             lambda: results.replace(text, "demo", "docs/X.md", ["x"])):
    with pytest.raises(results.MarkerError) as e:
      fn()
    assert str(e.value).startswith("docs/X.md: ") and what in str(e.value)


def test_a_prefix_name_does_not_match_a_longer_one():
  text = PY.replace("--only demo;", "--only demo_more;")
  with pytest.raises(results.MarkerError, match="occurs 0 times"):
    results.extract(text, "demo", "a.py")


def test_header_names_command_commit_date_and_machine():
  lines = results.header("lm", MACHINE)
  assert lines[0].startswith("Measured (python -m benchmarks.results --only lm;")
  text = " ".join(lines)
  for value in MACHINE.values():
    assert str(value) in text, value
  assert "3 cores" in text and "jax 0.1.2" in text and "jaxlib 0.1.3" in text and "commit abc1234+dirty" in text


@pytest.mark.parametrize("chains", [1, 4])
def test_table_reads_back_as_the_series_values(chains):
  series = _series(chains)
  run = results.Run("x", "configs/x.py", extra=("c",), generations=(0, 2, 99))
  lines = results.block("demo", run, "configs/x.py", MACHINE, 12.34, 0.25, series, Fam)
  assert lines[-1] == "(end of measured block demo)"
  assert any(line.startswith("Wall time 12.3 s, 7 generations (`--config=x`") and "0.2 cores" in line
             for line in lines)
  gens, table = _parse_table(lines)
  assert gens == [0, 2, 6]  # 99 is past the run; the last generation always shown
  stats = ["mean"] if chains == 1 else ["mean", "std", "q50"]
  expect_labels = []
  # Headline, then extra; titles where given, a pipe (a Markdown cell's edge) spelled as a double bar.
  for key, title in (("a", "metric A"), ("b", "KL(p \u2016 q)"), ("c", "c")):
    for s in stats:
      label = f"{title} [{key}]" if chains == 1 else f"{title} [{key}/{s}]"
      expect_labels.append(label)
      np.testing.assert_allclose(table[label], series[key][s][gens], rtol=5e-4)  # 4 significant figures
  assert list(table) == expect_labels


def test_default_generations_spread_over_the_run():
  gens, _ = _parse_table(results.table(_series(1, n=50), Fam, results.Run("x", "x.py")))
  assert gens[0] == 0 and gens[-1] == 49 and 4 <= len(gens) <= 7 and gens == sorted(set(gens))


def test_unknown_metric_is_named():
  with pytest.raises(KeyError, match="metric zz is not in"):
    results.table(_series(1), Fam, results.Run("x", "x.py", extra=("zz",)))


def test_comparable_ignores_machine_and_wall_time_only():
  series = _series(1)
  run = results.Run("x", "x.md")
  a = results.block("demo", run, "x.md", MACHINE, 10.0, 0.0, series, Fam)
  b = results.block("demo", run, "x.md", dict(MACHINE, cpu="Other", commit="fff"), 99.0, None, series, Fam)
  assert a != b and results.comparable(a) == results.comparable(b)
  series["a"]["mean"] = series["a"]["mean"] * 1.01
  c = results.block("demo", run, "x.md", MACHINE, 10.0, 0.0, series, Fam)
  assert results.comparable(a) != results.comparable(c)


def test_committed_docs_hold_every_runs_block_once_and_no_other():
  texts = results._check_markers(list(results.RUNS))
  for path, text in texts.items():
    named = {line.split("results:")[1].split(" ")[0] for line in text.splitlines() if line.startswith("<!-- results:")}
    named |= {line.split("--only ")[1].split(";")[0] for line in text.splitlines()
              if line.startswith("Measured (python -m benchmarks.results --only ")}
    assert named == {n for n, r in results.RUNS.items() if path in results.targets(r)}, path


def _fake_repo(tmp_path, monkeypatch, series):
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "demo.py").write_text(PY)
  (tmp_path / "WORKSPACE.md").write_text(MD)
  calls = []

  def measure(name, run, workdir, overrides=()):
    calls.append(name)
    return 3.0, series, Fam
  monkeypatch.setattr(results, "REPO", str(tmp_path))
  monkeypatch.setattr(results, "RUNS", {"demo": results.Run("demo", "configs/demo.py", workspace=True)})
  monkeypatch.setattr(results, "measure", measure)
  monkeypatch.setattr(results, "machine", lambda: MACHINE)
  monkeypatch.setattr(results, "others_load", lambda: 0.0)
  return calls


def test_main_rewrites_then_check_passes_and_catches_drift(tmp_path, monkeypatch, capsys):
  series = _series(1)
  calls = _fake_repo(tmp_path, monkeypatch, series)
  assert results.main(["--check"]) == 1  # the stale blocks
  assert (tmp_path / "WORKSPACE.md").read_text() == MD  # --check writes nothing
  assert results.main([]) == 0
  doc, ws = (tmp_path / "configs" / "demo.py").read_text(), (tmp_path / "WORKSPACE.md").read_text()
  assert "stale line" not in doc + ws and "commit abc1234+dirty" in doc and "commit abc1234+dirty" in ws
  assert ws.startswith("# T\n\nbefore\n<!-- results:demo -->\nMeasured (") and ws.endswith("\nafter\n")
  ast.parse(doc)
  monkeypatch.setattr(results, "machine", lambda: dict(MACHINE, commit="zzz", date="2031-01-01"))
  assert results.main(["--check"]) == 0  # another commit, date and wall time: the same numbers
  series["b"]["mean"] = series["b"]["mean"] + 1
  capsys.readouterr()
  assert results.main(["--check"]) == 1
  out = capsys.readouterr().out
  assert "drift" in out and "demo (configs/demo.py)" in out and "demo (WORKSPACE.md)" in out
  assert calls == ["demo"] * 4


def test_main_refuses_a_missing_marker_before_running(tmp_path, monkeypatch, capsys):
  calls = _fake_repo(tmp_path, monkeypatch, _series(1))
  (tmp_path / "WORKSPACE.md").write_text(MD.replace("<!-- /results:demo -->\n", ""))
  assert results.main([]) == 2
  assert calls == [] and "WORKSPACE.md: the marker `<!-- /results:demo -->` occurs 0 times" in capsys.readouterr().err
  assert results.main(["--only", "nope"]) == 2


def test_run_cli_runs_on_the_cpu_with_the_default_devices(monkeypatch, tmp_path):
  seen = {}

  class Done:
    returncode, stdout, stderr = 0, "", ""

  def fake_run(cmd, cwd, env, capture_output, text):
    seen.update(cmd=cmd, env=env)
    return Done()
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  monkeypatch.setattr(results.subprocess, "run", fake_run)
  results.run_cli("gmm:quick", str(tmp_path), ("--config.seed=1",))
  assert seen["cmd"][-3:] == ["--config=gmm:quick", f"--workdir={tmp_path}", "--config.seed=1"]
  assert "XLA_FLAGS" not in seen["env"] and seen["env"]["JAX_PLATFORMS"] == "cpu"


def test_a_tiny_real_gaussian_run(tmp_path):
  run = results.Run("gaussian", "configs/gaussian.py", generations=(0, 1))
  work = str(tmp_path / "g")
  seconds, series, family = results.measure("gaussian", run, work, (
      "--config.generations=3", "--config.chains=8", "--config.checkpoint_every=3"))
  assert seconds > 0 and family.name == "gaussian"
  lines = results.block("gaussian", run, "configs/gaussian.py", MACHINE, seconds, None, series, family)
  gens, table = _parse_table(lines)
  assert gens == [0, 1, 2]
  with open(os.path.join(work, "metrics.jsonl")) as fh:  # read back by plain json, not metrics.read_jsonl
    rows = [json.loads(line) for line in fh]
  assert len(rows) == 3
  for key in ("var_ratio", "w2"):
    for stat in ("mean", "std", "q05", "q95"):
      label = f"{family.titles[key]} [{key}/{stat}]"
      np.testing.assert_allclose(table[label], [rows[g][f"{key}/{stat}"] for g in gens], rtol=5e-4)
