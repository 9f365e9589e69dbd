"""GMM recursion throughput: the paper's setting (K=2, 2-D blob, 1000 samples per generation, EM tol 1e-5,
max_iter 2000, a fresh k-means-initialised fit each generation), JAX vs a scikit-learn loop, in one run.

  python benchmarks/gmm_bench.py [--generations=2050] [--sklearn_generations=100] [--chains=256]

Reports generations/s for one chain (JAX's compiled chunk of the generation loop vs GaussianMixture.fit +
sample in Python) and their ratio, then chains x generations/s for many vmapped chains split over all devices.
Both single-chain rows start at generation 0 of the same setting; their mean EM iteration counts are printed
so the comparison is of like work (early generations, a unimodal blob, need more iterations than later ones).
A vmapped while_loop runs until every chain's EM has converged, so per-chain rates fall with the chain count
on CPU; the vmapped row is for accelerators, where the chains fill the device.
"""
import os
import sys
import time

from absl import app, flags
import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import report  # noqa: E402
from collapse_jax import loop  # noqa: E402
from collapse_jax.config import load as load_config  # noqa: E402

_GENS = flags.DEFINE_integer("generations", 2050, "JAX generations timed, from generation 0 (compiled first)")
_SK_GENS = flags.DEFINE_integer("sklearn_generations", 100, "scikit-learn generations timed, from generation 0")
_CHAINS = flags.DEFINE_integer("chains", 256, "chains for the vmapped throughput row")
_CHAIN_GENS = flags.DEFINE_integer("chain_generations", 50, "generations timed for the vmapped row")


def jax_rate(chains: int, generations: int):
  """Generations/s of the loop's compiled chunk from generation 0 (the same trajectory stage sklearn runs)."""
  cfg = load_config("gmm", generations=generations, chains=chains, checkpoint_every=generations)
  exp = loop.Experiment(cfg)
  shared = jax.device_put(exp.family.shared())
  exp.carry_shapes(shared)
  gs = np.arange(generations, dtype=np.int32)
  carry = exp.init_carry(shared)
  t = time.perf_counter()
  compiled = exp.chunk_fn(jax.tree.map(lambda _: None, shared)).lower(carry, gs, shared).compile()
  compile_s = time.perf_counter() - t
  t = time.perf_counter()
  carry, ys = compiled(carry, gs, shared)
  jax.block_until_ready(ys)
  dt = time.perf_counter() - t
  iters = float(np.asarray(ys[0]["em_iters"])[:, 0].mean())
  return generations / dt, compile_s, iters


def sklearn_rate(generations: int, blas_threads: int | None):
  """The same recursion with GaussianMixture.fit + sample; blas_threads=1 pins BLAS to one thread (on small
  VMs threaded BLAS makes sklearn's 2x2 triangular solves far slower, so both are reported)."""
  from sklearn.mixture import GaussianMixture
  from threadpoolctl import threadpool_limits
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1000, 2))
  iters = []
  with threadpool_limits(limits=blas_threads):
    t = time.perf_counter()
    for g in range(generations):
      gm = GaussianMixture(2, covariance_type="full", tol=1e-5, max_iter=2000, random_state=g).fit(x)
      iters.append(gm.n_iter_)
      x = gm.sample(1000)[0]
    dt = time.perf_counter() - t
  return generations / dt, float(np.mean(iters))


def main(_):
  rows = []
  n = _SK_GENS.value
  jax1, c1, it1 = jax_rate(1, n)
  rows.append(dict(impl="jax", chains=1, generations=n, gen_per_s_per_chain=jax1, chain_gen_per_s=jax1,
                   em_iters=it1, compile_s=c1))
  try:
    for threads, name in ((1, "sklearn-1thread"), (None, "sklearn-default")):
      sk, itsk = sklearn_rate(n, threads)
      rows.append(dict(impl=name, chains=1, generations=n, gen_per_s_per_chain=sk, chain_gen_per_s=sk,
                       em_iters=itsk))
      rows[0][f"x_{name}"] = jax1 / sk
  except ImportError:
    print("scikit-learn not installed: peer skipped")
  jf, cf, itf = jax_rate(1, _GENS.value)
  rows.append(dict(impl="jax", chains=1, generations=_GENS.value, gen_per_s_per_chain=jf, chain_gen_per_s=jf,
                   em_iters=itf, compile_s=cf))
  jc, cc, itc = jax_rate(_CHAINS.value, _CHAIN_GENS.value)
  rows.append(dict(impl="jax-vmap", chains=_CHAINS.value, generations=_CHAIN_GENS.value, gen_per_s_per_chain=jc,
                   chain_gen_per_s=jc * _CHAINS.value, em_iters=itc, compile_s=cc))
  report("GMM recursion (K=2, D=2, M=1000, tol 1e-5, max_iter 2000), from generation 0", rows,
         ["impl", "chains", "generations", "gen_per_s_per_chain", "chain_gen_per_s", "em_iters", "compile_s",
          "x_sklearn-1thread", "x_sklearn-default"])


if __name__ == "__main__":
  app.run(main)
