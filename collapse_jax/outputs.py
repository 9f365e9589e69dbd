"""A run's host-side files beside its checkpoints, written by process 0 as the run goes.

- metrics.jsonl: appended after every chunk, resynchronised with the checkpoint at start (metrics.py); the same
  lines go to TensorBoard and W&B (tracking.py).
- After every saved chunk (so a stopped or killed run has them up to its last checkpoint): the figures
  (plots/), the family's own outputs (the LM's samples/), arrays.npz (the array metrics of chain 0, with their
  bin edges where the family gives them: what `collapse-jax report` reads), summary.md, and last outputs.json,
  the manifest {generation, files}. They are drawn on one background thread from a copy of the history, so the
  next chunk runs meanwhile; a chunk saved while the previous drawing is still going is skipped (the next one or
  the end catches up), and the run's end always draws and waits. Every file is replaced atomically.
- A finished workdir whose manifest is missing, older than the run or names a missing file (a run killed while
  drawing them) gets them rebuilt from the restored history when it is run again.
"""
import concurrent.futures
import io
import json
import os

import numpy as np

from collapse_jax import metrics as metrics_lib, paths, plots, regimes, summary

MANIFEST = "outputs.json"


class Outputs:
  def __init__(self, workdir: str, exp, tracker=None):
    self.workdir, self.exp, self.tracker = workdir, exp, tracker
    self.jsonl = os.path.join(workdir, "metrics.jsonl")
    self.sizes = regimes.train_sizes(exp.spec, exp.counts)  # valid training rows, not M_g: accumulating regimes
    self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="collapse_jax_outputs")
    self._pending = None

  # --- metrics.jsonl ---------------------------------------------------------------------------------------------
  def _lines(self, history, start, stop):
    exp = self.exp
    return metrics_lib.jsonl_lines(history["metrics"], exp.stats, start, stop, self.sizes, exp.n_chains)

  def sync(self, history, upto: int) -> None:
    """The file may hold lines past the checkpoint, miss some, or end in a torn line: the checkpoint rules."""
    metrics_lib.sync_jsonl(self.jsonl, self._lines(history, 0, upto))

  def append(self, history, start: int, stop: int) -> None:
    # One write of whole lines; a kill mid-write can tear the last one, which the next run's sync repairs.
    text = self._lines(history, start, stop)
    paths.append_text(self.jsonl, text)
    if self.tracker is not None:
      for row in (json.loads(line) for line in text.splitlines()):
        g = row.pop("generation")
        self.tracker.log(g, row, self.exp.family.texts(history["arrays"], g))
      self.tracker.flush()

  # --- figures, samples, arrays, summary --------------------------------------------------------------------------
  def write(self, history, done: int, wait: bool = False) -> None:
    """Draw everything for generations 0..done-1 in the background (skipped while a drawing is still going,
    unless `wait`: then after it, and returns when written)."""
    if self._pending is not None:
      if not (wait or self._pending.done()):
        return
      self._pending.result()  # a failure in the background surfaces here
      self._pending = None
    copy = _head(history, done, self.exp.snap_gens)
    self._pending = self._pool.submit(self._write, copy, done)
    if wait:
      self._pending.result()
      self._pending = None

  def missing(self, done: int) -> bool:
    """Whether the outputs of generations 0..done-1 are incomplete (no manifest, an older one, a file gone)."""
    path = os.path.join(self.workdir, MANIFEST)
    try:
      manifest = json.loads(paths.read_text(path))
    except (FileNotFoundError, ValueError, UnicodeDecodeError):
      return True
    return manifest.get("generation") != done or not all(
        paths.exists(os.path.join(self.workdir, f)) for f in manifest.get("files", []))

  def summary(self, history, done: int) -> str:
    return summary.text(self.workdir, self.exp, history, done, self._files())

  def close(self) -> None:
    try:
      if self._pending is not None:
        self._pending.result()
    finally:
      self._pending = None
      self._pool.shutdown(wait=True)
      if self.tracker is not None:
        self.tracker.close()

  def _write(self, history, done: int) -> None:
    exp, wd = self.exp, self.workdir
    if exp.run.plots and done:
      make_plots(wd, exp, history)
    if history["arrays"]:
      buf = io.BytesIO()
      edges = {f"{k}.edges": np.asarray(v) for k, v in exp.family.array_edges().items() if k in history["arrays"]}
      np.savez(buf, **history["arrays"], **edges)
      paths.write_atomic(os.path.join(wd, "arrays.npz"), buf.getvalue())
    files = self._files(with_summary=True)
    paths.write_atomic(os.path.join(wd, "summary.md"), summary.text(wd, exp, history, done, files))
    paths.write_atomic(os.path.join(wd, MANIFEST), json.dumps({"generation": done, "files": files}, indent=1))

  def _files(self, with_summary: bool = False) -> list[str]:
    """The workdir's outputs, relative to it, as they are now (figures and samples by name)."""
    wd, out = self.workdir, ["config.json", "metrics.jsonl"]
    if with_summary or paths.exists(os.path.join(wd, "summary.md")):
      out.append("summary.md")
    if paths.exists(os.path.join(wd, "arrays.npz")):
      out.append("arrays.npz")
    for sub in ("checkpoints", "tensorboard"):
      if paths.exists(os.path.join(wd, sub)):
        out.append(f"{sub}/")
    for sub in ("plots", "samples"):
      if paths.exists(os.path.join(wd, sub)):
        out += [f"{sub}/{f}" for f in sorted(paths.listdir(os.path.join(wd, sub))) if not f.endswith(".tmp")]
    return out


def _head(history: dict, done: int, snap_gens) -> dict:
  """Host copies of the first `done` generations (the background drawing must not see the next chunk's)."""
  snaps = {g: history["snapshots"][i].copy() for i, g in enumerate(snap_gens) if g < done}
  return {"metrics": {k: v[:done].copy() for k, v in history["metrics"].items()},
          "arrays": {k: v[:done].copy() for k, v in history["arrays"].items()}, "snapshots": snaps}


def make_plots(workdir: str, exp, history: dict) -> None:
  by_stat = {k: {s: v[:, i] for i, s in enumerate(exp.stats)} for k, v in history["metrics"].items()}
  paths.makedirs(os.path.join(workdir, "plots"))
  fam = exp.family
  plots.metric_bands(workdir, fam.name, by_stat, fam.metric_names, exp.run.chains, titles=fam.titles,
                     groups=fam.groups)
  fam.plot(workdir, by_stat, history["arrays"], history["snapshots"])
