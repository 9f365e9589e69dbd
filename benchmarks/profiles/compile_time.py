"""Compile time of OPT programs (XLA:CPU): 5-beam decoding of a corpus (the paper's 64 + 64 tokens, repetition
penalty 3.0) and one training epoch, from abstract parameters (nothing runs; only lowering and compiling are timed).

  python benchmarks/profiles/compile_time.py [--size opt-125m] [--scan_layers 1,0] [--what decode,train]

Prints one JSON line per (program, scan_layers): lower_s, compile_s.
"""
import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--size", default="opt-125m")
  ap.add_argument("--scan_layers", default="1,0", help="comma-separated 1/0 (ignored by code without the option)")
  ap.add_argument("--what", default="decode,train")
  ap.add_argument("--batch", type=int, default=8)
  args = ap.parse_args(argv)
  import jax
  import jax.numpy as jnp
  from collapse_jax import sharding
  from collapse_jax.families.lm import decode
  from collapse_jax.families.lm import train as lm_train
  from collapse_jax.families.lm import model as opt
  from collapse_jax.families.lm import sizes

  has_scan = "scan_layers" in {f.name for f in dataclasses.fields(opt.OPTConfig)}
  for scan in [bool(int(s)) for s in args.scan_layers.split(",")] if has_scan else [None]:
    over = {} if scan is None else {"scan_layers": scan}
    cfg = sizes.get_size(args.size, dtype="float32", **over)
    params = jax.eval_shape(lambda: opt.init_params(cfg, jax.random.key(0)))
    ids = jax.ShapeDtypeStruct((1, args.batch, 64), jnp.int32)
    for what in args.what.split(","):
      if what == "decode":
        lm = decode.opt_lm(cfg)
        dcfg = decode.static(decode.PAPER)
        fn = decode._program(lm, dcfg, None)
        fargs = (params, ids, ids, jax.random.key(0), decode.knobs(lm, decode.PAPER))
      else:
        mesh = sharding.make_lm_mesh(1, 1)
        tcfg = lm_train.TrainConfig(batch_size=args.batch, epochs=1)
        tx = lm_train.make_optimizer(tcfg, 10)
        state = jax.eval_shape(lambda p: lm_train.TrainState(jnp.zeros((), jnp.int32), p, tx.init(p),
                                                             jax.random.key(0)), params)
        rep = sharding.replicated(mesh)
        state_sh = jax.tree.map(lambda _: rep, state)
        fn = lm_train.epoch_program(tcfg, cfg, tx, state_sh, mesh)
        blocks = {"ids": jax.ShapeDtypeStruct((4 * args.batch, 64), jnp.int32),
                  "mask": jax.ShapeDtypeStruct((4 * args.batch, 64), jnp.int32)}
        fargs = (state, blocks, jax.ShapeDtypeStruct((), jnp.int32))
      t0 = time.perf_counter()
      lowered = fn.lower(*fargs)
      t1 = time.perf_counter()
      lowered.compile()
      t2 = time.perf_counter()
      print(json.dumps({"program": what, "size": args.size, "scan_layers": scan, "lower_s": round(t1 - t0, 1),
                        "compile_s": round(t2 - t1, 1), "jax": jax.__version__}), flush=True)


if __name__ == "__main__":
  main()
