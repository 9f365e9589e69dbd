"""Fingerprints of the experiments' results: the sha256 of metrics.jsonl (and of samples/ for the LM) of each run
below, from fresh workdirs, so that a refactor can show its numbers unchanged (same machine: float32 results
differ across CPUs). Each run is the CLI in its own process (benchmarks.results.run_cli: the CPU, no XLA_FLAGS).

  python benchmarks/fingerprint.py [--only gmm_quick,lm_ci] [--keep DIR]

Prints one line per run (name, seconds, metrics sha256, samples sha256) and a JSON line at the end.
"""
import argparse
import hashlib
import json
import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.results import run_cli  # noqa: E402

RUNS = {  # name -> the CLI's --config (the README's main job is configs/gmm.py with no variant)
    "readme_gmm": "configs/gmm.py", "gaussian": "gaussian", "gmm_quick": "gmm:quick", "vae_quick": "vae:quick",
    "lm_ci": "lm:ci", "lm": "lm", "lm_real_fraction": "lm:real_fraction",
}


def digest(paths: list[str]) -> str:
  h = hashlib.sha256()
  for p in paths:
    with open(p, "rb") as fh:
      h.update(os.path.basename(p).encode() + b"\0" + fh.read())
  return h.hexdigest()


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--only", default="", help="comma-separated run names (default: all)")
  ap.add_argument("--keep", default=None, help="write the workdirs here instead of a temporary folder")
  args = ap.parse_args(argv)
  names = [n for n in args.only.split(",") if n] or list(RUNS)
  root = args.keep or tempfile.mkdtemp(prefix="fingerprint_")
  out = {}
  for name in names:
    work = os.path.join(root, name)
    seconds = run_cli(RUNS[name], work)
    samples = os.path.join(work, "samples")
    sample_files = sorted(os.path.join(samples, f) for f in os.listdir(samples)) if os.path.isdir(samples) else []
    out[name] = {"metrics": digest([os.path.join(work, "metrics.jsonl")]),
                 "samples": digest(sample_files) if sample_files else None, "seconds": round(seconds, 1)}
    print(f"{name:<18} {out[name]['seconds']:>7.1f}s  metrics {out[name]['metrics'][:16]}  samples "
          f"{(out[name]['samples'] or '-')[:16]}", flush=True)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
