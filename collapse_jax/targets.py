"""Compile targets for plan mode (plan.py): a Cloud TPU slice or topology (compile-only devices from libtpu, no
TPU needed), the local devices, or an H100/H200 estimated from the CPU compilation; and `compile_for`, which compiles
a lowered program for one of them.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re

import jax

from collapse_jax import hardware
from collapse_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Target:
  name: str                 # as given, e.g. "v5p-64"
  topology: str | None      # the get_topology_desc name, e.g. "v5p:2x4x4"; None for "local"
  devices: list             # one jax device per chip (flat)
  chips: int
  peak: hardware.Peak       # per chip
  platform: str             # "tpu", "gpu", "cpu"


# Cloud's slice names count TensorCores for v4 and v5p (2 per chip, run as one "megacore" device), chips for the
# lite generations v5e and v6e. 3-D tori for v4/v5p, 2-D for v5e/v6e.
_GENERATIONS = {"v4": (2, 3), "v5p": (2, 3), "v5e": (1, 2), "v5litepod": (1, 2), "v6e": (1, 2)}


def _torus(chips: int, ndim: int, name: str = "") -> str:
  """Cloud's default slice shape for a chip count: double the smallest side until the count is reached
  (v5p: 4 -> 2x2x1, 32 -> 2x4x4; v5e: 8 -> 2x4, 256 -> 16x16)."""
  if chips < 1 or chips & (chips - 1):
    raise ConfigError(f"--plan={name!r}: a TPU slice has a power-of-two number of chips, got {chips}")
  dims = [1] * ndim
  while math.prod(dims) < chips:
    dims[dims.index(min(dims))] *= 2
  dims.sort()
  return "x".join(str(d) for d in [d for d in dims if d > 1] + [d for d in dims if d == 1])


def _host_memory() -> float | None:
  try:
    return float(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
  except (ValueError, OSError, AttributeError):
    return None


def _local() -> Target:
  devices = jax.devices()
  d = devices[0]
  p = hardware.peak(d)
  if d.platform == "cpu":
    # Simulated CPU devices share the host's cores and memory: each gets 1/n of the FLOPs (so chips x peak is the
    # host's) and may use all the memory (nothing is refused on a CPU: check_fits only reports).
    c = p or hardware.Peak("CPU", 0.0, 0.0, None, None)
    n = len(devices)
    p = hardware.Peak(c.name, c.bf16_flops / n, (c.fp32_flops or 0.0) / n, None, _host_memory())
  elif p is None:
    raise ConfigError(f"--plan=local: no peak figures for device kind {d.device_kind!r} (collapse_jax/hardware.py)")
  return Target("local", None, list(devices), len(devices), p, d.platform)


def target(name: str) -> Target:
  """"local", a Cloud slice name ("v5e-8", "v5p-64", "v6e-8", "v4-8"), a topology ("v5e:2x2", "v5e-16x16",
  "v5p:2x2x2"), or "h100" / "h200" (one GPU, estimated from a CPU compilation)."""
  if name == "local":
    return _local()
  if name.strip().lower() in ("h100", "h200"):
    # XLA cannot compile for a GPU it does not have: the program compiled for one CPU device, its figures read
    # against the GPU's published peaks (an estimate: XLA:GPU fuses and pads differently).
    peak = hardware.accelerator_peak(name)
    return Target(f"{name.lower()} (estimate from the CPU-compiled program)", None, jax.devices("cpu")[:1], 1, peak,
                  "gpu-estimate")
  m = re.fullmatch(r"(v4|v5e|v5p|v5litepod|v6e)[-:](\d+(?:x\d+)+|\d+)", name.strip().lower())
  if not m:
    raise ConfigError(f"--plan={name!r}: expected 'local', a TPU slice like v5e-8 / v5p-64 / v6e-8, or a topology "
                      f"like v5e:2x2 / v5e-16x16 / v5p:2x2x2")
  gen, size = m.groups()
  per_chip, ndim = _GENERATIONS[gen]
  gen = "v5e" if gen == "v5litepod" else gen
  if "x" in size:
    topo = size
    if len(topo.split("x")) != ndim:
      raise ConfigError(f"--plan={name!r}: a {gen} topology has {ndim} sides, e.g. {_torus(2**ndim, ndim)}")
  else:
    n = int(size)
    if n % per_chip:
      raise ConfigError(f"--plan={name!r}: {gen} slice names count TensorCores ({per_chip} per chip): use an even size")
    topo = _torus(n // per_chip, ndim, name)
  chips = math.prod(int(s) for s in topo.split("x"))
  if importlib.util.find_spec("libtpu") is None:
    raise ConfigError(f"--plan={name}: compiling for a TPU needs libtpu: pip install -e '.[tpu]'")
  from jax.experimental import topologies
  # libtpu takes a machine-wide lock (/tmp/libtpu_lockfile) when it loads, so a second process (another plan, a
  # test's subprocess) would fail; compile-only devices touch no TPU, so sharing is safe. Must be set before the
  # first load.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  # v4's default describes each TensorCore as a device; JAX's meshes want one device per chip ("megacore").
  kw = {"chip_config_name": "megacore"} if gen == "v4" else {}
  try:
    devices = list(topologies.get_topology_desc(topology_name=f"{gen}:{topo}", platform="tpu", **kw).devices)
  except Exception as e:  # libtpu's errors are long C++ messages: keep one line
    raise ConfigError(f"--plan={name}: libtpu cannot describe topology {gen}:{topo}: "
                      f"{' '.join(str(e).split())[:200]}") from None
  if len(devices) != chips:
    raise ConfigError(f"--plan={name}: topology {gen}:{topo} gave {len(devices)} devices for {chips} chips")
  p = hardware.accelerator_peak(devices[0].device_kind)
  if p is None:
    raise ConfigError(f"--plan={name}: no peak figures for {devices[0].device_kind!r} (collapse_jax/hardware.py)")
  return Target(name, f"{gen}:{topo}", devices, chips, p, "tpu")


# XLA:TPU turns a matmul fed by an all-gather or feeding a reduce-scatter into a windowed loop (collective matmul),
# whose body cost_analysis counts once: on 8 chips opt-125m's training step then reports ~0.88 of its FLOPs. The
# probes that cost a step are compiled without it (measured: 1.01 of 6N + attention); memory keeps the default.
_COUNTABLE = {"xla_tpu_enable_windowed_einsum_for_all_gather": False,
              "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False}


def compile_for(lowered, tgt: Target, costing: bool = False):
  """lowered.compile() for the target. On a TPU, XLA itself stops at a program that exceeds HBM (RESOURCE_EXHAUSTED,
  naming no buffer); xla_tpu_no_crash_on_oom makes it finish, so that check_fits can say what is large. Where a
  libtpu does not take that option, the OOM becomes a one-line ConfigError. costing: a program compiled only for
  its flops and bytes (no collective-matmul loops: _COUNTABLE)."""
  if tgt.platform == "tpu":
    options = {"xla_tpu_no_crash_on_oom": True, **(_COUNTABLE if costing else {})}
    try:
      return lowered.compile(compiler_options=options)
    except jax.errors.JaxRuntimeError as e:
      if "RESOURCE_EXHAUSTED" in str(e):
        raise ConfigError(f"does not fit {tgt.name}: {' '.join(str(e).split())[:300]}") from None
      if not any(k in str(e) for k in options):
        raise
  return lowered.compile()
