"""Coming back to a workdir: which config changes a resumption allows, and the host-side history sized for the run.

A run is extended by raising config.generations (only that) on a finished or stopped workdir: the loop restores
the shorter history (each checkpoint records how many generations its history holds), grows it, and goes on.
Keys, sample counts and every chunk depend on the generation index only, so the extended run ends identical to
one started with the larger count, as long as the carry's shapes do not depend on the count: accumulating
regimes size their pool by it, and are refused.
"""
import dataclasses
import json
import os

import numpy as np

from collapse_jax import paths, regimes
from collapse_jax.config import RESULT_NEUTRAL
from collapse_jax.errors import ConfigError

def config_diff(old: dict, new: dict, prefix="") -> list[str]:
  out = []
  for k in sorted(set(old) | set(new)):
    a, b = old.get(k), new.get(k)
    if f"{prefix}{k}" in RESULT_NEUTRAL:
      continue
    if isinstance(a, dict) and isinstance(b, dict):
      out += config_diff(a, b, f"{prefix}{k}.")
    elif a != b:
      out.append(f"config.{prefix}{k} ({a!r} -> {b!r})")
  return out


def check(workdir: str, cfg_json: dict, has_checkpoints: bool, exp) -> int | None:
  """Refuses a config that cannot continue the workdir's run (one line naming the fields); returns the run's
  generations as config.json has them (None for a new run)."""
  path = os.path.join(workdir, "config.json")
  if not (has_checkpoints and paths.exists(path)):
    return None
  old = json.loads(paths.read_text(path))
  diff = [d for d in config_diff(old, cfg_json) if not d.startswith("config.generations ")]
  if diff:
    raise ConfigError(f"workdir {workdir} holds a run with another config: {', '.join(diff)}; use a new --workdir")
  held, G = int(old.get("generations", exp.run.generations)), exp.run.generations
  if G < held:
    raise ConfigError(f"config.generations={G} is below the {held} of the run in workdir {workdir}: a run can only "
                      "be extended (raise it), not shortened; use a new --workdir for a shorter run")
  if G > held:
    was = _spec(exp, held)
    if (was.m_max, was.pool_size, was.train_size) != (exp.spec.m_max, exp.spec.pool_size, exp.spec.train_size):
      raise ConfigError(f"config.generations cannot be raised from {held} to {G} in workdir {workdir}: with regime "
                        f"{exp.run.regime.name} and samples.schedule {exp.run.samples.schedule} the data buffers "
                        "are sized by the number of generations, so the longer run would compute differently; "
                        "start it in a new --workdir")
  return held


def _spec(exp, generations: int) -> regimes.Spec:
  run = dataclasses.replace(exp.run, generations=generations)
  counts = run.sample_counts()
  counts[0] = exp.data.n_real
  return regimes.make_spec(run, exp.data.n_real, counts)


def snap_gens(run, generations: int) -> list[int]:
  return sorted({g for g in run.snapshot_generations if g < generations})


def history(exp, ys_shape, generations: int) -> dict:
  """Zeros of the host history of a run of `generations` (ys_shape: one chunk's outputs, from eval_shape)."""
  scalars, arrays, snap = ys_shape
  G = generations
  return {
      "metrics": {k: np.zeros((G,) + v.shape[1:], np.float32) for k, v in scalars.items()},
      "arrays": {k: np.zeros((G,) + v.shape[1:], v.dtype) for k, v in arrays.items()},
      "snapshots": np.zeros((len(snap_gens(exp.run, G)),) + snap.shape[1:], snap.dtype),
      "next_gen": np.zeros((), np.int64),
  }


def grow(old: dict, exp, held: int, new: dict) -> dict:
  """The restored history of a `held`-generation run copied into `new`, the longer run's zeros."""
  for part in ("metrics", "arrays"):
    for k, v in old[part].items():
      new[part][k][:held] = v
  index = {g: i for i, g in enumerate(snap_gens(exp.run, exp.run.generations))}
  for i, g in enumerate(snap_gens(exp.run, held)):
    new["snapshots"][index[g]] = old["snapshots"][i]
  new["next_gen"] = old["next_gen"]
  return new
