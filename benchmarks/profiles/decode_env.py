"""XLA:CPU environment A/B for decode_corpus (flags and thread pool are fixed when JAX creates its CPU client, so
each variant is a child process; variants alternate over --procs rounds). Per call: wall and CPU (process_time,
all threads) medians.

  python benchmarks/profiles/decode_env.py [--method beam5_rep3|sample] [--shape small] [--rows 256]
      [--batches 64] [--reps 3] [--procs 2] [--envs default,pool1,ynn_off,small_while]

--batches 16,32,64 sweeps the JAX batch inside each child (alternating batches per rep). A child alone:
--child [--pin_at_init].
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ENVS = {
    "default": ({}, []),
    "pool1": ({}, ["--pin_at_init"]),
    "ynn_off": ({"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type="}, []),
    "small_while": ({"XLA_FLAGS": "--xla_backend_extra_options=xla_cpu_small_while_loop_byte_threshold=100000000"},
                    []),
    "pool1+ynn_off": ({"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type="}, ["--pin_at_init"]),
}


def child(args):
  if args.pin_at_init:  # one core visible while JAX builds its client: intra-op pool of 1; all cores after
    cores = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cores)})
  import jax
  jax.devices()
  if args.pin_at_init:
    os.sched_setaffinity(0, cores)
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
  import numpy as np
  from benchmarks.decode_bench import METHODS, SHAPES, prompts
  from collapse_jax.families.lm import decode
  from collapse_jax.families.lm import model as opt
  from collapse_jax.families.lm import sizes
  cfg = sizes.get_size(SHAPES[args.shape]["size"], dtype="float32", dropout=0.0)
  params = opt.init_params(cfg, jax.random.key(0))
  ids, mask = prompts(cfg, args.rows, 64)
  lm, dcfg = decode.opt_lm(cfg), METHODS[args.method]
  batches = [int(b) for b in args.batches.split(",")]
  run = {b: (lambda b=b: np.asarray(decode.decode_corpus(lm, params, ids, mask, dcfg, jax.random.key(0),
                                                         batch_size=b)["tokens"])) for b in batches}
  for b in batches:
    run[b]()
  t = {b: ([], []) for b in batches}
  for _ in range(args.reps):
    for b in batches:
      w, c = time.perf_counter(), time.process_time()
      run[b]()
      t[b][0].append(time.perf_counter() - w)
      t[b][1].append(time.process_time() - c)
  print(json.dumps({b: [statistics.median(t[b][0]), statistics.median(t[b][1])] for b in batches}))


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--method", default="beam5_rep3")
  ap.add_argument("--shape", default="small")
  ap.add_argument("--rows", type=int, default=256)
  ap.add_argument("--batches", default="64")
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--procs", type=int, default=2)
  ap.add_argument("--envs", default="default,pool1,ynn_off,small_while")
  ap.add_argument("--child", action="store_true")
  ap.add_argument("--pin_at_init", action="store_true")
  args = ap.parse_args()
  if args.child:
    return child(args)
  res = {}
  for _ in range(args.procs):
    for name in args.envs.split(","):
      env, extra = ENVS[name]
      cmd = [sys.executable, os.path.abspath(__file__), "--child", f"--method={args.method}", f"--shape={args.shape}",
             f"--rows={args.rows}", f"--batches={args.batches}", f"--reps={args.reps}"] + extra
      out = subprocess.run(cmd, env=dict(os.environ, **env), capture_output=True, text=True)
      if out.returncode:
        print(name, out.stderr[-2000:])
        continue
      for b, (w, c) in json.loads(out.stdout.strip().splitlines()[-1]).items():
        res.setdefault((name, b), []).append((w, c))
  toks = args.rows * 64
  print(f"{args.method} {args.shape}, {args.rows} rows x 64 new tokens; medians over {args.procs} processes x "
        f"{args.reps} calls")
  for (name, b), v in res.items():
    w, c = statistics.median(x[0] for x in v), statistics.median(x[1] for x in v)
    print(f"  {name:14s} batch {b:>4s}: wall {w:7.3f} s ({toks / w:8.0f} tok/s)  cpu {c:7.3f} s "
          f"({toks / c:8.0f} tok/cpu-s)")


if __name__ == "__main__":
  main()
