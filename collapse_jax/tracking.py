"""Watching a run live where researchers already look: every metric of every generation as TensorBoard event files
(WORKDIR/tensorboard/, written by events.py, no TensorFlow needed; texts such as the LM's samples as text
summaries) and to Weights & Biases when `config.wandb.project` names a project. Process 0 alone writes.

Resume: a killed run resumes at its last checkpoint's generation s and logs s, s+1, ... again, which the killed
process may have logged already. TensorBoard shows one point per generation all the same: every start of the run
writes its own event file, named so that files sort by start, opening with a SessionLog.START at its first
generation. TensorBoard's Python loader drops every earlier point at or after a later START's step
(EventAccumulator._CheckForRestartAndMaybePurge; the first START of a run is its start, later ones restarts);
its Rust data server reads the files in name order and a time series' step going back preempts the later
points. W&B: the run id is kept in WORKDIR/wandb.json and the run resumed (resume="allow"); generations W&B
already holds are skipped: online, those below the resumed run's step (W&B would drop them with a warning);
offline, where a resumed run starts at step 0 until `wandb sync`, those below the next step wandb.json records
at every flush.

The loop calls `check(run)` before compiling (a named W&B project without wandb installed is a one-line
ConfigError), then `log` per generation, `flush` per chunk and `close` at the end.
"""
import html
import importlib.util
import json
import os
import socket
import time
import uuid

from collapse_jax import events, paths
from collapse_jax.errors import ConfigError

TB_DIR = "tensorboard"
WANDB_FILE = "wandb.json"


def check(run) -> None:
  """One-line ConfigError if the run asks for W&B and wandb is not installed (before anything compiles)."""
  if run.wandb.project and importlib.util.find_spec("wandb") is None:
    raise ConfigError(f"config.wandb.project={run.wandb.project!r} asks for Weights & Biases, which is not "
                      "installed: pip install wandb (or set config.wandb.project='')")


class Tracker:
  """TensorBoard and W&B for one start of a run (one process's life). run: config.Run; cfg_json: the config as config.json has it."""

  def __init__(self, workdir: str, run, cfg_json: dict):
    import jax
    self.active = jax.process_index() == 0
    self.workdir = workdir
    self._tb = self.active and run.tensorboard
    self._file: str | None = None  # this start's event file, named at its first generation
    self._pending: list[bytes] = []
    self._wb, self._wb_dirty = None, False
    if self.active and run.wandb.project:
      check(run)
      self._wb, self._wb_id, self._wb_next = _wandb_run(workdir, run.wandb, cfg_json)

  def _start_file(self, g: int) -> None:
    tb = os.path.join(self.workdir, TB_DIR)
    paths.makedirs(tb)
    # Sorted by name = by start: the start second, then (same second, same host) the count of earlier files.
    n = sum("tfevents" in f for f in paths.listdir(tb)) if paths.exists(tb) else 0
    name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{n:04d}.collapse_jax"
    self._file = os.path.join(tb, name)
    now = time.time()
    self._pending += [events.record(events.event(now, g, file_version=events.FILE_VERSION)),
                      events.record(events.event(now, g, session_start=True))]

  def log(self, g: int, scalars: dict, texts: dict) -> None:
    """Generation g's scalar metrics ({name as in metrics.jsonl: value}) and texts ({name: text})."""
    if self._tb:
      if self._file is None:
        self._start_file(g)
      values = [events.scalar_value(k, float(v)) for k, v in scalars.items()]
      values += [events.text_value(k, _markdown_verbatim(t)) for k, t in texts.items()]
      self._pending.append(events.record(events.event(time.time(), g, values)))
    if self._wb is not None and g >= self._wb_next:
      import wandb
      data = {k: float(v) for k, v in scalars.items()}
      data.update({k: wandb.Html(f"<pre>{html.escape(t)}</pre>") for k, t in texts.items()})
      self._wb.log(data, step=g)
      self._wb_next, self._wb_dirty = g + 1, True

  def flush(self) -> None:
    """Write what `log` gathered (the loop calls it once per chunk)."""
    if self._pending:
      paths.append_bytes(self._file, b"".join(self._pending))
      self._pending = []
    if self._wb is not None and self._wb_dirty:
      _write_wandb_state(self.workdir, self._wb_id, self._wb_next)
      self._wb_dirty = False

  def close(self) -> None:
    self.flush()
    if self._wb is not None:
      self._wb.finish()
      self._wb = None


def _markdown_verbatim(text: str) -> str:
  """TensorBoard renders text summaries as Markdown: indented four spaces, a text shows as typed (a code
  block), whatever characters it holds."""
  return "\n".join("    " + line for line in text.split("\n"))


def _write_wandb_state(workdir: str, run_id: str, next_step: int) -> None:
  paths.write_atomic(os.path.join(workdir, WANDB_FILE), json.dumps({"run_id": run_id, "next_step": next_step}))


def _wandb_run(workdir: str, wb, cfg_json: dict):
  """(the W&B run, its id, the first generation to log to it): one run id per workdir, resumed by every
  start of the run."""
  import wandb
  state_path = os.path.join(workdir, WANDB_FILE)
  state = json.loads(paths.read_text(state_path)) if paths.exists(state_path) else {}
  run_id = state.get("run_id") or uuid.uuid4().hex[:16]  # W&B ids: letters and digits
  if not state:
    _write_wandb_state(workdir, run_id, 0)
  name = os.path.basename(workdir.rstrip("/")) or None
  run = wandb.init(project=wb.project, entity=wb.entity or None, mode=wb.mode, id=run_id, resume="allow",
                   name=name, config=cfg_json, dir=None if paths.is_remote(workdir) else workdir)
  first = int(getattr(run, "step", 0) or 0) if wb.mode == "online" else int(state.get("next_step", 0))
  return run, run_id, first
