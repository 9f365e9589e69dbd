"""Shared test helpers: load a config file as the CLI does, and run the CLI in a subprocess."""
import importlib.util
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str, arg: str | None = None, **overrides):
  spec = importlib.util.spec_from_file_location(f"cfg_{name}", os.path.join(REPO, "configs", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  cfg = mod.get_config(arg) if arg is not None else mod.get_config()
  # One device unless a test asks for more: 8 simulated devices on 2 cores only add thread contention.
  cfg.num_devices = 1
  for path, value in overrides.items():
    node = cfg
    *parents, leaf = path.split("__")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return cfg


def cli(*args, devices: int = 1, timeout: float = 600, **popen):
  """The CLI in a fresh interpreter with `devices` simulated CPU devices."""
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")
  cmd = [sys.executable, "-m", "collapse_jax.main", *args]
  if popen.pop("background", False):
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
