"""Mutation check: plant each targeted bug of benchmarks/mutants/*.py in a fresh copy of the committed tree and
run the tests named for it; a mutant that passes them all survived (a gap in the suite).

  .venv/bin/python benchmarks/mutation.py                 # every mutant
  .venv/bin/python benchmarks/mutation.py --only gmm_tol  # names or prefixes, comma-separated
  .venv/bin/python benchmarks/mutation.py --area loop,vae # the mutants of benchmarks/mutants/{loop,vae}.py
  .venv/bin/python benchmarks/mutation.py --tree .        # the working tree instead of HEAD (uncommitted work)

Run on demand, not in CI (it runs the named tests once per mutant: minutes each for the loop-level ones). The
copy is made with `git archive HEAD` (or a copy of --tree), so the checkout is never touched. Prints one line per
mutant, a summary line, and JSON lines like the other benchmarks; exit status 1 if any mutant survived or a
mutant's `old` text no longer matches (a stale mutant is an error, not a pass).
"""
import argparse
import importlib
import json
import os
import pkgutil
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks import mutants as mutants_pkg  # noqa: E402


def all_mutants(areas=()):
  """Every mutant, or those of the named areas (modules of benchmarks/mutants), as (area, mutant) pairs."""
  out = []
  for info in sorted(pkgutil.iter_modules(mutants_pkg.__path__), key=lambda m: m.name):
    if not areas or info.name in areas:
      out += [(info.name, m) for m in importlib.import_module(f"benchmarks.mutants.{info.name}").MUTANTS]
  names = [m.name for _, m in out]
  dup = {n for n in names if names.count(n) > 1}
  if dup:
    raise SystemExit(f"duplicate mutant names: {sorted(dup)}")
  return out


def _copy_tree(src_tree: str | None, dst: str) -> None:
  if src_tree is None:
    archive = subprocess.run(["git", "-C", REPO, "archive", "HEAD"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", dst], input=archive, check=True)
  else:
    ignore = shutil.ignore_patterns(".git", ".venv", "runs", "__pycache__", ".pytest_cache", "*.egg-info")
    shutil.copytree(src_tree, dst, ignore=ignore, dirs_exist_ok=True)


def run_mutant(m, base: str, timeout: float) -> dict:
  work = tempfile.mkdtemp(prefix=f"mutant_{m.name}_")
  try:
    shutil.copytree(base, work, dirs_exist_ok=True)
    path = os.path.join(work, m.file)
    with open(path) as fh:
      text = fh.read()
    if text.count(m.old) != 1:
      return {"mutant": m.name, "result": "stale", "detail": f"`old` found {text.count(m.old)} times in {m.file}"}
    with open(path, "w") as fh:
      fh.write(text.replace(m.old, m.new))
    env = dict(os.environ, PYTHONPATH=work, PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *m.tests]
    t = time.time()
    try:
      proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
      rc, tail = proc.returncode, (proc.stdout + proc.stderr).strip().splitlines()[-1:]
    except subprocess.TimeoutExpired:
      rc, tail = -1, ["timeout"]
    # Exit 1: tests failed (caught). 0: survived. Anything else (collection error, usage, timeout) is reported
    # as an error: a mutant that breaks the import is caught too trivially to count as a test's catch.
    result = {0: "SURVIVED", 1: "caught"}.get(rc, "error")
    return {"mutant": m.name, "result": result, "seconds": round(time.time() - t, 1),
            "detail": tail[0] if tail else "", "why": m.why}
  finally:
    shutil.rmtree(work, ignore_errors=True)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--only", default="", help="comma-separated mutant names or name prefixes")
  ap.add_argument("--area", default="", help="comma-separated areas (modules of benchmarks/mutants, e.g. loop,vae)")
  ap.add_argument("--tree", default=None, help="copy this working tree instead of `git archive HEAD`")
  ap.add_argument("--timeout", type=float, default=900, help="seconds per mutant")
  ap.add_argument("--list", action="store_true", help="list the mutants and exit")
  args = ap.parse_args()
  areas = [a for a in args.area.split(",") if a]
  unknown = set(areas) - {i.name for i in pkgutil.iter_modules(mutants_pkg.__path__)}
  if unknown:
    raise SystemExit(f"unknown area(s) {sorted(unknown)}: the modules of benchmarks/mutants")
  mutants = all_mutants(areas)
  if args.only:
    keys = [k for k in args.only.split(",") if k]
    mutants = [(a, m) for a, m in mutants if any(m.name == k or m.name.startswith(k) for k in keys)]
  if args.list:
    for area, m in mutants:
      print(f"{area:10s} {m.name:32s} {m.file:28s} {m.why}")
    return 0
  base = tempfile.mkdtemp(prefix="mutation_base_")
  try:
    _copy_tree(args.tree, base)
    rows = []
    for area, m in mutants:
      r = dict(run_mutant(m, base, args.timeout), area=area)
      rows.append(r)
      print(f"{r['result']:9s} {m.name:32s} {r.get('seconds', 0):7.1f}s  {r['detail'][:90]}", flush=True)
  finally:
    shutil.rmtree(base, ignore_errors=True)
  counts = {k: sum(r["result"] == k for r in rows) for k in ("caught", "SURVIVED", "error", "stale")}
  print(f"\n{counts['caught']} caught, {counts['SURVIVED']} survived, {counts['error']} errors, "
        f"{counts['stale']} stale, of {len(rows)} mutants")
  for r in rows:
    print("JSON " + json.dumps(dict(r, benchmark="mutation")))
  return 0 if counts["caught"] == len(rows) else 1


if __name__ == "__main__":
  sys.exit(main())
