"""The workdir lock (collapse_jax/lock.py) and the conditional writes under it (paths.create_exclusive,
read_versioned, replace_if, remove_if), local and gs:// (the GCS emulator of tests/test_paths.py, with
generation preconditions: tests/gcs_emulator.py).

Real processes where it matters: a holder in a subprocess refuses a second process in one line naming its pid and
host; SIGKILLed (and left a zombie) it frees the lock at once; racing processes and threads take it exactly once
(threads meet at a barrier after reading the lock, so every one of them tries to write the same version). Leases:
a record from another host is judged by its heartbeat, which a live holder keeps fresh from its thread; a holder
paused past its lease is taken over, learns it, and its release leaves the new holder's file alone. Lock files are
read back with json and, on gs://, through the emulator's own API."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from collapse_jax import lock, paths
from collapse_jax.errors import ConfigError
from tests.helpers import REPO
from tests import test_paths

BUCKET = test_paths.BUCKET
gcs, root = test_paths.gcs, test_paths.root  # its fixtures: the GCS emulator; a local or gs:// directory

_HOLD = """
import os, sys, time
from collapse_jax import lock
try:
  held = lock.acquire(sys.argv[1])
except lock.WorkdirBusy as e:
  print("busy", e, flush=True)
  sys.exit(3)
print("won", flush=True)
deadline = time.time() + 120
while not os.path.exists(sys.argv[2]) and time.time() < deadline:  # hold until the test says so
  time.sleep(0.02)
held.release()
"""


def _python(code: str, *args, start_at: float | None = None) -> subprocess.Popen:
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  if start_at is not None:  # racers: sleep until a common instant, after their imports
    code = f"import time\ntime.sleep(max(0, {start_at} - time.time()))\n" + code
  return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _record(path: str) -> dict:
  with open(path) as fh:
    return json.load(fh)


def _other_host(heartbeat: float, lease: float = 60.0, pid: int = 4242) -> str:
  return json.dumps({"host": "other-host-xyz", "boot_id": "b", "pid_ns": 1, "pid": pid, "pid_start": 7,
                     "started": "2026-01-02T03:04:05Z", "token": "theirs", "heartbeat": heartbeat, "lease_s": lease})


def _busy_line(wd, pid, host, started) -> str:
  return (f"workdir {wd} is in use by another run: pid {pid} on host {host} since {started} "
          f"(lock file {os.path.join(wd, 'lock.json')}); wait for it or use another --workdir")


# --- real processes --------------------------------------------------------------------------------------------
def test_a_second_process_is_refused_naming_the_first_and_a_killed_holder_frees_it_at_once(tmp_path):
  wd, done = str(tmp_path / "wd"), tmp_path / "done"
  os.makedirs(wd)
  holder = _python(_HOLD, wd, done)
  try:
    assert holder.stdout.readline().strip() == "won"
    rec = _record(os.path.join(wd, "lock.json"))
    assert (rec["pid"], rec["host"]) == (holder.pid, socket.gethostname())
    assert abs(time.mktime(time.strptime(rec["started"], "%Y-%m-%dT%H:%M:%SZ")) - time.mktime(time.gmtime())) < 120
    second = _python(_HOLD, wd, done)
    out, _ = second.communicate(timeout=60)
    assert second.returncode == 3, out
    assert out.strip() == "busy " + _busy_line(wd, holder.pid, socket.gethostname(), rec["started"])
    with pytest.raises(lock.WorkdirBusy) as e:  # and in this process, the same one line
      lock.acquire(wd)
    assert str(e.value) == _busy_line(wd, holder.pid, socket.gethostname(), rec["started"])
    holder.send_signal(signal.SIGKILL)
    while os.path.exists(f"/proc/{holder.pid}") and open(f"/proc/{holder.pid}/stat").read().split()[2] != "Z":
      time.sleep(0.01)  # not reaped: a zombie, which os.kill(pid, 0) still finds
    t = time.monotonic()
    with lock.acquire(wd) as mine:  # at once: no lease to wait out (the default is 60 s)
      assert time.monotonic() - t < 5 and lock.lease_seconds() == 60
      assert _record(os.path.join(wd, "lock.json"))["token"] == mine.token
    assert not os.path.exists(os.path.join(wd, "lock.json"))
  finally:
    holder.kill()
    holder.wait()


@pytest.mark.parametrize("stale", [False, True], ids=["empty", "stale_other_host"])
def test_racing_processes_exactly_one_wins(tmp_path, stale):
  wd, done = str(tmp_path / "wd"), tmp_path / "done"
  os.makedirs(wd)
  if stale:
    paths.write_atomic(os.path.join(wd, "lock.json"), _other_host(time.time() - 3600))
  racers = [_python(_HOLD, wd, done, start_at=time.time() + 2.0) for _ in range(4)]
  try:
    first = [p.stdout.readline().split(" ")[0].strip() for p in racers]
    assert sorted(first) == ["busy", "busy", "busy", "won"], first
    winner = racers[first.index("won")]
    assert _record(os.path.join(wd, "lock.json"))["pid"] == winner.pid
  finally:
    done.touch()
    for p in racers:
      p.wait(60)
  assert not os.path.exists(os.path.join(wd, "lock.json"))


# --- leases and liveness ---------------------------------------------------------------------------------------
def test_another_hosts_lock_is_judged_by_its_lease(tmp_path):
  wd = str(tmp_path)
  path = os.path.join(wd, "lock.json")
  paths.write_atomic(path, _other_host(time.time() - 5, lease=60))
  with pytest.raises(lock.WorkdirBusy) as e:
    lock.acquire(wd)
  assert str(e.value) == _busy_line(wd, 4242, "other-host-xyz", "2026-01-02T03:04:05Z")
  assert _record(path)["token"] == "theirs"
  paths.write_atomic(path, _other_host(time.time() - 61, lease=60))
  with lock.acquire(wd) as mine:
    rec = _record(path)
    assert (rec["token"], rec["pid"], rec["host"]) == (mine.token, os.getpid(), socket.gethostname())


def test_a_live_holder_keeps_its_lease_and_one_paused_past_it_is_taken_over_and_knows(tmp_path, monkeypatch):
  wd = str(tmp_path)
  path = os.path.join(wd, "lock.json")
  monkeypatch.setenv(lock.LEASE_ENV, "0.6")  # heartbeat every 0.15 s
  holder = lock.acquire(wd)
  beat0 = _record(path)["heartbeat"]
  # From here this process judges as if on another host: by the lease, not by the pid.
  monkeypatch.setattr(lock, "_identity", lambda: {"host": "elsewhere", "boot_id": "x", "pid_ns": 0})
  t_end = time.monotonic() + 2.0
  while time.monotonic() < t_end:  # over three leases: the heartbeat keeps it
    with pytest.raises(lock.WorkdirBusy, match="is in use by another run"):
      lock.acquire(wd)
    time.sleep(0.1)
  assert _record(path)["heartbeat"] > beat0 + 1.0
  holder._stop.set()  # the holder pauses (a stopped VM, a long GC): no more heartbeats
  holder._thread.join()
  time.sleep(0.7)
  taker = lock.acquire(wd)
  assert _record(path)["token"] == taker.token
  assert holder.heartbeat() is False
  with pytest.raises(lock.WorkdirBusy, match=r"this run's lock \(.*lock\.json\) was taken over by another run"):
    holder.check()
  holder.release()  # never removes the taker's record
  assert _record(path)["token"] == taker.token
  taker.check()
  taker.release()
  assert not os.path.exists(path)


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="pid start times need /proc")
def test_same_host_holders_are_judged_by_their_pid_gone_reused_or_live(tmp_path):
  wd = str(tmp_path)
  path = os.path.join(wd, "lock.json")
  other = subprocess.Popen(["sleep", "60"])
  gone = subprocess.Popen(["true"])
  gone.wait()  # exited and reaped: its pid names no process
  try:
    start = int(open(f"/proc/{other.pid}/stat").read().rsplit(")", 1)[1].split()[19])
    me = lock._identity()
    rec = {**me, "pid": other.pid, "pid_start": start, "started": "2026-01-02T03:04:05Z", "token": "theirs",
           "heartbeat": time.time() - 3600, "lease_s": 60.0}  # an old heartbeat: on this host the pid decides
    paths.write_atomic(path, json.dumps(rec))
    with pytest.raises(lock.WorkdirBusy, match=f"pid {other.pid} on host {socket.gethostname()} since"):
      lock.acquire(wd)
    paths.write_atomic(path, json.dumps({**rec, "pid_start": start - 1, "heartbeat": time.time()}))
    with lock.acquire(wd) as mine:  # the pid lives, but it is another process than the one that took the lock
      assert _record(path)["token"] == mine.token
    paths.write_atomic(path, json.dumps({**rec, "pid": gone.pid, "heartbeat": time.time()}))
    with lock.acquire(wd) as mine:  # a fresh heartbeat, but its process is gone
      assert _record(path)["token"] == mine.token
  finally:
    other.kill()
    other.wait()


def test_release_leaves_another_holders_lock_alone_and_a_context_manager_releases_on_error(tmp_path):
  wd = str(tmp_path)
  path = os.path.join(wd, "lock.json")
  mine = lock.acquire(wd)
  theirs = _other_host(time.time())
  paths.write_atomic(path, theirs)  # taken over behind our back
  mine.release()
  with open(path) as fh:
    assert fh.read() == theirs
  os.remove(path)
  with pytest.raises(RuntimeError, match="boom"):
    with lock.acquire(wd):
      raise RuntimeError("boom")
  assert not os.path.exists(path)
  lock.acquire(wd).release()  # and it can be taken again


def test_bad_lock_file_and_bad_lease_are_one_line_errors(tmp_path, monkeypatch):
  wd = str(tmp_path)
  paths.write_atomic(os.path.join(wd, "lock.json"), "{not json")
  with pytest.raises(lock.WorkdirBusy) as e:
    lock.acquire(wd)
  assert str(e.value) == (f"workdir {wd} has an unreadable lock file {wd}/lock.json; remove it if no run uses this "
                          "workdir")
  monkeypatch.setenv(lock.LEASE_ENV, "-1")
  with pytest.raises(ConfigError, match=r"^COLLAPSE_JAX_LOCK_LEASE=-1 must be a positive number of seconds$"):
    lock.acquire(str(tmp_path / "b"))


def test_only_process_0_takes_the_lock_and_every_process_learns_the_outcome(tmp_path, monkeypatch):
  import jax
  from jax.experimental import multihost_utils
  wd = str(tmp_path)
  sent = []

  def broadcast(x, verdict):  # what process 0 would send: the others get it, process 0 sends its own
    sent.append(int(x))
    return verdict if jax.process_index() != 0 else x

  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", lambda x: broadcast(x, 1))
  assert lock.acquire_run(wd) is None and not os.path.exists(os.path.join(wd, "lock.json"))
  monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", lambda x: broadcast(x, 0))
  with pytest.raises(lock.WorkdirBusy, match=r"^workdir \S+ is in use by another run \(process 0 found its lock"):
    lock.acquire_run(wd)
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  held = lock.acquire_run(wd)
  assert _record(os.path.join(wd, "lock.json"))["token"] == held.token and sent[-1] == 1
  with pytest.raises(lock.WorkdirBusy, match="is in use by another run: pid"):
    lock.acquire_run(wd)  # process 0 refused: it tells the others (0) before raising
  assert sent[-1] == 0
  held.release()


# --- racing threads and gs:// ----------------------------------------------------------------------------------
def _race(monkeypatch, wd: str, n: int = 4) -> list:
  """n threads acquire at once, each waiting after its first read of the lock until all have read it."""
  barrier, first, real = threading.Barrier(n), threading.local(), paths.read_versioned

  def read_then_meet(path):
    out = real(path)
    if not getattr(first, "done", False):
      first.done = True
      barrier.wait(30)
    return out

  monkeypatch.setattr(paths, "read_versioned", read_then_meet)
  results = [None] * n

  def take(i):
    try:
      results[i] = lock.acquire(wd)
    except lock.WorkdirBusy as e:
      results[i] = e

  threads = [threading.Thread(target=take, args=(i,)) for i in range(n)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(60)
  monkeypatch.setattr(paths, "read_versioned", real)
  return results


@pytest.mark.parametrize("stale", [False, True], ids=["empty", "stale_other_host"])
def test_racing_threads_exactly_one_wins(root, monkeypatch, stale):
  paths.check_workdir(root)
  path = os.path.join(root, "lock.json")
  if stale:
    paths.write_atomic(path, _other_host(time.time() - 3600))
  results = _race(monkeypatch, root)
  won = [r for r in results if isinstance(r, lock.Lock)]
  assert len(won) == 1, results
  assert all("is in use by another run: pid" in str(r) for r in results if r not in won)
  assert json.loads(paths.read_text(path))["token"] == won[0].token
  won[0].release()
  assert paths.read_versioned(path) is None


def test_gs_lock_is_taken_refused_taken_over_and_released(gcs):
  wd = f"gs://{BUCKET}/lock/{time.time_ns()}"
  prefix = wd[len(f"gs://{BUCKET}/"):]
  held = lock.acquire(wd)
  assert gcs.names(prefix) == [f"{prefix}/lock.json"]  # one object, no guard file or temp object on gs://
  assert json.loads(gcs.read(f"{prefix}/lock.json"))["token"] == held.token
  with pytest.raises(lock.WorkdirBusy, match=rf"^workdir {wd} is in use by another run: pid {os.getpid()} on host "):
    lock.acquire(wd)
  assert held.heartbeat() and json.loads(gcs.read(f"{prefix}/lock.json"))["token"] == held.token
  theirs = _other_host(time.time())
  paths.write_atomic(f"{wd}/lock.json", theirs)
  assert held.heartbeat() is False and held.lost
  held.release()
  assert gcs.read(f"{prefix}/lock.json").decode() == theirs
  paths.write_atomic(f"{wd}/lock.json", _other_host(time.time() - 3600))
  with lock.acquire(wd) as mine:
    assert json.loads(gcs.read(f"{prefix}/lock.json"))["token"] == mine.token
  assert gcs.names(prefix) == []


def test_conditional_writes(root):
  paths.check_workdir(root)
  f = os.path.join(root, "x.json")
  assert paths.read_versioned(f) is None
  assert paths.create_exclusive(f, "one") is True
  assert paths.create_exclusive(f, "two") is False
  raw, v1 = paths.read_versioned(f)
  assert raw == b"one" and paths.read_text(f) == "one"
  assert paths.replace_if(f, "three", v1) is True
  assert paths.replace_if(f, "four", v1) is False  # v1 is no longer current
  raw, v3 = paths.read_versioned(f)
  assert raw == b"three" and paths.remove_if(f, v1) is False and paths.read_text(f) == "three"
  assert paths.remove_if(f, v3) is True and paths.read_versioned(f) is None
  assert paths.replace_if(f, "five", v3) is False and paths.read_versioned(f) is None
  assert [n for n in paths.listdir(root) if n.endswith(".tmp")] == []
