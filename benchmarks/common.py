"""The one benchmark methodology every benchmark uses: a quiet machine, peers on the same cores, alternating rounds,
medians with their spread, and the machine, versions and commit in every row.

Why each rule: other processes on the cores starve PyTorch's and BLAS's worker threads far more than XLA's pool, so
a loaded machine flatters JAX (by up to 20x on a 2-core VM); hence the quiet check before each benchmark and the
`loaded` mark on rows measured anyway. Alternating rounds (JAX first on even rounds, the peer first on odd ones)
spread slow drift (clock boost, a neighbour) over both sides; the median of the per-round ratios is the speed-up.

Quiet means: over a short window, the other processes' CPU use (all CPU time on the host less this process's own)
is below `--max_load` cores, and the 1-minute load average is recorded. The window measure is used rather than the
load average alone because inside a suite the load average still holds this process's previous benchmark.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import jax

from collapse_jax import hardware, progress

# Benchmarks time programs as a generation runs them, progress callbacks included, but keep their lines out of
# the tables.
progress.SINK = lambda line: None

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIN_ROUNDS = 5


def add_args(p: argparse.ArgumentParser, rounds: int = MIN_ROUNDS) -> argparse.ArgumentParser:
  p.add_argument("--rounds", type=int, default=rounds, help=f"timed rounds per side, alternating (>= {MIN_ROUNDS})")
  p.add_argument("--max_load", type=float, default=0.5, help="other processes' CPU use (cores) that counts as quiet")
  p.add_argument("--wait", type=float, default=120.0, help="seconds to wait for a quiet machine before giving up")
  p.add_argument("--allow_loaded", action="store_true",
                 help="measure on a loaded machine anyway; every row is then marked loaded")
  p.add_argument("--threads", type=int, default=0, help="peer threads (0: the cores JAX uses)")
  return p


def check_rounds(args) -> None:
  if args.rounds < MIN_ROUNDS:
    raise SystemExit(f"--rounds={args.rounds}: at least {MIN_ROUNDS} rounds give a median and a spread")


def _busy_s() -> float:
  """CPU seconds spent by every process on the host since boot (/proc/stat; user..steal less idle and iowait)."""
  with open("/proc/stat") as f:
    v = [int(x) for x in f.readline().split()[1:9]]
  return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def others_load(window: float = 2.0) -> float | None:
  """Cores' worth of CPU used by other processes over `window` seconds (None where /proc/stat is missing)."""
  try:
    b0, s0, t0 = _busy_s(), sum(os.times()[:2]), time.perf_counter()
    time.sleep(window)
    b1, s1, t1 = _busy_s(), sum(os.times()[:2]), time.perf_counter()
  except OSError:
    return None
  return max(0.0, ((b1 - b0) - (s1 - s0)) / (t1 - t0))


def wait_quiet(args, name: str) -> dict:
  """Before each benchmark: wait (bounded) for a quiet machine; refuse, or mark the rows loaded."""
  deadline = time.monotonic() + args.wait
  while True:
    others = others_load()
    quiet = others is None or others < args.max_load
    if quiet or time.monotonic() > deadline:
      break
    print(f"[{name}] waiting for a quiet machine: other processes use {others:.2f} cores "
          f"(> {args.max_load}); load average {os.getloadavg()[0]:.2f}", flush=True)
    time.sleep(5.0)
  state = {"others_cores_at_start": None if others is None else round(others, 2),
           "loadavg_1m_at_start": round(os.getloadavg()[0], 2), "loaded": not quiet}
  if not quiet:
    if not args.allow_loaded:
      raise SystemExit(f"[{name}] refused: other processes use {others:.2f} cores (> --max_load={args.max_load}) "
                       f"after waiting {args.wait:.0f} s; stop them, or pass --allow_loaded (rows marked loaded)")
    print(f"[{name}] WARNING: measuring on a loaded machine ({others:.2f} cores busy elsewhere): rows marked "
          "loaded; ratios against threaded peers are not meaningful", flush=True)
  return state


def peer_threads(args) -> int:
  """The peer gets the cores JAX uses (XLA:CPU's pool spans every core of the process's affinity)."""
  return args.threads or hardware.cpu()["cores"]


def pin_torch(args):
  import torch
  torch.set_num_threads(peer_threads(args))
  return torch


def alternate(fns: dict, rounds: int) -> dict[str, list[float]]:
  """Times each callable once per round (each must block until its device finishes), alternating the order; the
  callers warm each one up first (compilation, allocator, thread pools)."""
  times = {name: [] for name in fns}
  names = list(fns)
  for r in range(rounds):
    for name in (names if r % 2 == 0 else names[::-1]):
      t = time.perf_counter()
      fns[name]()
      times[name].append(time.perf_counter() - t)
  return times


def summary(times: list[float]) -> dict:
  med = statistics.median(times)
  return {"median_s": med, "min_s": min(times), "max_s": max(times), "spread": (max(times) - min(times)) / med,
          "rounds": len(times)}


def ratio(jax_times: list[float], peer_times: list[float], jax_work: float = 1.0, peer_work: float = 1.0) -> dict:
  """The speed-up as the median of per-round ratios of rates (each round times both sides back to back), with
  its range; `*_work` is what one call does (e.g. tokens) where the two sides' calls differ in size."""
  r = [(jax_work / j) / (peer_work / p) for j, p in zip(jax_times, peer_times)]
  return {"ratio": statistics.median(r), "ratio_min": min(r), "ratio_max": max(r)}


def commit() -> str:
  """HEAD's short hash, +dirty when tracked files differ from it."""
  try:
    sha = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         check=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return sha + ("+dirty" if dirty else "")
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def versions() -> dict:
  import flax
  import jaxlib
  import numpy
  import optax
  v = {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
       "flax": flax.__version__, "optax": optax.__version__, "numpy": numpy.__version__}
  for name in ("torch", "transformers", "sklearn"):  # peers, where this run imported them
    if name in sys.modules:
      v[name] = sys.modules[name].__version__
  return v


def machine() -> dict:
  devs = jax.devices()
  c = hardware.cpu()
  return {"device_kind": getattr(devs[0], "device_kind", devs[0].platform), "platform": devs[0].platform,
          "device_count": len(devs), "cpu": c["model"], "isa": c["isa"], "isa_extras": c["isa_extras"],
          "cores": c["cores"], "commit": commit(),
          "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def machine_line(m: dict) -> str:
  return (f"{m['platform']}:{m['device_kind']} x{m['device_count']} | CPU {m['cpu']} ({m['cores']} cores, "
          f"{m['isa']}) | commit {m['commit']} | {m['date']}")


def report(title: str, rows: list[dict], columns: list[str], state: dict) -> list[dict]:
  """Prints the table (machine, load at start and versions above it) and one JSON line per row; returns the rows
  with the machine, load state and versions attached, as the suite records them."""
  m, v = machine(), versions()
  rows = [dict(r, benchmark=title, **state, machine=m, versions=v) for r in rows]
  flag = "  ** LOADED: ratios not meaningful **" if state.get("loaded") else ""
  print(f"\n{title}\n{machine_line(m)}\nload at start: others {state.get('others_cores_at_start')} cores, "
        f"1-min {state.get('loadavg_1m_at_start')}{flag}\n" + ", ".join(f"{k} {x}" for k, x in v.items()))
  widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
  print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
  for r in rows:
    print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))
  for r in rows:
    print("JSON " + json.dumps(r))
  return rows


def _fmt(v) -> str:
  if v is None:
    return "-"
  if isinstance(v, float):
    return f"{v:.4g}"
  return str(v)
