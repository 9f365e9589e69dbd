"""The size x topology table of WORKSPACE.md ("Scale"): the paper's LM generation (opt_wikitext2: 36,864 blocks of
64 + 64 tokens, batch 128, 5 epochs, 5-beam decoding of every block) planned for OPT sizes on TPU slices and one
H100 / H200 (estimated from the CPU-compiled programs), with plan mode (collapse_jax/plan.py, whole=False: step
programs compiled for the target; the chunk's memory estimated from its arguments plus the largest step).

  python benchmarks/scale_table.py [--sizes opt-125m,...] [--targets v5e-8,...] [--out runs/scale]

For each cell the first setting that fits, in order: fsdp over every chip (no remat, then full remat), then
tensor 4 and 8 with full remat; a setting whose parameters, Adam moments, gradients and the run's three held
copies of the weights (initial, previous, generation 0) alone exceed the chip (a hand count) is not compiled.
Writes table.md and one plan JSON per cell under --out. Needs libtpu (pip install -e '.[tpu]').
"""
import argparse
import contextlib
import io
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SIZES = ("opt-125m", "opt-1.3b", "opt-6.7b", "opt-13b", "opt-30b", "opt-66b")
TARGETS = ("v5e-8", "v5p-8", "v6e-8", "v5e-64", "v5p-64", "v5e-256", "h100", "h200")


def settings(chips: int):
  out = [(chips, 1, "none"), (chips, 1, "full")]
  out += [(chips // t, t, "full") for t in (4, 8) if chips >= t]
  return out


def held_bytes(n_params: int, shards: int) -> float:
  # float32: parameters, gradients, Adam's two moments, and the three weight copies the loop holds.
  return 7 * 4 * n_params / shards


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--sizes", default=",".join(SIZES))
  ap.add_argument("--targets", default=",".join(TARGETS))
  ap.add_argument("--out", default="runs/scale")
  args = ap.parse_args(argv)
  import jax
  from collapse_jax import config as config_lib, plan
  from collapse_jax.errors import ConfigError
  from collapse_jax.families.lm import model as opt
  from collapse_jax.families.lm import sizes

  os.makedirs(args.out, exist_ok=True)
  rows = []
  for size in args.sizes.split(","):
    n_params = sizes.count_params(jax.eval_shape(lambda: opt.init_params(sizes.SIZES[size], jax.random.key(0))))
    for name in args.targets.split(","):
      tgt = plan.target(name)
      row = {"size": size, "target": name, "fits": False, "tried": []}
      for fsdp, tensor, remat in settings(tgt.chips):
        label = f"fsdp {fsdp} x tensor {tensor}, remat {remat}"
        if held_bytes(n_params, fsdp * tensor) > tgt.peak.hbm_bytes:
          row["tried"].append(f"{label}: state alone {held_bytes(n_params, fsdp * tensor) / 2**30:.0f} GiB/chip")
          continue
        cfg = config_lib.load("lm", f"opt_wikitext2,size={size}", lm__mesh_fsdp=fsdp, lm__mesh_tensor=tensor,
                              lm__remat=remat)
        path = os.path.join(args.out, f"{size}_{name}_f{fsdp}t{tensor}{remat}.json")
        t0 = time.time()
        try:
          with contextlib.redirect_stdout(io.StringIO()):
            rep = plan.run(cfg, name, out_path=path, whole=False)
        except ConfigError as e:
          row["tried"].append(f"{label}: {str(e)[:120]}")
          continue
        ph = rep["steps"]["phases"]
        row.update(fits=True, setting=label, gib=rep["chunk"]["total_bytes"] / 2**30,
                   train_min=ph["train"]["minutes"], decode_min=ph["decode"]["minutes"],
                   eval_min=ph["eval"]["minutes"], train_mfu=ph["train"]["mfu"], secs=time.time() - t0)
        break
      rows.append(row)
      print(json.dumps(row), flush=True)
  lines = ["| OPT | target | fits | setting | GiB/chip (est.) | train min | decode min | eval min | train MFU |",
           "|---|---|---|---|---:|---:|---:|---:|---:|"]
  for r in rows:
    if r["fits"]:
      lines.append(f"| {r['size']} | {r['target']} | yes | {r['setting']} | {r['gib']:.1f} | {r['train_min']:.3g} | "
                   f"{r['decode_min']:.3g} | {r['eval_min']:.2g} | {100 * r['train_mfu']:.0f}% |")
    else:
      lines.append(f"| {r['size']} | {r['target']} | no | {r['tried'][-1] if r['tried'] else ''} | | | | | |")
  with open(os.path.join(args.out, "table.md"), "w") as fh:
    fh.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
