"""A/B of VAE training in one process: `VAEFamily.fit` with a baseline families/vae/model.py (from git) against the
working tree's, and the PyTorch peer step from benchmarks/vae_bench.py, alternated over rounds.

  python benchmarks/profiles/vae_profile.py [--base main] [--steps 8] [--rounds 5] [--trace]

--base: the git revision whose collapse_jax/families/vae/model.py is the "before" model (fit itself is the tree's;
the two models have the same parameter tree, so only the graphdef differs). Prints median ms per training step
for each and the per-round ratios. --trace: a jax.profiler trace of one call of each JAX variant, summarised
as ms per step per XLA op (shares, usable on a loaded machine; ops run concurrently, so the sum can exceed the
wall time).
"""
import argparse
import collections
import glob
import gzip
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, _REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from collapse_jax import config as config_lib, registry, sharding  # noqa: E402
from collapse_jax.family import Generation  # noqa: E402
from collapse_jax.families.vae import model as vae_model  # noqa: E402


def _load(name, path):
  spec = importlib.util.spec_from_file_location(name, path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def base_model(rev):
  src = subprocess.run(["git", "-C", _REPO, "show", f"{rev}:collapse_jax/families/vae/model.py"], check=True,
                       capture_output=True, text=True).stdout
  path = os.path.join(tempfile.mkdtemp(), "vae_base.py")
  with open(path, "w") as f:
    f.write(src)
  return _load("vae_base", path)


def jax_runner(model_mod, x, batch):
  cfg = config_lib.load("vae", vae__batch_size=batch, vae__epochs=1)
  _, fam = registry.build(cfg, sharding.make_mesh(None))
  fam.graphdef = nnx.graphdef(nnx.eval_shape(lambda: model_mod.VAE(nnx.Rngs(0))))
  w = jnp.ones((x.shape[0],), jnp.float32)
  prev = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fam.init_model, jax.random.PRNGKey(0), {}))
  gen = Generation(jnp.int32(0), x, w, prev, prev, {}, {})  # fit at generation 0 reads the buffer only
  fit = jax.jit(fam.fit)
  calls = iter(range(1 << 30))
  return lambda: jax.block_until_ready(fit(gen, jax.random.PRNGKey(next(calls))))


def op_table(run, steps, top=25):
  d = tempfile.mkdtemp()
  jax.profiler.start_trace(d)
  run()
  jax.profiler.stop_trace()
  events = json.load(gzip.open(sorted(glob.glob(d + "/**/*.trace.json.gz", recursive=True))[-1]))["traceEvents"]
  agg = collections.Counter()
  skip = ("$", "Pjit", "Thunk", "while", "Common", "Execute", "Slinky", "cond", "call", "end:", "Allocate", "debug")
  for e in events:
    if e.get("ph") == "X" and not e["name"].startswith(skip):
      agg[e["name"]] += e["dur"]
  total = sum(agg.values())
  print(f"  ops sum {total / steps / 1e3:.1f} ms/step")
  for name, us in agg.most_common(top):
    print(f"  {us / steps / 1e3:8.2f} ms {100 * us / total:5.1f}%  {name}")


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--base", default="main")
  p.add_argument("--steps", type=int, default=8)
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--no-torch", action="store_true")
  p.add_argument("--trace", action="store_true")
  a = p.parse_args()
  x_np = np.random.default_rng(0).uniform(size=(a.steps * a.batch,) + vae_model.IMAGE_HxWxC).astype(np.float32)
  x = jnp.asarray(x_np)
  runs = {"before": jax_runner(base_model(a.base), x, a.batch), "after": jax_runner(vae_model, x, a.batch)}
  if not a.no_torch:
    bench = _load("vae_bench", os.path.join(_REPO, "benchmarks", "vae_bench.py"))
    run_torch, _ = bench.torch_runner(x_np, a.batch, "cpu", argparse.Namespace(threads=0))  # the cores JAX uses
    if run_torch is not None:
      runs["torch"] = run_torch
  for run in runs.values():
    run()  # compile / warm-up
  times = {k: [] for k in runs}
  for _ in range(a.rounds):
    for k, run in runs.items():
      t = time.perf_counter()
      run()
      times[k].append(time.perf_counter() - t)
  for k, ts in times.items():
    print(f"{k:7s} {statistics.median(ts) / a.steps * 1e3:8.1f} ms/step  rounds {[round(t, 2) for t in ts]}")
  for k in runs:
    if k != "before":
      r = statistics.median(b / t for b, t in zip(times["before"], times[k]))
      print(f"before / {k} = {r:.3f} (median of per-round ratios)")
  print("loadavg", os.getloadavg())
  if a.trace:
    for k in ("before", "after"):
      print(k)
      op_table(runs[k], a.steps)


if __name__ == "__main__":
  main()
