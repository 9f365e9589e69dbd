"""Per-generation metrics: aggregation over chains (on device) and metrics.jsonl (on the host).

metrics.jsonl grows by appends of whole lines (one write) rather than a rewrite per chunk, whose cost
grows with the run. A kill can still leave it out of step with the checkpoints (lines the newest checkpoint does
not hold, lines it holds that were never appended, a torn last line), so a run starts by `sync_jsonl`: the file
becomes exactly the lines of the generations its checkpoint holds, rebuilt from the checkpointed history.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np

from collapse_jax import paths


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


def jsonl_lines(history: dict, stats: tuple[str, ...], start: int, stop: int, counts: list[int],
                n_chains: int) -> str:
  """The metrics.jsonl text of generations start..stop-1: complete lines, each ending in a newline. One chain:
  `name: value` (its mean; std and quantiles of one value say nothing); several: `name/stat` for every stat."""
  # tolist() once per metric, not float() per value: the same Python floats, a fraction of the time.
  rows = {name: table[start:stop].tolist() for name, table in history.items()}
  lines = []
  for j, g in enumerate(range(start, stop)):
    row = {"generation": g, "train_samples": counts[g]}
    for name, table in rows.items():
      if n_chains == 1:
        row[name] = table[j][0]
      else:
        for i, s in enumerate(stats):
          row[f"{name}/{s}"] = table[j][i]
    lines.append(json.dumps(row) + "\n")
  return "".join(lines)


def sync_jsonl(path: str, text: str) -> None:
  """Make `path` hold exactly `text` (the lines a restored checkpoint holds), rewriting it atomically only when
  it differs, so a finished run's file is left untouched."""
  try:
    if paths.read_text(path) == text:
      return
  except (FileNotFoundError, UnicodeDecodeError):
    pass
  paths.write_atomic(path, text)


def read_jsonl(path: str, whole_lines: bool = False) -> list[dict]:
  """The rows of a metrics.jsonl. whole_lines: only lines that end in a newline (a reader of a run being written,
  or killed mid-append before its restart repairs the file, skips the torn last line)."""
  text = paths.read_text(path)
  if whole_lines:
    text = text[:text.rfind("\n") + 1]
  return [json.loads(line) for line in text.splitlines() if line.strip()]


def series(rows: list[dict]) -> dict[str, dict[str, np.ndarray]]:
  """metrics.jsonl rows as {metric: {stat: values per generation}}, the one reader of both forms: a one-chain
  run's `name: value` becomes {"mean": ...}; `name/stat` keys give every stat. `generation` and `train_samples`
  come back as {"mean": ...} too. Rows must be consecutive generations from 0 (metrics.jsonl always is)."""
  out: dict[str, dict[str, list]] = {}
  for row in rows:
    for key, value in row.items():
      name, _, stat = key.partition("/")
      out.setdefault(name, {}).setdefault(stat or "mean", []).append(value)
  return {name: {s: np.asarray(v, np.float64) for s, v in st.items()} for name, st in out.items()}


def to_host(tree):
  """numpy copies of a tree of device arrays. On multi-process runs an array split over other processes' devices
  is gathered (a collective: every process calls this on the same tree); replicated ones are read locally."""
  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
      from jax.experimental import multihost_utils
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
  return jax.tree.map(one, tree)
