"""Orbax checkpoints of the generation loop: one per chunk of generations, named by the next generation to run.

A checkpoint holds the loop's whole carry (per-chain data buffers, models, keys) and the host-side history
(metrics, arrays, snapshots), so a resumed run needs nothing else from the workdir. Orbax writes each step to a
temporary directory and renames it when complete, so a killed save leaves no step behind; a step that exists but
cannot be read (corrupted on disk) is reported and the one before it is used.
"""
import os

import jax
import numpy as np
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
    already laid out on this run's mesh, whatever mesh wrote them.
    """
    steps = self.steps()
    errors = []
    for step in reversed(steps):
      try:
        state = self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
      except Exception as e:  # Orbax/tensorstore raise many types for unreadable files; all mean "skip it".
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        path = os.path.join(self.directory, str(step))
        logging.warning("checkpoint %s is unreadable (%s); trying the one before", path, first)
        print(f"warning: checkpoint {path} is unreadable ({first}); falling back to an earlier one", flush=True)
        errors.append((path, first))
        continue
      return step, state
    if errors:
      path, first = errors[0]
      raise ConfigError(f"no readable checkpoint in {self.directory}: newest {path} failed with: {first}")
    return None, None

  def close(self) -> None:
    self._manager.close()


def abstract(tree, shardings=None):
  """ShapeDtypeStructs for a pytree of arrays (with matching shardings where given) for restore targets."""
  if shardings is None:
    return jax.tree.map(lambda a: np.zeros(a.shape, a.dtype) if isinstance(a, np.ndarray) else
                        jax.ShapeDtypeStruct(a.shape, a.dtype), tree)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)
