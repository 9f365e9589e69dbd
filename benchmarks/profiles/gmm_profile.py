"""GMM recursion on XLA:CPU: kernels (thunks) per while-loop iteration and time per generation, A/B in one process.

  python benchmarks/profiles/gmm_profile.py [--baseline=HEAD] [--generations=50] [--rounds=7] [--breakdown]
  python benchmarks/profiles/gmm_profile.py --env_ab   # the same chunk under XLA flags / one core, subprocesses

The timed thing is gmm_bench.py's: the loop's compiled chunk of `generations` generations from generation 0
(K=2, D=2, 1000 points). Variants: collapse_jax/families/gmm/em.py of this tree vs of git revision --baseline, swapped into
collapse_jax.families.gmm.family; rounds alternate the variants and medians/minima are reported (a shared machine is noisy).
For each compiled chunk it prints the thunk-producing instructions (fusions, copies, calls, nested whiles) of
every while body in the optimised HLO: on 1000 x 2 points an EM iteration costs about as much as the launches
of its kernels, so that count is the per-iteration cost model. --breakdown also times the chunk with EM cut to
1 iteration and Lloyd to 1 iteration (the differences are EM's and k-means' shares of a generation).
Besides wall time it reports the process's CPU time per generation: on a shared machine that is the steadier
number, and its excess over wall time is what XLA:CPU's intra-op thread pool burns (the E-step's exp fusion is
split over 2 threads, and while bodies of > 8 thunks run on the pool's dataflow executor).
"""
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import time

from absl import app, flags
import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from collapse_jax import loop  # noqa: E402
from collapse_jax.families.gmm import family as gmm_family  # noqa: E402
from collapse_jax.config import load as load_config  # noqa: E402

_BASE = flags.DEFINE_string("baseline", "HEAD", "git revision whose collapse_jax/families/gmm/em.py is the A side ('' = none)")
_GENS = flags.DEFINE_integer("generations", 50, "generations per timed chunk")
_ROUNDS = flags.DEFINE_integer("rounds", 7, "alternating timing rounds")
_BREAKDOWN = flags.DEFINE_bool("breakdown", False, "also time EM cut to 1 iteration and Lloyd to 1 iteration")
_ENV_AB = flags.DEFINE_bool("env_ab", False, "rerun this script (tree only) under XLA flags and on one core")
_PIN_AT_INIT = flags.DEFINE_bool("pin_at_init", False, "one core visible only while JAX creates its CPU client "
                                 "(its intra-op pool and max parallelism become 1), all cores after")

_THUNK = re.compile(r"= \S+ (fusion|copy|custom-call|call|while|conditional|dot|reduce|sort)\(")


def while_bodies(hlo: str) -> dict:
  """{while: thunks in its body} from optimised HLO text (each body instruction that becomes a thunk)."""
  comps, cur = {}, None
  for line in hlo.splitlines():
    m = re.match(r"^(?:ENTRY )?%(\S+) ", line)
    if m and line.rstrip().endswith("{"):
      cur = comps.setdefault(m.group(1), [])
    elif line.startswith("}"):
      cur = None
    elif cur is not None:
      cur.append(line)
  out = {}
  for lines in comps.values():
    for line in lines:
      m = re.search(r"%(while[.\d]*) = .* while\(.*body=%([^,]+),", line)
      if m:
        out[m.group(1)] = sum(1 for x in comps[m.group(2)] if _THUNK.search(x))
  return out


def load_em(rev: str | None):
  if rev is None:
    path = os.path.join(ROOT, "collapse_jax", "families", "gmm", "em.py")
  else:
    src = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:collapse_jax/families/gmm/em.py"], check=True,
                         capture_output=True, text=True).stdout
    path = os.path.join(tempfile.mkdtemp(), "em.py")
    with open(path, "w") as f:
      f.write(src)
  spec = importlib.util.spec_from_file_location(f"em_{rev or 'tree'}", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def build(em_mod, g, **gmm_overrides):
  gmm_family.em = em_mod  # the family calls em.* at trace time, so this picks the variant
  cfg = load_config("gmm", generations=g, chains=1, checkpoint_every=g)
  for k, v in gmm_overrides.items():
    cfg.gmm[k] = v
  exp = loop.Experiment(cfg)
  shared = jax.device_put(exp.data.shared, exp.shared_shardings)
  gs = np.arange(g, dtype=np.int32)
  compiled = exp.chunk_fn().lower(exp.init_carry(shared), gs, shared).compile()
  return exp, shared, gs, compiled


def main(_):
  if _ENV_AB.value:
    return env_ab()
  if _PIN_AT_INIT.value:
    cores = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cores)})
    jax.devices()
    os.sched_setaffinity(0, cores)
  g = _GENS.value
  mods = {"tree": load_em(None)}
  if _BASE.value:
    mods = {f"base({_BASE.value})": load_em(_BASE.value), **mods}
  variants = {}
  for name, mod in mods.items():
    variants[name] = build(mod, g)
    if _BREAKDOWN.value:
      variants[name + " em1"] = build(mod, g, max_iter=1)
      variants[name + " em1 km1"] = build(mod, g, max_iter=1, kmeans_iter=1)
  for name, v in variants.items():
    print(f"{name:24s} thunks per while-body iteration: {sorted(while_bodies(v[3].as_text()).values())}")
  times = {n: [] for n in variants}
  cpu = {n: [] for n in variants}  # process CPU time: less sensitive than wall time to other jobs' load
  iters = {}
  for _ in range(_ROUNDS.value):
    for name, (exp, shared, gs, compiled) in variants.items():
      carry = exp.init_carry(shared)
      t, c = time.perf_counter(), time.process_time()
      _, ys = compiled(carry, gs, shared)
      jax.block_until_ready(ys)
      times[name].append((time.perf_counter() - t) / g * 1e6)
      cpu[name].append((time.process_time() - c) / g * 1e6)
      iters[name] = float(np.asarray(ys[0]["em_iters"])[:, 0].mean())
  for name, ts in times.items():
    med = np.median(ts)
    print(f"{name:24s} {med:7.0f} us/gen median, {min(ts):7.0f} min  ({1e6 / med:6.0f} gen/s)  "
          f"CPU {np.median(cpu[name]):6.0f} us/gen  EM iterations/gen {iters[name]:.2f}")


def env_ab():
  """The tree's chunk under environments that change XLA:CPU's threading and kernel count (subprocesses,
  alternated twice)."""
  envs = {
      "default": ({}, []),
      "1 core (taskset)": ({}, ["taskset", "-c", "0"]),
      "pool of 1 (--pin_at_init)": ({}, ["--pin_at_init"]),
      "ynn off + small-while 1e8": ({"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type= "
                                     "--xla_backend_extra_options=xla_cpu_small_while_loop_byte_threshold=100000000"},
                                    []),
  }
  for _ in range(2):
    for name, (env, prefix) in envs.items():
      pre, post = [a for a in prefix if not a.startswith("--")], [a for a in prefix if a.startswith("--")]
      cmd = pre + [sys.executable, os.path.abspath(__file__), "--baseline=", f"--rounds={_ROUNDS.value}",
                   f"--generations={_GENS.value}"] + post
      out = subprocess.run(cmd, env=dict(os.environ, **env), capture_output=True, text=True).stdout
      print(f"[{name}]\n" + "".join("  " + line + "\n" for line in out.splitlines()))


if __name__ == "__main__":
  app.run(main)
