"""Orbax checkpoints of the generation loop: one per chunk of generations, named by the next generation to run.

A checkpoint holds the loop's whole carry (per-chain data buffers, models, keys) and the host-side history
(metrics, arrays, snapshots), so a resumed run needs nothing else from the workdir. Orbax writes each step to a
temporary directory and renames it when complete, so a killed save leaves no step behind; a step that exists but
cannot be read (corrupted on disk) is reported and the one before it is used.

Saves are asynchronous: `save` returns once the state is out of the caller's reach, so the next chunk may donate
the carry and the loop may update its history while the files are written in the background. Orbax (0.12) copies
jax.Arrays to host synchronously inside save() (its D2H is "prioritized" unless a device-host byte limit is set,
which we do not set; on CPU the host copy is a numpy reference that makes XLA copy rather than donate) and
deep-copies numpy leaves. Orbax awaits a save before starting the next one, and `wait`/`close` await the last
one; a save still in flight when the process dies never renames its temporary directory, so a killed run resumes
from the save before it. (Checked by resumes from checkpoints whose save ran alongside the next chunk, which
donated the carry, ending bit-identical to uninterrupted runs: test_loop's corrupt-checkpoint test, packed carry;
test_vae's SIGKILL test, a carry saved as it is.)
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from collapse_jax import paths
from collapse_jax.errors import ConfigError


class Checkpoints:

  def __init__(self, workdir: str, keep: int, async_save: bool = True):
    self.directory = paths.abspath(os.path.join(workdir, "checkpoints"))  # a gs:// URL goes to Orbax as is
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save, cleanup_tmp_directories=True))

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state, meta: dict | None = None) -> None:
    """Start saving `state` as `step` (after the previous save has landed); returns before it is on disk. `meta`:
    a small JSON dict kept with the step (the loop's: the history's length), given back to restore_latest."""
    self.wait()  # Orbax would wait too; waiting here first makes a failed earlier save raise before a new one
    self._manager.save(step, args=ocp.args.StandardSave(state), force=True, custom_metadata=meta)

  def busy(self) -> bool:
    """A save is still being written."""
    return self._manager.is_saving_in_progress()

  def wait(self) -> None:
    """Block until the last save is on disk; raises if it failed."""
    self._manager.wait_until_finished()
    self._manager.check_for_errors()

  def restore_latest(self, abstract_state):
    """(step, state) of the newest readable checkpoint, or (None, None) where there is none.

    `abstract_state` gives shapes, dtypes and shardings (jax.ShapeDtypeStruct leaves), so arrays come back
    already laid out on this run's mesh, whatever mesh wrote them; or it is a function of the step's `meta`
    ({} where none was saved) that gives them (the loop's history is as long as the run that saved it). Unreadable steps newer than the one restored
    are moved aside to checkpoints/unreadable-<step>/ (kept for inspection, never deleted) so that the run can
    write those steps again.
    """
    bad = []
    for step in reversed(self.steps()):
      try:
        like = abstract_state(self.meta(step)) if callable(abstract_state) else abstract_state
        state, why = self._manager.restore(step, args=ocp.args.StandardRestore(like)), None
      except Exception as e:  # Orbax/tensorstore raise many types for unreadable files; all mean "skip it".
        lines = [l for l in str(e).strip().splitlines() if l.strip()]
        why = (lines[0][:200] if lines else type(e).__name__)
      if _anywhere(why is not None) and why is None:
        why = "unreadable on another process"
      if why is not None:
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

  def meta(self, step: int) -> dict:
    """The `meta` dict saved with `step` ({} where none was). Read from the step's metadata file itself: the
    manager's metadata() also probes the items and logs a warning for each it is not told how to restore."""
    try:
      meta = json.loads(paths.read_text(os.path.join(self.directory, str(step), "_CHECKPOINT_METADATA")))
      return dict(meta.get("custom_metadata") or {})
    except (OSError, ValueError, AttributeError):  # no or unreadable metadata: the restore decides about the step
      return {}

  def restore_part(self, step: int, abstract_part):
    """Only the subtree `abstract_part` names of checkpoint `step` (e.g. {"carry": ...} without the history), laid
    out as its ShapeDtypeStructs say."""
    args = ocp.args.PyTreeRestore(item=abstract_part, partial_restore=True,
                                  restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_part))
    return self._manager.restore(step, args=args)

  def _set_aside(self, bad) -> None:
    if not bad:
      return
    if jax.process_index() == 0:  # one process moves the shared directories; the others wait for it
      for step, path, _ in bad:
        paths.rename(path, os.path.join(self.directory, f"unreadable-{step}"))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("collapse_jax checkpoints set aside")
    self._manager.reload()

  def close(self) -> None:
    """Await the save in flight (a run may only end, by success or error, with its last save on disk)."""
    self._manager.close()


def _anywhere(flag: bool) -> bool:
  """True on every process if `flag` is true on any: all processes must agree on which step they restore."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(np.asarray(multihost_utils.process_allgather(np.int32(flag))).any())


def abstract(shapes, shardings):
  """ShapeDtypeStructs carrying the shardings that restored (or freshly made) arrays should have."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)


# --- the stored layout: one array per dtype ---------------------------------------------------------------------
# Orbax's cost per save grows with the number of arrays (a tensorstore write, metadata and futures each): about
# 3 ms apiece on the 2-core development VM, so the GMM state's 24 small arrays cost more than the 50 generations
# of a chunk. Leaves of one dtype are therefore stored concatenated: the host-side history as one flat array per
# dtype, a vmapped family's carry as one [chains, n] array per dtype (every leaf has the leading chain axis and
# the same sharding, so the packed array keeps that sharding and restores onto any mesh). Pure data movement:
# unpacking gives back the leaves bit for bit.

def _dtype_groups(leaves) -> dict[str, list[int]]:
  groups = {}
  for i, a in enumerate(leaves):
    if a.size:  # Orbax refuses zero-size arrays; an empty leaf unpacks as zeros of its shape
      groups.setdefault(np.dtype(a.dtype).name, []).append(i)
  return groups


def pack_host(tree) -> dict:
  """Host numpy leaves -> {dtype name: 1-D array}."""
  leaves = jax.tree.leaves(tree)
  return {k: np.concatenate([np.ravel(leaves[i]) for i in idx]) for k, idx in _dtype_groups(leaves).items()}


def unpack_host(packed: dict, like):
  """Inverse of pack_host; `like` gives the structure, shapes and dtypes."""
  leaves, treedef = jax.tree.flatten(like)
  out = [np.zeros(a.shape, a.dtype) for a in leaves]
  for k, idx in _dtype_groups(leaves).items():
    parts = np.split(np.asarray(packed[k]), np.cumsum([leaves[i].size for i in idx])[:-1])
    for i, p in zip(idx, parts):
      out[i] = p.reshape(leaves[i].shape).copy()  # writable, and no view of Orbax's buffer
  return jax.tree.unflatten(treedef, out)


class ChainPacker:
  """pack/unpack of a carry whose leaves all have a leading chain axis and one sharding (vmapped families)."""

  def __init__(self, shapes, shardings):
    sharding = jax.tree.leaves(shardings)[0]
    leaves, self._treedef = jax.tree.flatten(shapes)
    self._leaves = leaves
    self._groups = _dtype_groups(leaves)
    n = leaves[0].shape[0]
    width = lambda a: int(np.prod(a.shape[1:], dtype=np.int64))
    self.abstract = {k: jax.ShapeDtypeStruct((n, sum(width(leaves[i]) for i in idx)), leaves[idx[0]].dtype,
                                             sharding=sharding) for k, idx in self._groups.items()}

    def pack(carry):
      ls = jax.tree.leaves(carry)
      return {k: jnp.concatenate([ls[i].reshape(n, -1) for i in idx], axis=1) for k, idx in self._groups.items()}

    def unpack(packed):
      out = [jnp.zeros(a.shape, a.dtype) for a in leaves]
      for k, idx in self._groups.items():
        cuts = np.cumsum([width(leaves[i]) for i in idx])[:-1]
        for i, p in zip(idx, jnp.split(packed[k], cuts, axis=1)):
          out[i] = p.reshape(leaves[i].shape)
      return jax.tree.unflatten(self._treedef, out)

    self.pack = jax.jit(pack, out_shardings={k: sharding for k in self._groups})
    self.unpack = jax.jit(unpack, out_shardings=shardings)

  @staticmethod
  def applies(shapes, shardings) -> bool:
    leaves, sh = jax.tree.leaves(shapes), jax.tree.leaves(shardings)
    return bool(leaves) and all(a.ndim >= 1 and a.shape[0] == leaves[0].shape[0] and s == sh[0]
                                and not jnp.issubdtype(a.dtype, jax.dtypes.extended) for a, s in zip(leaves, sh))
