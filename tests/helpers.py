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
