"""Orbax checkpoints of the generation loop: one per chunk of generations, named by the next generation to run.

A checkpoint holds the loop's whole carry (per-chain data buffers, models, keys) and the host-side history
(metrics, arrays, snapshots), so a resumed run needs nothing else from the workdir. Orbax writes each step to a
temporary directory and renames it when complete, so a killed save leaves no step behind; a step that exists but
cannot be read (corrupted on disk) is reported and the one before it is used.
"""
import os

import jax
import orbax.checkpoint as ocp
from absl import logging

from collapse_jax.config import ConfigError


class Checkpoints:

  def __init__(self, workdir: str, keep: int):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=False, cleanup_tmp_directories=True))

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state) -> None:
    self._manager.save(step, args=ocp.args.StandardSave(state), force=True)
    self._manager.wait_until_finished()

  def restore_latest(self, abstract_state):
    """(step, state) of the newest readable checkpoint, or (None, None) where there is none.

    `abstract_state` gives shapes, dtypes and shardings (jax.ShapeDtypeStruct leaves), so arrays come back
    already laid out on this run's mesh, whatever mesh wrote them. Unreadable steps newer than the one restored
    are moved aside to checkpoints/unreadable-<step>/ (kept for inspection, never deleted) so that the run can
    write those steps again.
    """
    bad = []
    for step in reversed(self.steps()):
      try:
        state = self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
      except Exception as e:  # Orbax/tensorstore raise many types for unreadable files; all mean "skip it".
        lines = [l for l in str(e).strip().splitlines() if l.strip()]
        why = (lines[0][:200] if lines else type(e).__name__)
        path = os.path.join(self.directory, str(step))
        logging.warning("checkpoint %s is unreadable (%s)", path, why)
        print(f"warning: checkpoint {path} is unreadable ({why}); trying an earlier one", flush=True)
        bad.append((step, path, why))
        continue
      self._set_aside(bad)
      return step, state
    if bad:
      _, path, why = bad[0]
      raise ConfigError(f"no readable checkpoint in {self.directory}: the newest, {path}, failed with: {why}")
    return None, None

  def _set_aside(self, bad) -> None:
    if not bad:
      return
    for step, path, _ in bad:
      os.replace(path, os.path.join(self.directory, f"unreadable-{step}"))
    self._manager.reload()

  def close(self) -> None:
    self._manager.close()


def abstract(shapes, shardings):
  """ShapeDtypeStructs carrying the shardings that restored (or freshly made) arrays should have."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)
