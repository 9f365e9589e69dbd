"""The measured results quoted in the docs, regenerated from real runs so they cannot drift: each run below goes
through the CLI in a fresh workdir (its own process, JAX_PLATFORMS=cpu, no XLA_FLAGS: the defaults a reader
gets), is timed, and its metrics.jsonl becomes a block rewritten in place in its config's docstring and, for the
runs WORKSPACE.md reports, in WORKSPACE.md.

  python -m benchmarks.results [--only readme_gmm,lm,...] [--check]

Blocks sit between markers, and everything outside them is hand-written (interpretation belongs there, checked
against the block by whoever regenerates it):
  docstrings:   a line `Measured (python -m benchmarks.results --only NAME; ...):` ..
                the line `(end of measured block NAME)`
  WORKSPACE.md: the lines `<!-- results:NAME -->` .. `<!-- /results:NAME -->`
A block holds the machine (CPU model and ISA, cores, jax/jaxlib, date, commit with +dirty for uncommitted
changes), the wall time of the CLI process (start-up and compilation included) and a table of the family's
headline metrics (plus the run's extra ones) at a few generations. `--check` reruns the runs and exits 1, naming
them, where a committed block's table differs from this machine's (the machine line and wall time are not
compared). Float32 recursions amplify last-bit differences between CPUs, so a check is only meaningful on the
CPU its block names; the check says when it is run elsewhere.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from benchmarks.common import commit, others_load  # noqa: E402
from collapse_jax import hardware, metrics, paths, tables  # noqa: E402
from collapse_jax.registry import family_class  # noqa: E402

WORKSPACE = "WORKSPACE.md"
_LM_EXTRA = ("data_ppl0_q50", "test_kl", "gen_tail_token_frac", "gen_impossible", "gen_rep_2")


@dataclasses.dataclass(frozen=True)
class Run:
  config: str                          # the CLI's --config
  doc: str                             # the config file whose docstring holds the block
  workspace: bool = False              # WORKSPACE.md holds a block too
  extra: tuple[str, ...] = ()          # metrics shown after the family's headline
  generations: tuple[int, ...] = ()    # the generations shown (default: tables.spread); the last one always


# Only runs that need no data files and take minutes at most on 2 CPU cores; GPU rows and throughput rows are
# hand-written (benchmarks/suite.py measures the latter).
RUNS = {
    "readme_gmm": Run("configs/gmm.py", "configs/gmm.py", workspace=True, extra=("comp_std_min", "em_iters"),
                      generations=(0, 50, 100, 200, 350, 1000, 2000)),
    "gmm_quick": Run("gmm:quick", "configs/gmm.py"),
    "gaussian": Run("gaussian", "configs/gaussian.py", generations=(0, 9, 99, 499)),
    "vae": Run("vae", "configs/vae.py", workspace=True),
    "vae_real_fraction": Run("vae:real_fraction", "configs/vae.py", workspace=True),
    "lm": Run("lm", "configs/lm.py", workspace=True, extra=_LM_EXTRA),
    "lm_real_fraction": Run("lm:real_fraction", "configs/lm.py", workspace=True, extra=_LM_EXTRA),
}


# Figures the report command draws from runs above (all of them measured in the same invocation), committed under
# benchmarks/figures/<name>/ with its report.md: the paper's comparison of regimes, from the real runs.
REPORTS = {"lm_regimes": ("lm", "lm_real_fraction")}


class MarkerError(ValueError):
  """A block's markers are missing, doubled or out of order in a file."""


# --- pure: markers, blocks, tables -----------------------------------------------------------------------------
def markers(name: str, path: str) -> tuple[str, str]:
  """(start prefix, end line) of run `name`'s block in `path`: Markdown comments in .md files, plain lines in a
  docstring otherwise (the start line is the block's header, so it is matched by its fixed beginning)."""
  if path.endswith(".md"):
    return f"<!-- results:{name} -->", f"<!-- /results:{name} -->"
  return f"Measured (python -m benchmarks.results --only {name};", f"(end of measured block {name})"


def _span(lines: list[str], name: str, path: str) -> tuple[int, int]:
  start, end = markers(name, path)
  starts = [i for i, line in enumerate(lines) if line.lstrip().startswith(start)]
  ends = [i for i, line in enumerate(lines) if line.strip() == end]
  for what, found in ((start, starts), (end, ends)):
    if len(found) != 1:
      raise MarkerError(f"{path}: the marker `{what}` occurs {len(found)} times (must be once) for block {name}")
  if ends[0] < starts[0]:
    raise MarkerError(f"{path}: block {name} ends (line {ends[0] + 1}) before it starts (line {starts[0] + 1})")
  return starts[0], ends[0]


def extract(text: str, name: str, path: str) -> list[str]:
  """The lines of block `name` in `text` (markers included, indentation stripped)."""
  lines = text.split("\n")
  s, e = _span(lines, name, path)
  return [line.strip() for line in lines[s:e + 1]]


def replace(text: str, name: str, path: str, block: list[str]) -> str:
  """`text` with block `name` (markers included) replaced by `block`, indented as its start line was."""
  lines = text.split("\n")
  s, e = _span(lines, name, path)
  indent = lines[s][:len(lines[s]) - len(lines[s].lstrip())]
  return "\n".join(lines[:s] + [indent + b if b else b for b in block] + lines[e + 1:])


def comparable(block: list[str]) -> list[str]:
  """What --check compares: the block less its machine lines and wall time, which differ from run to run."""
  return [line for line in block if not line.startswith(("Measured (", "Machine: ", "Wall time "))]


def header(name: str, machine: dict) -> list[str]:
  """The block's first lines: the command that made it, the commit and date, then the machine."""
  return [f"Measured (python -m benchmarks.results --only {name}; commit {machine['commit']}, {machine['date']}):",
          f"Machine: {machine['cpu']} ({machine['isa']}), {machine['cores']} cores, jax {machine['jax']}, "
          f"jaxlib {machine['jaxlib']}."]


def table(series: dict, family, run: Run) -> list[str]:
  """The run's metrics (the family's headline, then `run.extra`) at its generations, one row per metric, or per
  metric and statistic where the run has several chains; labelled by the family's titles and the metrics.jsonl
  key."""
  n = len(series["generation"]["mean"])
  gens = [g for g in run.generations if g < n] or tables.spread(n)
  gens = sorted(set(gens) | {n - 1})
  rows = []
  for key in tuple(family.headline) + tuple(run.extra):
    if key not in series:
      raise KeyError(f"metric {key} is not in the run's metrics.jsonl (has: {', '.join(sorted(series))})")
    # A `|` would split a Markdown cell (the LM's "KL(source || model)"); a docstring cannot hold `\|`.
    title = family.titles.get(key, key).replace("||", "\u2016").replace("|", "/")
    for stat, values in series[key].items():
      label = f"{title} [{key}]" if len(series[key]) == 1 and stat == "mean" else f"{title} [{key}/{stat}]"
      rows.append([label] + [float(values[g]) for g in gens])
  return tables.markdown(["generation"] + [str(g) for g in gens], rows).rstrip("\n").split("\n")


def wall_line(run: Run, seconds: float, n: int, load: float | None) -> str:
  busy = "not measured" if load is None else f"{load:.1f} cores"
  return (f"Wall time {seconds:.1f} s, {n} generations (`--config={run.config}`; start-up and compilation "
          f"included; others' load {busy}).")


def block(name: str, run: Run, path: str, machine: dict, seconds: float, load: float | None, series: dict,
          family) -> list[str]:
  """Run `name`'s block for `path`, markers included."""
  body = header(name, machine) + [wall_line(run, seconds, len(series["generation"]["mean"]), load), ""]
  body += table(series, family, run)
  for line in body:
    if '"""' in line or "\\" in line:  # it goes into a docstring
      raise ValueError(f"block {name}: a line a docstring cannot hold: {line!r}")
  start, end = markers(name, path)
  return [start] + body + [end] if path.endswith(".md") else body + [end]


def targets(run: Run) -> list[str]:
  return [run.doc] + ([WORKSPACE] if run.workspace else [])


# --- impure: the machine, the runs, the files ------------------------------------------------------------------
def machine() -> dict:
  c = hardware.cpu()
  return {"cpu": c["model"], "isa": c["isa"], "cores": c["cores"], "jax": importlib.metadata.version("jax"),
          "jaxlib": importlib.metadata.version("jaxlib"), "commit": commit(),
          "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")}


def cli_env() -> dict:
  """The CLI's environment for every run here: the CPU with the defaults a reader gets (no XLA_FLAGS)."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""))
  return env


def run_cli(config: str, workdir: str, overrides: tuple[str, ...] = ()) -> float:
  """Runs `collapse-jax --config=CONFIG --workdir=WORKDIR [overrides]` in its own process on the CPU with the
  defaults (no XLA_FLAGS); returns its wall time in seconds. A failed run raises with its last output lines."""
  t0 = time.perf_counter()
  proc = subprocess.run([sys.executable, "-m", "collapse_jax.main", f"--config={config}", f"--workdir={workdir}",
                         *overrides], cwd=REPO, env=cli_env(), capture_output=True, text=True)
  seconds = time.perf_counter() - t0
  if proc.returncode:
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
    raise RuntimeError(f"--config={config} exited {proc.returncode}:\n{tail}")
  return seconds


def measure(name: str, run: Run, workdir: str, overrides: tuple[str, ...] = ()) -> tuple[float, dict, type]:
  """(wall seconds, metrics.series of its metrics.jsonl, family class) of one run in `workdir`."""
  seconds = run_cli(run.config, workdir, overrides)
  family = json.loads(paths.read_text(os.path.join(workdir, "config.json")))["family"]
  return seconds, metrics.series(metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))), family_class(family)


def _check_markers(names: list[str]) -> dict[str, str]:
  """Every target file's text, after checking each named block's markers occur once (before any run)."""
  texts = {}
  for name in names:
    for path in targets(RUNS[name]):
      texts.setdefault(path, paths.read_text(os.path.join(REPO, path)))
      extract(texts[path], name, path)
  return texts


def draw_report(root: str, runs, out: str) -> None:
  """`collapse-jax report` over the runs' workdirs (named relative to `root`, so report.md shows the run names)."""
  subprocess.run([sys.executable, "-m", "collapse_jax.main", "report", *runs, "--out", out], cwd=root,
                 env=cli_env(), check=True, stdout=subprocess.DEVNULL)
  print(f"report of {', '.join(runs)}: {out}", flush=True)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--only", default="", help=f"comma-separated runs (default: all of {', '.join(RUNS)})")
  ap.add_argument("--check", action="store_true", help="compare with the committed blocks instead of rewriting")
  ap.add_argument("--keep", default=None, help="write the runs' workdirs here (default: a temporary folder)")
  args = ap.parse_args(argv)
  names = [n for n in args.only.split(",") if n] or list(RUNS)
  unknown = [n for n in names if n not in RUNS]
  if unknown:
    print(f"error: --only: unknown run {', '.join(unknown)} (known: {', '.join(RUNS)})", file=sys.stderr)
    return 2
  try:
    texts = _check_markers(names)
  except MarkerError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  taken = [n for n in names if args.keep and os.path.exists(os.path.join(args.keep, n))]
  if taken:
    print(f"error: --keep: {', '.join(os.path.join(args.keep, n) for n in taken)} exists (a run there would "
          "resume, not run)", file=sys.stderr)
    return 2
  m, drifted = machine(), []
  with tempfile.TemporaryDirectory(prefix="results_") as tmp:  # the workdirs, unless --keep
    root = args.keep or tmp
    for name in names:
      run = RUNS[name]
      load = others_load()
      seconds, series, family = measure(name, run, os.path.join(root, name))
      print(f"{name}: {wall_line(run, seconds, len(series['generation']['mean']), load)}", flush=True)
      for path in targets(run):
        new = block(name, run, path, m, seconds, load, series, family)
        if args.check:
          old = extract(texts[path], name, path)
          if comparable(old) != comparable(new):
            drifted.append(f"{name} ({path})")
            committed = [line for line in old if line.startswith(("Measured (", "Machine: "))]
            pairs = itertools.zip_longest(comparable(old), comparable(new), fillvalue="")
            print(f"  {path}: differs. committed: {' '.join(committed)}\n  here: {' '.join(header(name, m))}\n"
                  + "\n".join(f"  - {a}\n  + {b}" for a, b in pairs if a != b))
        else:
          # Read again: the file may have been edited during the run (minutes); only the block changes.
          full = os.path.join(REPO, path)
          paths.write_atomic(full, replace(paths.read_text(full), name, path, new))
    if not args.check:
      for report, runs in REPORTS.items():
        if set(runs) <= set(names):
          draw_report(root, runs, os.path.join(REPO, "benchmarks", "figures", report))
  if drifted:
    print(f"drift (meaningful only on the CPU a block names): {', '.join(drifted)}")
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
