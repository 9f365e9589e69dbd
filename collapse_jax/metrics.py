"""Per-generation metrics: aggregation over chains (on device) and metrics.jsonl (on the host)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np


def stat_names(quantiles) -> tuple[str, ...]:
  return ("mean", "std") + tuple(f"q{round(100 * q):02d}" for q in quantiles)


def aggregate(metrics_C: dict, n_chains: int, quantiles) -> tuple[dict, dict]:
  """Scalar metrics -> [n_stats] over the first n_chains chains (the rest are mesh padding); non-scalar
  metrics -> chain 0's value. Stats are computed on device so only a few numbers per generation leave it."""
  scalars, arrays = {}, {}
  for name, m in metrics_C.items():
    if m.ndim == 1:
      m = m[:n_chains]
      m = m if jnp.issubdtype(m.dtype, jnp.floating) else m.astype(jnp.float32)
      # Reduced in the metric's own precision, stored as float32 (the history and metrics.jsonl).
      stats = jnp.concatenate([m.mean()[None], m.std()[None], jnp.quantile(m, jnp.asarray(quantiles, m.dtype))])
      scalars[name] = stats.astype(jnp.float32)
    else:
      arrays[name] = m[0]
  return scalars, arrays


def jsonl_lines(history: dict, stats: tuple[str, ...], upto: int, counts: list[int]) -> list[str]:
  lines = []
  for g in range(upto):
    row = {"generation": g, "train_samples": counts[g]}
    for name, table in history.items():
      for i, s in enumerate(stats):
        row[f"{name}/{s}"] = float(table[g, i])
    lines.append(json.dumps(row))
  return lines


def write_atomic(path: str, text: str) -> None:
  """Replace `path` in one rename so a crash never leaves a half-written file behind."""
  tmp = path + ".tmp"
  with open(tmp, "w") as fh:
    fh.write(text)
    fh.flush()
    os.fsync(fh.fileno())
  os.replace(tmp, path)


def read_jsonl(path: str) -> list[dict]:
  with open(path) as fh:
    return [json.loads(line) for line in fh if line.strip()]


def to_host(tree):
  return jax.tree.map(np.asarray, tree)
