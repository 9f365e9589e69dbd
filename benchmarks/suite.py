"""The hardware benchmark suite: every family's throughput benchmark on the devices present, with peers where
installed, in one JSON report and one Markdown table; `compare` lays two or more reports side by side.

  python -m benchmarks.suite [--short] [--out DIR] [--only gmm,vae_train,lm_train,decode]
  python -m benchmarks.suite compare A/suite.json B/suite.json [...] --out DIR

Each benchmark runs as its own script in a fresh process (benchmarks/*_bench.py: process-wide settings such as
the GMM's one XLA core stay its own; the methodology of benchmarks/common.py: quiet check before each, peers on the
same cores, >= 5 alternating rounds, medians and spread); the suite reads the JSON lines each prints. Settings by device:
a CPU gets the CPU shapes; an accelerator the paper's (OPT-125m, 4096 GMM chains). `--short` cuts the work per
call (about 2 minutes on 2 CPU cores; it still measures >= 5 rounds, so its rates are real but noisier).
Per benchmark the report holds the JAX rate, the peer's rate in the same run, the ratio (median of per-round ratios,
with its range), and for LM training and decoding the MFU (and, for decoding, memory-bandwidth use) against the
device's published peak (collapse_jax/hardware.py; a CPU's peak is derived from its cores, clock and ISA).
Outputs: DIR/suite.json, DIR/suite.md; compare: DIR/compare.md, DIR/compare.png.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from benchmarks import common  # noqa: E402
from collapse_jax import hardware  # noqa: E402

# name -> (script, rate column, unit, what the peer row's impl starts with, argv by (accelerator, short))
BENCHES = {
    "gmm": ("gmm_bench.py", "chain_gen_per_s", "chain-generations/s", "sklearn-1thread", {
        # One chain's EM is many tiny kernels: on a CPU, XLA on one core (collapse-jax --cpu_threads=1).
        (False, False): ["--cpu_threads=1"],
        (False, True): ["--cpu_threads=1", "--sklearn_generations=10", "--generations=0", "--chains=0",
                        "--no-sklearn_default"],
        (True, False): ["--chains=4096", "--generations=500", "--sklearn_generations=20"],
        (True, True): ["--chains=1024", "--generations=0", "--chain_generations=10", "--sklearn_generations=10",
                       "--no-sklearn_default"]}),
    "vae_train": ("vae_bench.py", "images_per_s", "images/s", "torch", {
        (False, False): [], (False, True): ["--steps=2"],
        (True, False): ["--steps=32"], (True, True): ["--steps=8"]}),
    "lm_train": ("lm_bench.py", "tokens_per_s", "tokens/s", "torch", {
        (False, False): [], (False, True): ["--steps=2", "--batches=16"],
        (True, False): ["--shape=opt125m"], (True, True): ["--shape=opt125m", "--steps=2"]}),
    "decode": ("decode_bench.py", "new_tokens_per_s", "new tokens/s", "hf generate", {
        (False, False): ["--hf"], (False, True): ["--hf", "--rows=64", "--batch=16,64", "--hf_batches=64"],
        (True, False): ["--shape=opt125m", "--rows=1024", "--batch=256", "--hf", "--hf_batches=64,256"],
        (True, True): ["--shape=opt125m", "--rows=256", "--batch=256", "--hf", "--hf_batches=256"]}),
    # On a CPU the paper's model too (8 prompts; its beam search compiles for minutes): full mode only.
    "decode_opt125m": ("decode_bench.py", "new_tokens_per_s", "new tokens/s", "hf generate", {
        (False, False): ["--shape=opt125m", "--rows=8", "--batch=8", "--hf", "--hf_batches=4,8"]}),
}


def lines(name: str, rows: list[dict]) -> list[dict]:
  """One suite line per JAX row: its rate, and the peer row of the same benchmark title where there is one."""
  _, rate_key, unit, peer_prefix, _ = BENCHES[name]
  out = []
  for r in rows:
    if not r["impl"].startswith("jax"):
      continue
    peer = next((p for p in rows if p["benchmark"] == r["benchmark"] and p["impl"].startswith(peer_prefix)), None)
    label = r["benchmark"] + (f" [{r['chains']} chains x {r['generations']} gens]" if name == "gmm" else "")
    out.append({"name": name, "label": label, "unit": unit, "rate": r[rate_key], "spread": r["spread"],
                "peer": peer["impl"] if peer and "ratio" in r else None,
                "peer_rate": peer[rate_key] if peer and "ratio" in r else None,
                "ratio": r.get("ratio"), "ratio_min": r.get("ratio_min"), "ratio_max": r.get("ratio_max"),
                "mfu": r.get("mfu"), "hbm_bw_util": r.get("hbm_bw_util"), "loaded": r["loaded"],
                "others_cores_at_start": r["others_cores_at_start"]})
  return out


def _num(v, fmt="{:.4g}") -> str:
  return "-" if v is None else fmt.format(v)


def markdown(report: dict) -> str:
  m, v, p = report["machine"], report["versions"], report["peak"]
  head = [f"# Benchmark suite{' (short)' if report['short'] else ''}: {m['platform']} {m['device_kind']} x"
          f"{m['device_count']}", "",
          f"- host CPU: {m['cpu']}, {m['cores']} cores, {m['isa']} {' '.join(m['isa_extras'])}",
          "- peak used for MFU: " + (f"{p['name']}: bf16 {p['bf16_flops']:.3g} FLOP/s, fp32 "
                                     f"{_num(p['fp32_flops'], '{:.3g}')} FLOP/s, memory "
                                     f"{_num(p['hbm_bytes_per_s'], '{:.3g}')} B/s" if p else "unknown"),
          "- versions: " + ", ".join(f"{k} {x}" for k, x in v.items()),
          f"- commit {m['commit']}, {m['date']}", "",
          "| benchmark | JAX | peer | peer rate | JAX / peer (range) | spread | MFU | mem. BW use | load at start |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for x in report["benchmarks"]:
    ratio = "-" if x["ratio"] is None else f"**{x['ratio']:.2f}x** ({x['ratio_min']:.2f}-{x['ratio_max']:.2f})"
    load = f"{x['others_cores_at_start']} cores" + (" LOADED" if x["loaded"] else "")
    head.append(f"| {x['label']} | {x['rate']:.4g} {x['unit']} | {x['peer'] or '-'} | {_num(x['peer_rate'])} | "
                f"{ratio} | {x['spread']:.0%} | {_num(x['mfu'], '{:.2%}')} | {_num(x['hbm_bw_util'], '{:.2%}')} | "
                f"{load} |")
  return "\n".join(head) + "\n"


def _run_script(script: str, argv: list[str]) -> list[dict]:
  """One benchmark script in a fresh interpreter, its output passed through; returns the rows of its JSON lines."""
  proc = subprocess.Popen([sys.executable, os.path.join(common.REPO, "benchmarks", script), *argv],
                          stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
  rows = []
  for line in proc.stdout:
    if line.startswith("JSON "):
      rows.append(json.loads(line[5:]))
    else:
      print(line, end="", flush=True)
  if proc.wait() != 0:
    raise SystemExit(f"benchmarks/{script} {' '.join(argv)} failed (exit {proc.returncode})")
  return rows


def run(args) -> dict:
  accel = jax.devices()[0].platform != "cpu"
  bench_args = ["--rounds", str(args.rounds), "--max_load", str(args.max_load), "--wait", str(args.wait)] + \
      (["--allow_loaded"] if args.allow_loaded else [])
  names = args.only.split(",") if args.only else list(BENCHES)
  unknown = sorted(set(names) - set(BENCHES))
  if unknown:
    raise SystemExit(f"--only: unknown benchmark(s) {unknown}; choose from {sorted(BENCHES)}")
  report = {"short": args.short, "benchmarks": [], "rows": {}}
  for name in names:
    script, *_, argv = BENCHES[name]
    if (accel, args.short) not in argv:
      continue
    print(f"\n=== {name}", flush=True)
    rows = _run_script(script, argv[(accel, args.short)] + bench_args)
    report["rows"][name] = rows
    report["benchmarks"] += lines(name, rows)
  peak = hardware.peak(jax.devices()[0])
  report.update(machine=common.machine(), versions=common.versions(),
                peak=None if peak is None else {k: getattr(peak, k) for k in peak.__dataclass_fields__},
                host_cpu=hardware.cpu())
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "suite.json"), "w") as f:
    json.dump(report, f, indent=1)
  md = markdown(report)
  with open(os.path.join(args.out, "suite.md"), "w") as f:
    f.write(md)
  print("\n" + md + f"\nwritten: {args.out}/suite.json, {args.out}/suite.md")
  return report


def compare(paths: list[str], out: str) -> str:
  """Reports side by side: each benchmark line's rate and ratio per report (a Markdown table), and a PNG of the
  JAX / peer ratios per report."""
  if len(paths) < 2:
    raise SystemExit("compare needs two or more suite.json reports")
  reports = []
  for p in paths:
    try:
      with open(p) as f:
        reports.append(json.load(f))
    except (OSError, json.JSONDecodeError) as e:
      raise SystemExit(f"compare: cannot read report {p}: {e}") from None
  names = [f"{r['machine']['device_kind']} x{r['machine']['device_count']} ({r['machine']['cpu']}, "
           f"{r['machine']['commit']}, {r['machine']['date'][:10]})" for r in reports]
  labels = list(dict.fromkeys(x["label"] for r in reports for x in r["benchmarks"]))
  table = ["| benchmark | " + " | ".join(f"[{i}] rate | [{i}] JAX/peer" for i in range(len(reports))) + " |",
           "| --- |" + " --- | --- |" * len(reports)]
  ratios = []
  for label in labels:
    cells, row = [], []
    for r in reports:
      x = next((x for x in r["benchmarks"] if x["label"] == label), None)
      cells += ["-", "-"] if x is None else [f"{x['rate']:.4g} {x['unit']}" + (" (loaded)" if x["loaded"] else ""),
                                             "-" if x["ratio"] is None else f"{x['ratio']:.2f}x"]
      row.append(None if x is None else x["ratio"])
    table.append(f"| {label} | " + " | ".join(cells) + " |")
    ratios.append(row)
  md = "# Benchmark reports compared\n\n" + "\n".join(f"- [{i}] {n}: {p}" for i, (n, p) in
                                                       enumerate(zip(names, paths))) + "\n\n" + "\n".join(table) + "\n"
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "compare.md"), "w") as f:
    f.write(md)
  _plot(labels, ratios, names, os.path.join(out, "compare.png"))
  print(md + f"\nwritten: {out}/compare.md, {out}/compare.png")
  return md


def _plot(labels, ratios, names, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np
  keep = [i for i, row in enumerate(ratios) if any(v is not None for v in row)]
  fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(keep) * len(names) ** 0.5), 4.5))
  width = 0.8 / len(names)
  for j, name in enumerate(names):
    vals = [ratios[i][j] if ratios[i][j] is not None else np.nan for i in keep]
    ax.bar(np.arange(len(keep)) + (j - (len(names) - 1) / 2) * width, vals, width, label=f"[{j}] {name}")
  ax.axhline(1.0, color="k", lw=0.8)
  ax.set_xticks(np.arange(len(keep)), [labels[i].split(" (")[0].split(":")[0][:28] for i in keep], rotation=20,
                ha="right")
  ax.set_ylabel("JAX / peer (x)")
  ax.set_title("Speed-up over the peer, per report")
  ax.legend(fontsize=7, loc="upper left")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  if argv[:1] == ["compare"]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.suite compare", description=compare.__doc__)
    p.add_argument("reports", nargs="+")
    p.add_argument("--out", default="runs/bench/compare")
    a = p.parse_args(argv[1:])
    return compare(a.reports, a.out)
  p = argparse.ArgumentParser(prog="python -m benchmarks.suite", description=__doc__.splitlines()[0])
  p.add_argument("--short", action="store_true", help="less work per call (about 2 minutes on 2 CPU cores)")
  p.add_argument("--out", default="runs/bench/suite")
  p.add_argument("--only", default="", help=f"comma-separated subset of {','.join(BENCHES)}")
  common.add_args(p)
  args = p.parse_args(argv)
  common.check_rounds(args)
  return run(args)


if __name__ == "__main__":
  main()
