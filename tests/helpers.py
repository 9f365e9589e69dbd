"""Shared test helpers: configs as the CLI builds them, and the CLI in a subprocess."""
import os
import subprocess
import sys

from collapse_jax import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str, arg: str | None = None, **overrides):
  # One device unless a test asks for more: 8 simulated devices on 2 cores only add thread contention.
  return config_lib.load(name, arg, **{"num_devices": 1, **overrides})


def cli(*args, devices: int = 1, timeout: float = 600, **popen):
  """The CLI in a fresh interpreter with `devices` simulated CPU devices."""
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")
  cmd = [sys.executable, "-m", "collapse_jax.main", *args]
  if popen.pop("background", False):
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def sigkill_then_resume(tmp_path, args, min_checkpoints: int = 1, timeout: float = 300):
  """Run the CLI uninterrupted, and again killed by SIGKILL once `min_checkpoints` checkpoints exist, then
  resumed on the same workdir. Returns (uninterrupted metrics rows, resumed rows, rows written when killed)."""
  import signal
  import time
  from collapse_jax.metrics import read_jsonl
  ref = cli(*args, f"--workdir={tmp_path / 'ref'}")
  assert ref.returncode == 0, ref.stdout + ref.stderr
  wd = tmp_path / "killed"
  proc = cli(*args, f"--workdir={wd}", background=True)
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    ck = wd / "checkpoints"
    if ck.exists() and len([s for s in os.listdir(ck) if s.isdigit()]) >= min_checkpoints:
      break
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
  # metrics.jsonl may be behind the checkpoints, ahead of them (appended while a save was in flight) or end in
  # a line torn by the kill: count its complete lines; the resumed run must have repaired all of that.
  done = (wd / "metrics.jsonl").read_text().count("\n") if (wd / "metrics.jsonl").exists() else 0
  again = cli(*args, f"--workdir={wd}")
  assert again.returncode == 0, again.stdout + again.stderr
  assert "resuming" in again.stdout
  # Byte for byte, not only row for row: no torn, duplicated or missing line survives the resume.
  assert (wd / "metrics.jsonl").read_bytes() == (tmp_path / "ref" / "metrics.jsonl").read_bytes()
  return read_jsonl(str(tmp_path / "ref" / "metrics.jsonl")), read_jsonl(str(wd / "metrics.jsonl")), done


def refused_before_compilation(tmp_path, monkeypatch, cfg, match):
  """loop.run refuses `cfg` with a ConfigError matching `match` before anything is jitted or checkpointed."""
  import jax
  import pytest
  from collapse_jax import loop
  from collapse_jax.config import ConfigError

  def no_compile(*a, **k):
    raise AssertionError("compiled before validating")

  monkeypatch.setattr(jax, "jit", no_compile)
  with pytest.raises(ConfigError, match=match):
    loop.run(cfg, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


def corrupt_checkpoint(step_dir) -> None:
  """Overwrite every file of an Orbax step with junk of the same size (a disk-level corruption)."""
  for root, _, files in os.walk(step_dir):
    for f in files:
      p = os.path.join(root, f)
      size = os.path.getsize(p)
      with open(p, "wb") as fh:
        fh.write(b"\x00garbage" * (size // 8 + 1))
