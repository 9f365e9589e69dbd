"""GMM recursion throughput: the paper's setting (K=2, 2-D blob, 1000 samples per generation, EM tol 1e-5,
max_iter 2000, a fresh k-means-initialised fit each generation), JAX vs a scikit-learn loop, in one run.

  python benchmarks/gmm_bench.py [--generations=2050] [--sklearn_generations=50] [--chains=64] [--chain_generations=20]

The peer comparison: generations/s of one chain over the same `--sklearn_generations` generations from
generation 0 (JAX: the loop's compiled chunk; scikit-learn: GaussianMixture.fit + sample in Python, with BLAS
pinned to one thread and as installed), alternating rounds (benchmarks/common.py). Both sides' mean EM
iterations per generation are reported with the time per EM iteration, since the two trajectories draw
different samples and need different iteration counts. Then JAX alone: the whole paper run, and chains x
generations/s for many vmapped chains split over all devices (a vmapped while_loop runs until every chain's EM has
converged, so per-chain rates fall with the chain count on CPU; that row is for accelerators).
"""
import argparse
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402
from collapse_jax import hardware, loop  # noqa: E402
from collapse_jax.config import load as load_config  # noqa: E402


def jax_runner(chains: int, generations: int, rounds: int):
  """The loop's compiled chunk from generation 0 (the same trajectory stage sklearn runs); returns a call that
  runs it on a fresh carry (made beforehand: the chunk donates its carry), its compile time, and a probe of the
  mean EM iterations per generation."""
  cfg = load_config("gmm", generations=generations, chains=chains, checkpoint_every=generations)
  exp = loop.Experiment(cfg)
  shared = jax.device_put(exp.data.shared, exp.shared_shardings)
  gs = np.arange(generations, dtype=np.int32)
  t = time.perf_counter()
  compiled = exp.chunk_fn().lower(exp.init_carry(shared), gs, shared).compile()
  compile_s = time.perf_counter() - t
  carries = [jax.block_until_ready(exp.init_carry(shared)) for _ in range(rounds + 1)]
  out = {}

  def run():
    out["ys"] = jax.block_until_ready(compiled(carries.pop(), gs, shared)[1])

  run()
  iters = float(np.asarray(out["ys"][0]["em_iters"])[:, 0].mean())
  return run, compile_s, iters


def sklearn_runner(generations: int, blas_threads: int | None):
  """The same recursion with GaussianMixture.fit + sample; blas_threads=1 pins BLAS to one thread (on small
  VMs threaded BLAS makes sklearn's 2x2 triangular solves far slower, so both are reported)."""
  from sklearn.mixture import GaussianMixture
  from threadpoolctl import threadpool_limits
  iters = []

  def run():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1000, 2))
    iters.clear()
    with threadpool_limits(limits=blas_threads):
      for g in range(generations):
        gm = GaussianMixture(2, covariance_type="full", tol=1e-5, max_iter=2000, random_state=g).fit(x)
        iters.append(gm.n_iter_)
        x = gm.sample(1000)[0]

  return run, iters


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--generations", type=int, default=2050, help="JAX generations of the whole-run row (0: skip)")
  p.add_argument("--sklearn_generations", type=int, default=50, help="generations of the peer comparison")
  p.add_argument("--chains", type=int, default=64, help="chains for the vmapped throughput row (0: skip)")
  p.add_argument("--chain_generations", type=int, default=20, help="generations timed for the vmapped row")
  p.add_argument("--no-sklearn", action="store_true")
  p.add_argument("--cpu_threads", type=int, default=0,
                 help="cores for XLA's CPU compute, as collapse-jax --cpu_threads (0: all; 1 suits one chain)")
  p.add_argument("--sklearn_default", action=argparse.BooleanOptionalAction, default=True,
                 help="also time scikit-learn with BLAS threads as installed (slow on small VMs)")
  common.add_args(p)
  args = p.parse_args(argv)
  common.check_rounds(args)
  hardware.limit_cpu_threads(args.cpu_threads)
  n = args.sklearn_generations
  run_jax, compile_s, jax_iters = jax_runner(1, n, 2 * args.rounds)
  fns, iters = {"jax": run_jax}, {"jax": jax_iters}
  if not args.no_sklearn:
    try:
      for threads, name in ((1, "sklearn-1thread"), (None, "sklearn-default"))[:2 if args.sklearn_default else 1]:
        fns[name], iters[name] = sklearn_runner(n, threads)
    except ImportError:
      print("scikit-learn not installed: peer skipped")
  state = common.wait_quiet(args, "gmm")
  times = common.alternate(fns, args.rounds)
  rows = []
  for name in fns:
    st = common.summary(times[name])
    it = iters[name] if name == "jax" else float(np.mean(iters[name]))
    rows.append(dict(impl=name, chains=1, generations=n, gen_per_s=n / st["median_s"],
                     chain_gen_per_s=n / st["median_s"], **st, em_iters=it,
                     us_per_em_iter=1e6 * st["median_s"] / (n * it), compile_s=compile_s if name == "jax" else None))
    if name != "jax":
      rows[0][f"x_{name}"] = common.ratio(times["jax"], times[name])["ratio"]
  if "sklearn-1thread" in fns:
    rows[0].update(common.ratio(times["jax"], times["sklearn-1thread"]))
  for chains, gens in ((1, args.generations), (args.chains, args.chain_generations)):
    if not chains or not gens:
      continue
    run, c, it = jax_runner(chains, gens, 2 * args.rounds)
    st = common.summary(common.alternate({"jax": run}, args.rounds)["jax"])
    rows.append(dict(impl="jax" if chains == 1 else "jax-vmap", chains=chains, generations=gens,
                     gen_per_s=gens / st["median_s"], chain_gen_per_s=chains * gens / st["median_s"], **st,
                     em_iters=it, compile_s=c))
  threads = f", XLA on {args.cpu_threads} core(s)" if args.cpu_threads else ""
  return common.report(f"GMM recursion (K=2, D=2, M=1000, tol 1e-5, max_iter 2000{threads}), from generation 0", rows,
                       ["impl", "chains", "generations", "gen_per_s", "chain_gen_per_s", "spread", "em_iters",
                        "us_per_em_iter", "compile_s", "ratio", "x_sklearn-default"], state)


if __name__ == "__main__":
  main()
