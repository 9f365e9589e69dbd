"""The workdir lock: one run per workdir. Two runs on one workdir interleave their checkpoints and metrics.jsonl;
`acquire(workdir)` refuses the second in one line naming the first.

The lock is WORKDIR/lock.json, a holder record (JSON: host, pid, the process's start time, boot id and pid
namespace, when it started, a unique token, a heartbeat time and the lease it promises). It is created atomically
(paths.create_exclusive: a hard link locally, a create-only precondition on gs://) and afterwards changed only
where it still holds what was read (paths.replace_if / remove_if), so of two runs racing for it one wins, and a
release removes the record only while it holds our token.

A lock left by a killed run never blocks:
  * same host (host name, boot id and pid namespace equal, so the pid means the same process table): the holder
    is gone if its pid is gone, a zombie, or another process now (pid reuse: the start time in /proc/PID/stat
    differs). Taken over at once.
  * another host, or one whose processes cannot be seen (no boot id: macOS): a lease. The holder rewrites its
    heartbeat every lease/4 seconds from a daemon thread; a heartbeat older than the lease (LEASE_S, 60 s;
    COLLAPSE_JAX_LOCK_LEASE overrides it, for tests) means the holder is gone. The lease compares two hosts' wall
    clocks: they must agree to well within it (NTP does).
A holder paused past its lease may be taken over; its next heartbeat finds another's record and marks the lock
lost (`Lock.check()` raises), so the loop can stop before it writes over the new run.
"""
import json
import os
import socket
import sys
import threading
import time
import uuid

from collapse_jax import paths
from collapse_jax.errors import ConfigError

LOCK_FILE = "lock.json"
LEASE_S = 60.0
LEASE_ENV = "COLLAPSE_JAX_LOCK_LEASE"
_HELD: set[str] = set()  # tokens of the locks this process holds or is taking: a record of it not among them is stale


class WorkdirBusy(ConfigError):
  """Another run holds the workdir's lock (or its lock file is unreadable)."""


def lease_seconds() -> float:
  raw = os.environ.get(LEASE_ENV, "")
  if not raw:
    return LEASE_S
  try:
    lease = float(raw)
  except ValueError:
    lease = float("nan")
  if not lease > 0 or lease == float("inf"):
    raise ConfigError(f"{LEASE_ENV}={raw} must be a positive number of seconds")
  return lease


def _read(path: str) -> str | None:
  try:
    with open(path, encoding="utf-8") as fh:
      return fh.read().strip()
  except OSError:
    return None


def _proc_stat(pid: int) -> tuple[str, int] | None:
  """(state, start time in clock ticks since boot) from /proc/PID/stat, None where it cannot be read."""
  stat = _read(f"/proc/{pid}/stat")
  if stat is None:
    return None
  try:
    rest = stat[stat.rindex(")") + 2:].split()  # the command name (field 2) may hold spaces and parentheses
    return rest[0], int(rest[19])  # fields 3 (state) and 22 (starttime)
  except (ValueError, IndexError):
    return None


def _identity() -> dict:
  """What makes two records' pids comparable: the same host, boot and pid namespace."""
  try:
    pid_ns = os.stat("/proc/self/ns/pid").st_ino
  except OSError:
    pid_ns = None
  return {"host": socket.gethostname(), "boot_id": _read("/proc/sys/kernel/random/boot_id"), "pid_ns": pid_ns}


def _alive(pid: int, pid_start) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, another user's
    pass
  except OSError:
    return False
  stat = _proc_stat(pid)
  if stat is None:  # no /proc: the pid exists, which is all that can be known
    return True
  state, start = stat
  return state not in ("Z", "X") and (pid_start is None or start == pid_start)


def _stale(rec: dict) -> bool:
  """Whether the holder of `rec` is gone."""
  me = _identity()
  if me["boot_id"] is not None and all(rec.get(k) == me[k] for k in me):
    pid = rec["pid"]
    stat = _proc_stat(pid)
    if pid == os.getpid() and stat is not None and rec.get("pid_start") == stat[1]:
      return rec["token"] not in _HELD  # this process: held by a live Lock, or left by one never released
    return not _alive(pid, rec.get("pid_start"))
  return time.time() - rec["heartbeat"] > rec["lease_s"]


def _parse(raw: bytes, workdir: str, path: str) -> dict:
  try:
    rec = json.loads(raw.decode("utf-8"))
    ok = (isinstance(rec, dict) and isinstance(rec.get("token"), str) and isinstance(rec.get("pid"), int)
          and all(isinstance(rec.get(k), (int, float)) for k in ("heartbeat", "lease_s")))
  except ValueError:
    ok = False
  if not ok:
    raise WorkdirBusy(f"workdir {workdir} has an unreadable lock file {path}; remove it if no run uses this workdir")
  return rec


def _mine(path: str, token: str, workdir: str) -> tuple[dict, object] | None:
  """(record, version) if `path` holds our token. Read back after every write: it also settles a request that
  was retried after the server had done it (a create or replace then reports a failed precondition)."""
  cur = paths.read_versioned(path)
  if cur is None:
    return None
  rec = _parse(cur[0], workdir, path)
  return (rec, cur[1]) if rec["token"] == token else None


def _busy(workdir: str, path: str, rec: dict) -> WorkdirBusy:
  return WorkdirBusy(f"workdir {workdir} is in use by another run: pid {rec['pid']} on host {rec.get('host')} "
                     f"since {rec.get('started')} (lock file {path}); wait for it or use another --workdir")


def acquire(workdir: str) -> "Lock":
  """Take the workdir's lock, or raise WorkdirBusy naming its holder. Release it with `Lock.release()` or use
  it as a context manager."""
  path = os.path.join(workdir, LOCK_FILE)
  token, lease = uuid.uuid4().hex, lease_seconds()
  started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
  ident = {**_identity(), "pid": os.getpid(), "pid_start": (_proc_stat(os.getpid()) or (None, None))[1]}
  _HELD.add(token)  # before the record is written: a thread of this process racing us must see it as live
  try:
    for _ in range(10):  # each pass ends in a win, a refusal, or a change by another run; a few cover any race
      rec = {**ident, "started": started, "token": token, "heartbeat": time.time(), "lease_s": lease}
      data = json.dumps(rec, sort_keys=True)
      cur = paths.read_versioned(path)
      if cur is None:
        paths.create_exclusive(path, data)
      else:
        held = _parse(cur[0], workdir, path)
        if held["token"] != token:
          if not _stale(held):
            raise _busy(workdir, path, held)
          paths.replace_if(path, data, cur[1])  # at the version judged stale: of racing takers, one wins
      mine = _mine(path, token, workdir)
      if mine is not None:
        return Lock(workdir, path, token, *mine)
  except BaseException:
    _HELD.discard(token)
    raise
  _HELD.discard(token)
  raise WorkdirBusy(f"workdir {workdir}: its lock file {path} kept changing while this run tried to take it; "
                    "another run is starting there: use another --workdir")


class Lock:
  """A held workdir lock: a daemon thread refreshes its heartbeat every lease/4 seconds until `release()`."""

  def __init__(self, workdir: str, path: str, token: str, record: dict, version):
    self.workdir, self.path, self.token = workdir, path, token
    self._rec, self._version = record, version
    self.lost: str | None = None  # why the lock was lost (taken over after a pause past the lease)
    self._released = False
    self._mu = threading.Lock()  # a heartbeat and the release never interleave
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._beat_forever, name="collapse-jax-lock", daemon=True)
    self._thread.start()

  def _beat_forever(self):
    warned = False
    while not self._stop.wait(self._rec["lease_s"] / 4):
      try:
        if not self.heartbeat():
          return
      except Exception as e:  # a transient I/O error (gs:// network): keep the lease alive at the next beat
        if not warned:
          print(f"warning: workdir lock heartbeat failed ({type(e).__name__}: {e}); retrying", file=sys.stderr)
          warned = True

  def heartbeat(self) -> bool:
    """Rewrite the heartbeat if the record is still ours; False (and `lost` set) if another run holds it."""
    with self._mu:
      if self._released or self.lost:
        return False
      rec = {**self._rec, "heartbeat": time.time()}
      paths.replace_if(self.path, json.dumps(rec, sort_keys=True), self._version)
      mine = _mine(self.path, self.token, self.workdir)
      if mine is None:
        self.lost = (f"workdir {self.workdir}: this run's lock ({self.path}) was taken over by another run "
                     f"after its heartbeat stopped for over the {self._rec['lease_s']:g} s lease; stopped so "
                     "that the two runs do not interleave")
        _HELD.discard(self.token)
        return False
      self._rec, self._version = mine
      return True

  def check(self) -> None:
    """Raise WorkdirBusy if the lock was lost."""
    if self.lost:
      raise WorkdirBusy(self.lost)

  def release(self) -> None:
    """Stop the heartbeat and remove the lock file if it still holds our token (never another run's)."""
    self._stop.set()
    if self._thread is not threading.current_thread():
      self._thread.join()
    with self._mu:
      if self._released:
        return
      self._released = True
      _HELD.discard(self.token)
      mine = _mine(self.path, self.token, self.workdir)
      if mine is not None:
        paths.remove_if(self.path, mine[1])

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.release()


def acquire_run(workdir: str) -> Lock | None:
  """The run's lock, taken by process 0 alone: process 0 gets the Lock, the others None. With several processes
  this is a collective (every process calls it): process 0's outcome is broadcast, so all of them refuse
  together, the others naming the lock file."""
  import jax
  lock, err = None, None
  if jax.process_index() == 0:
    try:
      lock = acquire(workdir)
    except Exception as e:  # broadcast first: the other processes must not wait on a process that has left
      err = e
  if jax.process_count() > 1:
    import numpy as np
    from jax.experimental import multihost_utils
    ok = bool(multihost_utils.broadcast_one_to_all(np.int32(err is None)))
    if not ok and err is None:
      raise WorkdirBusy(f"workdir {workdir} is in use by another run (process 0 found its lock file "
                        f"{os.path.join(workdir, LOCK_FILE)}); wait for it or use another --workdir")
  if err is not None:
    raise err
  return lock
