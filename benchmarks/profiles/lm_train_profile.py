"""A/B of the LM training epoch: this tree's lm_train against a baseline revision's, and HF's OPTForCausalLM step,
in one process, rounds alternating (a shared machine's load hits every variant alike); plus a per-op profile.

  python benchmarks/profiles/lm_train_profile.py [--baseline main] [--batches 16,128] [--steps 8] [--rounds 5]
         [--no-torch] [--profile after|before|none] [--top 25]

Shape: benchmarks/lm_bench.py's `cpu` shape (OPT hidden 256, 4 layers, 4 heads, ffn 1024, vocab 8192, seq 64,
float32, dropout 0.1, AdamW + cosine; 8 steps per timed call). The baseline is `git archive <rev> collapse_jax`
imported under the same name before this tree's copy (sys.modules swapped), so both are compiled and run here.

Profile: one epoch call under jax.profiler.trace; each XLA op's time (its thunk's span on the XLA:CPU worker
threads) is matched to the optimized HLO's op_name and reported as a share of all op time, by category and for
the top ops. Shares, not rates: meaningful on a loaded machine. MFU: flops_per_token * tokens/s / peak, with
--peak-flops (e.g. 2 cores x 2.6 GHz x 64 fp32 FLOP/cycle (2 x 512-bit FMA) = 3.3e11 for this repo's CI box).
"""
import argparse
import collections
import glob
import gzip
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

MODEL = dict(vocab_size=8192, hidden_size=256, num_layers=4, num_heads=4, ffn_dim=1024, max_position_embeddings=512,
             word_embed_proj_dim=256, dtype="float32")
SEQ = 64


def import_tree(root):
  """(lm_train, opt, sharding, sizes) of the collapse_jax package under `root`, imported fresh."""
  for name in [m for m in sys.modules if m == "collapse_jax" or m.startswith("collapse_jax.")]:
    del sys.modules[name]
  sys.path.insert(0, root)
  try:
    from collapse_jax import sharding
    from collapse_jax.families.lm import train as lm_train
    from collapse_jax.families.lm import model as opt
    from collapse_jax.families.lm import sizes
  finally:
    sys.path.remove(root)
  return lm_train, opt, sharding, sizes


def jax_runner(mods, ids_NxL, batch, options=None):
  lm_train, opt, sharding, sizes = mods
  cfg = sizes.get_size("tiny", **MODEL)
  mesh = sharding.make_lm_mesh(1, 1)
  tcfg = lm_train.TrainConfig(batch_size=batch, epochs=1000, verbose=False)
  params = opt.init_params(cfg, jax.random.key(0))
  state, state_sh, tx = lm_train.setup(tcfg, cfg, params, ids_NxL.shape[0], jax.random.key(1), mesh)
  blocks = jax.device_put(lm_train.as_blocks(ids_NxL), sharding.replicated(mesh))
  compiled = lm_train.epoch_program(tcfg, cfg, tx, state_sh, mesh).lower(state, blocks, jnp.int32(0)).compile(options)
  holder = {"state": state, "e": 0}

  def run():
    holder["state"], m = compiled(holder["state"], blocks, jnp.int32(holder["e"]))
    holder["e"] += 1
    return float(m["loss"])

  run.hlo = compiled.as_text()
  run.flops_per_token = sizes.flops_per_token(cfg, SEQ)
  return run


def torch_runner(ids_NxL, batch):
  """The benchmark's own HF peer (benchmarks/lm_bench.py), same model, fp32, on the cores JAX uses."""
  if _REPO not in sys.path:
    sys.path.append(_REPO)
  from benchmarks import lm_bench
  (base, overrides), _ = lm_bench.SHAPES["cpu"]
  run, _ = lm_bench.torch_runner(lm_bench.sizes.get_size(base, **overrides), ids_NxL, batch, "cpu", False,
                                 argparse.Namespace(threads=0))
  return run


CATEGORIES = [  # (name, test on (op name, shape, op_name metadata)); first match wins
    ("LM head dots", lambda n, s, o: n.startswith(("ynn", "dot")) and ("blp,vp" in o or "lm_head" in o)),
    ("projection / MLP dots", lambda n, s, o: n.startswith(("ynn", "dot")) and "reduce" not in o),
    ("attention dots", lambda n, s, o: n.startswith(("ynn", "dot")) and ("BTNH" in o or "BNTS" in o)),
    ("dropout bits", lambda n, s, o: any(k in o for k in ("threefry", "random", "bernoulli", "_uniform"))),
    ("cross-entropy (vocab-wide elementwise)", lambda n, s, o: str(MODEL["vocab_size"]) in s),
    ("transposing copies", lambda n, s, o: n.startswith(("copy", "bitcast_copy", "transpose"))),
    ("progress callback", lambda n, s, o: "callback" in n),
    ("other elementwise / reductions", lambda n, s, o: True),
]


def profile(run, top: int, tag: str):
  meta = {m.group(1): (m.group(2), m.group(3)) for m in
          re.finditer(r"^\s*%([\w.\-]+) = (\S+) [^\n]*?op_name=\"([^\"]*)\"", run.hlo, re.M)}
  with tempfile.TemporaryDirectory() as d:
    jax.profiler.start_trace(d)
    run()
    jax.profiler.stop_trace()
    trace = json.load(gzip.open(sorted(glob.glob(f"{d}/plugins/profile/*/*.trace.json.gz"))[-1]))
  threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in trace["traceEvents"]
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  per_op = collections.Counter()
  for e in trace["traceEvents"]:
    if e.get("ph") == "X" and "XLAEigen" in threads.get((e["pid"], e["tid"]), "") and \
        not e["name"].startswith(("ThunkExecutor", "SlinkyThreadPool")):
      per_op[e["name"]] += e["dur"]
  total = sum(per_op.values())
  cats = collections.Counter()
  for n, t in per_op.items():
    s, o = meta.get(n, ("?", "?"))
    cats[next(c for c, test in CATEGORIES if test(n, s, o))] += t
  print(f"\nper-op profile ({tag}): {total / 1e3:.0f} ms of op time in one epoch call")
  for c, t in cats.most_common():
    print(f"  {100 * t / total:5.1f}%  {c}")
  for n, t in per_op.most_common(top):
    s, o = meta.get(n, ("?", "?"))
    o = re.sub(r"jit\(train_epoch\)/while/body/(closed_call/)?", "", o)
    print(f"  {100 * t / total:5.1f}%  {n[:26]:26s} {s[:24]:24s} {o[:70]}")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--baseline", default="main", help="git revision to compare against ('': none)")
  p.add_argument("--batches", default="16,128")
  p.add_argument("--steps", type=int, default=8)
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--no-torch", action="store_true")
  p.add_argument("--profile", default="after", choices=["after", "before", "both", "none"])
  p.add_argument("--top", type=int, default=20)
  p.add_argument("--variant", action="append", default=[], metavar="NAME:OPTION=VALUE[,OPTION=VALUE]",
                 help="also time this tree compiled with these XLA options, e.g. "
                      "'noynn:xla_cpu_experimental_ynn_fusion_type='")
  p.add_argument("--peak-flops", type=float, default=0.0)
  args = p.parse_args(argv)
  variants = {}
  if args.baseline:
    tmp = tempfile.mkdtemp()
    archive = subprocess.run(["git", "-C", _REPO, "archive", args.baseline, "collapse_jax"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
    variants["before"] = import_tree(tmp)
  variants["after"] = import_tree(_REPO)
  for batch in [int(b) for b in args.batches.split(",")]:
    n = args.steps * batch
    ids_NxL = np.random.default_rng(0).integers(3, MODEL["vocab_size"], (n, SEQ)).astype(np.int32)
    runs = {name: jax_runner(mods, ids_NxL, batch) for name, mods in variants.items()}
    for spec in args.variant:
      name, opts = spec.split(":", 1)
      runs[name] = jax_runner(variants["after"], ids_NxL, batch, dict(o.split("=", 1) for o in opts.split(",")))
    if not args.no_torch:
      runs["hf-torch"] = torch_runner(ids_NxL, batch)
    for fn in runs.values():
      fn()  # warm-up
    times = {name: [] for name in runs}
    for _ in range(args.rounds):
      for name, fn in runs.items():
        t = time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - t)
    print(f"\nseq {SEQ} x batch {batch}, {args.steps} steps per call, {args.rounds} rounds, "
          f"loadavg {os.getloadavg()[0]:.1f}")
    for name, ts in times.items():
      tok_s = n * SEQ / statistics.median(ts)
      mfu = f"  MFU {100 * runs['after'].flops_per_token * tok_s / args.peak_flops:.1f}%" if args.peak_flops else ""
      rel = "  ".join(f"x{statistics.median([o / t for t, o in zip(ts, times[other])]):.2f} vs {other}"
                      for other in times if other != name)
      print(f"  {name:9s} {tok_s:8.0f} tok/s  median {statistics.median(ts):.3f} s{mfu}  {rel}")
    for name in [v for v in ("before", "after") if args.profile in (v, "both") and v in runs]:
      profile(runs[name], args.top, f"{name}, batch {batch}")


if __name__ == "__main__":
  main()
