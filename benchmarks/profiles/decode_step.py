"""Per-op profile of collapse_jax.families.lm.decode on the decode_bench shapes: which XLA:CPU ops take what
share of a decode.

  python benchmarks/profiles/decode_step.py [--method beam5_rep3|sample] [--shape small|opt125m] [--rows 64]
      [--batch 64] [--top 30]

Traces one call of the compiled decode_corpus program (after a warm-up call) with jax.profiler, takes each HLO
instruction's median duration over its calls (robust to preemption on a shared machine) times its call count,
and prints each op's share of the total with its shape and the jax op that made it (from the optimized HLO's
metadata). Ops run once per step dominate: count = steps * batches.
"""
import argparse
import collections
import glob
import gzip
import json
import os
import re
import statistics
import sys
import tempfile

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from benchmarks.decode_bench import METHODS, SHAPES, prompts  # noqa: E402
from collapse_jax.families.lm import decode  # noqa: E402
from collapse_jax.families.lm import model as opt  # noqa: E402
from collapse_jax.families.lm import sizes  # noqa: E402


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--method", default="beam5_rep3", choices=sorted(METHODS))
  ap.add_argument("--shape", default="small", choices=sorted(SHAPES))
  ap.add_argument("--rows", type=int, default=64)
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--top", type=int, default=30)
  args = ap.parse_args()
  cfg = sizes.get_size(SHAPES[args.shape]["size"], dtype="float32", dropout=0.0)
  params = opt.init_params(cfg, jax.random.key(0))
  ids, mask = prompts(cfg, args.rows, 64)
  lm, dcfg = decode.opt_lm(cfg), METHODS[args.method]
  run = lambda: jax.block_until_ready(  # noqa: E731
      decode.decode_corpus(lm, params, ids, mask, dcfg, jax.random.key(0), batch_size=args.batch)["tokens"])
  run()
  m = -(-args.rows // args.batch)
  prog = decode._program(lm, decode.static(dcfg), None)
  shp = lambda a: jax.ShapeDtypeStruct((m, args.batch, a.shape[1]), a.dtype)  # noqa: E731
  hlo = prog.lower(params, shp(ids), shp(mask), jax.random.key(0), decode.knobs(lm, dcfg)).compile().as_text()
  info = {}
  for line in hlo.splitlines():
    g = re.match(r"\s*(?:ROOT )?%(\S+) = (\S+?\[[^\]]*\])\S* .*?op_name=\"([^\"]*)\"", line)
    if g:
      info[g.group(1)] = (g.group(2), g.group(3).split("/")[-1][:48])
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      run()
    events = json.load(gzip.open(glob.glob(d + "/**/*.trace.json.gz", recursive=True)[0]))["traceEvents"]
  durs = collections.defaultdict(list)
  for e in events:
    name = e.get("name", "")
    if e.get("ph") == "X" and not name.startswith("$") and not re.match(r"(Thunk|Pjit|Common|Execute|Slinky|while)",
                                                                         name):
      durs[name].append(e["dur"])
  tot = collections.Counter({k: statistics.median(v) * len(v) for k, v in durs.items()})
  total = sum(tot.values())
  print(f"{args.method} {args.shape}: {total / 1e3:.1f} ms in ops (median x calls; while loops excluded: their "
        "ops are counted)")
  for name, us in tot.most_common(args.top):
    shape, op = info.get(name, ("?", "?"))
    print(f"{100 * us / total:5.1f}%  {us / 1e3:8.2f} ms  x{len(durs[name]):<5d} {name:34s} {shape:26s} {op}")


if __name__ == "__main__":
  main()
