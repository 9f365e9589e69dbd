"""Multi-process runs through the real CLI: 2 processes on localhost, 4 simulated CPU devices each, gloo
collectives, against the same job in 1 process with 8 devices.

Each test starts `python -m collapse_jax.main --jax_distributed --coordinator_address=127.0.0.1:PORT
--num_processes=2 --process_id=i ...` twice (the 1-process reference runs beside them) and checks:
  * metrics.jsonl equals the 1-process run's: exactly for the GMM (chains are computed per device and the stats
    over chains are taken after an all-gather, so no arithmetic depends on the process layout); for the VAE and
    the LM to a tolerance, since their batch means and gradients are all-reduced over the 8 devices and gloo
    adds the partial sums in another order than the in-process CPU collectives (measured: 1e-7 relative at
    generation 0, growing to ~1e-4 after training on the previous generation's samples);
  * checkpoints are written once: the same steps as the reference, each one save holding both processes' shards
    (Orbax's ocdbt.process_0 and ocdbt.process_1), and, for the GMM, restoring to the reference's arrays;
  * host-side files (config.json, metrics.jsonl, plots/, samples/) are written by process 0 only. Every process
    runs with a spy (a sitecustomize.py put first on its PYTHONPATH) that logs each path Python opens for
    writing, renames to or creates; process 1's log may hold nothing in the workdir outside checkpoints/ but its
    own write probe, and process 0's log must hold those files (so the spy is known to see them);
  * GMM: SIGKILL of process 1 after two checkpoints, then of process 0 (left without its peer it would hang or
    die), its newest checkpoint corrupted, and a restart of both: they set the corrupt step aside together and
    resume from the one before, ending exactly equal to the 1-process run.

Runtime on 2 cores: the 2-process LM dominates (gloo collectives in every decoding step); the module is slow.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from collapse_jax.metrics import read_jsonl
from tests.helpers import REPO, cli, corrupt_checkpoint

pytestmark = pytest.mark.slow

TIMEOUT = 600

# Logs every path this interpreter opens for writing, renames onto, or creates as a directory.
_SPY = '''
import builtins, io, os
_log_path = os.environ.get("COLLAPSE_WRITE_LOG")
if _log_path:
  _open, _replace, _rename, _mkdir = builtins.open, os.replace, os.rename, os.mkdir
  _log = _open(_log_path, "a", buffering=1)

  def _rec(op, path):
    if isinstance(path, (str, bytes, os.PathLike)):
      _log.write(op + "\\t" + os.path.abspath(os.fsdecode(path)) + "\\n")

  def open(file, mode="r", *a, **k):
    if any(c in mode for c in "wax+"):
      _rec("open", file)
    return _open(file, mode, *a, **k)

  def replace(src, dst, *a, **k):
    _rec("replace", dst)
    return _replace(src, dst, *a, **k)

  def rename(src, dst, *a, **k):
    _rec("rename", dst)
    return _rename(src, dst, *a, **k)

  def mkdir(path, *a, **k):
    _rec("mkdir", path)
    return _mkdir(path, *a, **k)

  builtins.open = io.open = open
  os.replace, os.rename, os.mkdir = replace, rename, mkdir
'''


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class _Job:
  """The CLI in `n` processes (4 simulated CPU devices each) with a fresh coordinator port; output and the spy's
  write logs go to files beside the workdir (`<workdir>.<launch>.out<i>`, `<workdir>.<launch>.writes<i>`)."""

  def __init__(self, tmp_path, workdir, args, launch: str, n: int = 2):
    spy = tmp_path / "spy"
    spy.mkdir(exist_ok=True)
    (spy / "sitecustomize.py").write_text(_SPY)
    port = _free_port()
    self.outs = [f"{workdir}.{launch}.out{i}" for i in range(n)]
    self.writes = [f"{workdir}.{launch}.writes{i}" for i in range(n)]
    self.procs = []
    for i in range(n):
      env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
                 PYTHONPATH=os.pathsep.join([str(spy), REPO, os.environ.get("PYTHONPATH", "")]),
                 PYTHONUNBUFFERED="1", COLLAPSE_WRITE_LOG=self.writes[i])
      cmd = [sys.executable, "-m", "collapse_jax.main", "--jax_distributed", f"--coordinator_address=127.0.0.1:{port}",
             f"--num_processes={n}", f"--process_id={i}", f"--workdir={workdir}", *args]
      with open(self.outs[i], "w") as out:  # a file, not a pipe: gloo's chatter must never block a process
        self.procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT))

  def output(self, i: int) -> str:
    with open(self.outs[i]) as fh:
      return fh.read()

  def tails(self) -> str:
    return "\n".join(f"--- process {i} (rc {p.returncode}) ---\n" + "\n".join(
        l for l in self.output(i).splitlines() if "Gloo" not in l)[-3000:] for i, p in enumerate(self.procs))

  def kill(self) -> None:
    for p in self.procs:
      if p.poll() is None:
        p.kill()
        p.wait()

  def wait(self, timeout: float = TIMEOUT) -> None:
    """Until every process ends; one that fails ends the others at once (left alone they would wait for it in
    a collective or the coordination service's shutdown barrier for minutes)."""
    deadline = time.time() + timeout
    while any(p.poll() is None for p in self.procs):
      if time.time() > deadline:
        self.kill()
        pytest.fail(f"the 2-process run did not finish in {timeout:.0f} s\n{self.tails()}")
      if any(p.returncode not in (None, 0) for p in self.procs):
        self.kill()
        break
      time.sleep(0.1)
    assert all(p.returncode == 0 for p in self.procs), self.tails()

  def written(self, i: int, workdir) -> set[str]:
    """Paths under `workdir`, relative to it, that process i opened for writing, renamed onto or created."""
    root = os.path.abspath(workdir)
    if not os.path.exists(self.writes[i]):
      return set()
    with open(self.writes[i]) as fh:
      paths = [line.rstrip("\n").split("\t", 1)[1] for line in fh if "\t" in line]
    return {os.path.relpath(p, root) for p in paths if p == root or p.startswith(root + os.sep)}


def _reference(tmp_path, args):
  """The same job in 1 process with 8 devices, started in the background (it runs beside the 2-process one)."""
  return cli(*args, f"--workdir={tmp_path / 'ref'}", devices=8, background=True)


def _finish(ref):
  out, _ = ref.communicate(timeout=TIMEOUT)
  assert ref.returncode == 0, out


def _host_side(paths: set[str]) -> set[str]:
  """Paths other than checkpoints/ and the process's own write probe (config.check_workdir)."""
  return {p for p in paths if p != "." and not p.startswith("checkpoints") and not p.startswith(".write_probe-")}


def _check_writers(jobs, workdir, expected: set[str]) -> None:
  p0 = set().union(*(j.written(0, workdir) for j in jobs))
  p1 = set().union(*(j.written(1, workdir) for j in jobs))
  assert expected <= p0, f"the spy did not see process 0 write {sorted(expected - p0)}"
  assert not _host_side(p1), f"process 1 wrote host-side files: {sorted(_host_side(p1))}"
  assert any(p.startswith(".write_probe-") for p in p1), "the spy saw nothing of process 1"


def _steps(workdir) -> list[int]:
  return sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())


def _check_checkpoints(workdir, ref_dir, every_step: bool = True) -> None:
  """The same steps as the reference run (or, where saves may be skipped by timing, the same last step), each
  written once with both processes' shards, no temporary directory left."""
  if every_step:
    assert _steps(workdir) == _steps(ref_dir)
  assert _steps(workdir)[-1] == _steps(ref_dir)[-1]
  for s in _steps(workdir):
    d = os.path.join(workdir, "checkpoints", str(s), "default")
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(d)), (s, os.listdir(d))
  leftovers = [n for n in os.listdir(os.path.join(workdir, "checkpoints")) if "tmp" in n]
  assert not leftovers, leftovers


def _restore_numpy(step_dir):
  """A checkpoint's arrays as numpy, whatever mesh and processes wrote it."""
  import jax
  import orbax.checkpoint as ocp
  ck = ocp.PyTreeCheckpointer()
  meta = ck.metadata(step_dir)
  meta = getattr(getattr(meta, "item_metadata", meta), "tree", getattr(meta, "item_metadata", meta))
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
  return ck.restore(step_dir, args=ocp.args.PyTreeRestore(restore_args=args))


def _close(a: list[dict], b: list[dict], rtol: float, atol: float) -> None:
  assert len(a) == len(b) and a and [sorted(r) for r in a] == [sorted(r) for r in b]
  for g, (ra, rb) in enumerate(zip(a, b)):
    for k in ra:
      np.testing.assert_allclose(rb[k], ra[k], rtol=rtol, atol=atol, err_msg=f"generation {g} {k}")


def test_gmm_two_processes_killed_and_restarted_equal_one_process(tmp_path):
  # Many chains (16: 2 per device, 8 in each process), a checkpoint every 10 generations.
  args = ["--config=configs/gmm.py", "--config.chains=16", "--config.generations=50",
          "--config.checkpoint_every=10", "--config.checkpoint_min_seconds=0"]  # every chunk saved: steps compared
  ref = _reference(tmp_path, args)
  wd = tmp_path / "mp"
  first = _Job(tmp_path, wd, args, "first")
  deadline = time.time() + TIMEOUT
  while time.time() < deadline and all(p.poll() is None for p in first.procs):
    if (wd / "checkpoints").exists() and len(_steps(wd)) >= 2:
      break
    time.sleep(0.02)
  first.procs[1].send_signal(signal.SIGKILL)
  first.procs[1].wait()
  time.sleep(0.5)
  first.kill()  # process 0 without its peer hangs in the next collective, or dies
  assert first.procs[1].returncode == -signal.SIGKILL, first.tails()
  assert first.procs[0].returncode != 0, "the run finished before it could be killed\n" + first.tails()
  steps = _steps(wd)
  assert 2 <= len(steps) and steps[-1] < 50, steps
  corrupt_checkpoint(wd / "checkpoints" / str(steps[-1]))

  again = _Job(tmp_path, wd, args, "again")
  again.wait()
  for i in range(2):
    out = again.output(i)
    assert f"checkpoints/{steps[-1]} is unreadable" in out and f"resuming {wd} at generation {steps[-2]}/50" in out
  _finish(ref)

  # Exactly the 1-process, 8-device run's metrics, after a kill, a corrupt checkpoint and a restart.
  assert read_jsonl(str(wd / "metrics.jsonl")) == read_jsonl(str(tmp_path / "ref" / "metrics.jsonl"))
  assert os.path.isdir(wd / "checkpoints" / f"unreadable-{steps[-1]}")
  _check_checkpoints(wd, tmp_path / "ref")
  got, want = _restore_numpy(wd / "checkpoints" / "50" / "default"), _restore_numpy(
      tmp_path / "ref" / "checkpoints" / "50" / "default")
  import jax
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(b, a, err_msg=jax.tree_util.keystr(path))
  assert json.load(open(wd / "config.json")) == json.load(open(tmp_path / "ref" / "config.json"))
  _check_writers([first, again], wd, {"config.json", "metrics.jsonl", "plots/gmm_metrics.png",
                                       "plots/gmm_snapshots.png"})


@pytest.mark.parametrize("family", ["vae", "lm"])
def test_vae_and_lm_two_processes_equal_one_process(tmp_path, family):
  if family == "vae":  # the quick config: 64 images, batches of 32 split over the 8 devices, 2 generations
    args, expected = ["--config=configs/vae.py:quick", "--config.plots=False"], {"config.json", "metrics.jsonl"}
  else:  # the tiny LM, 3 generations (the middle chunk's save is decided by process 0 for both: loop._save_due)
    args = ["--config=configs/lm.py:ci", "--config.generations=3"]
    expected = {"config.json", "metrics.jsonl", "samples/gen_0000.txt", "samples/gen_0001.txt",
                "samples/gen_0002.txt", "plots/lm_metrics.png"}
  ref = _reference(tmp_path, args)
  wd = tmp_path / "mp"
  job = _Job(tmp_path, wd, args, "run")
  job.wait()
  _finish(ref)
  # Batch reductions (losses, gradients) are all-reduced in another order by gloo: see the module docstring.
  _close(read_jsonl(str(tmp_path / "ref" / "metrics.jsonl")), read_jsonl(str(wd / "metrics.jsonl")),
         rtol=1e-3, atol=1e-6)
  _check_checkpoints(wd, tmp_path / "ref", every_step=False)  # default checkpoint_min_seconds: saves by timing
  _check_writers([job], wd, expected)
  if family == "lm":  # the decoded tokens are the same, so the text samples are too
    for name in ("gen_0000.txt", "gen_0001.txt", "gen_0002.txt"):
      assert (wd / "samples" / name).read_text() == (tmp_path / "ref" / "samples" / name).read_text()
