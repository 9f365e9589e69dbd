"""Published peaks of the devices the project runs on, and the host CPU's, for MFU and bandwidth figures.

One table for every consumer (the trainer's MFU, the benchmark suite). Accelerator figures are the vendors' dense
(no sparsity) peaks per chip; a CPU's peak is derived from its cores, clock and vector ISA, since no table can list
every CPU: cores x clock x FLOPs per cycle per core, where a core with two FMA pipes of W float32 lanes does
2 pipes x W lanes x 2 FLOPs (multiply + add) per cycle.
"""
from __future__ import annotations

import dataclasses
import os
import re


@dataclasses.dataclass(frozen=True)
class Peak:
  name: str
  bf16_flops: float              # dense matmul FLOP/s per chip at bfloat16
  fp32_flops: float | None       # dense FLOP/s at float32 (None where the vendor publishes none)
  hbm_bytes_per_s: float | None  # memory bandwidth per chip (None: unknown, e.g. a CPU's)
  hbm_bytes: float | None        # memory per chip

  def flops(self, dtype: str) -> float | None:
    return self.bf16_flops if dtype in ("bfloat16", "bf16") else self.fp32_flops


T, G = 1e12, 1e9
# (pattern matched against jax's device_kind, case-insensitive) -> peak. Order matters: first match wins
# ("TPU v5 lite" before "TPU v5"). Sources: NVIDIA's H100/H200/A100/L4 data sheets (SXM parts; fp32 is the
# non-tensor-core rate), Google Cloud's TPU system-architecture pages.
ACCELERATORS: tuple[tuple[str, Peak], ...] = (
    (r"h200", Peak("NVIDIA H200", 989 * T, 67 * T, 4800 * G, 141 * G)),
    (r"h100", Peak("NVIDIA H100 SXM", 989 * T, 67 * T, 3350 * G, 80 * G)),
    (r"a100", Peak("NVIDIA A100 SXM 80GB", 312 * T, 19.5 * T, 2039 * G, 80 * G)),
    (r"\bl4\b", Peak("NVIDIA L4", 121 * T, 30.3 * T, 300 * G, 24 * G)),
    (r"tpu v4", Peak("TPU v4", 275 * T, None, 1200 * G, 32 * 2**30)),
    (r"tpu v5 ?(lite|e)", Peak("TPU v5e", 197 * T, None, 819 * G, 16 * 2**30)),
    (r"tpu v5", Peak("TPU v5p", 459 * T, None, 2765 * G, 95 * 2**30)),
    (r"tpu v6", Peak("TPU v6e", 918 * T, None, 1640 * G, 32 * 2**30)),
)


def accelerator_peak(device_kind: str) -> Peak | None:
  for pattern, peak in ACCELERATORS:
    if re.search(pattern, device_kind, re.IGNORECASE):
      return peak
  return None


def _cpuinfo() -> dict:
  """The first processor's fields of /proc/cpuinfo (empty where there is none, e.g. macOS)."""
  try:
    with open("/proc/cpuinfo") as f:
      text = f.read().split("\n\n")[0]
  except OSError:
    return {}
  return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in text.splitlines()) if k.strip()}


def cpu() -> dict:
  """The host CPU: model, vendor, ISA, cores this process may use, clock, and its derived float32 / bf16 peaks."""
  info = _cpuinfo()
  flags = set(info.get("flags", "").split())
  isa = "avx512" if "avx512f" in flags else "avx2" if {"avx2", "fma"} <= flags else "sse" if flags else "unknown"
  vendor = info.get("vendor_id", "")
  family = int(info.get("cpu family", "0") or 0)
  # float32 FLOPs per cycle per core, two FMA pipes assumed (server parts have two; a one-pipe Xeon Silver makes
  # this an upper bound). AMD Zen 4 (family 25) runs AVX-512 on 256-bit pipes: the AVX2 rate; Zen 5 (26) is full width.
  lanes = {"avx512": 16, "avx2": 8, "sse": 4}.get(isa, 4)
  if isa == "avx512" and vendor == "AuthenticAMD" and family < 26:
    lanes = 8
  per_cycle = 2 * lanes * 2
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
  mhz = float(info.get("cpu MHz", "0") or 0)
  try:  # the rated maximum where the kernel exposes it; VMs often do not, and "cpu MHz" is then the clock
    with open("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq") as f:
      mhz = max(mhz, int(f.read()) / 1000)
  except (OSError, ValueError):
    pass
  fp32 = cores * mhz * 1e6 * per_cycle if mhz else None
  # AVX512_BF16's dot products do twice the float32 lanes' multiply-adds per instruction.
  bf16 = fp32 * 2 if fp32 and "avx512_bf16" in flags else fp32
  return {"model": info.get("model name", "unknown"), "vendor": vendor or "unknown", "isa": isa,
          "isa_extras": sorted(flags & {"avx512_bf16", "avx512_vnni", "avx_vnni", "amx_tile", "amx_bf16"}),
          "cores": cores, "mhz": round(mhz), "fp32_flops_per_cycle_per_core": per_cycle,
          "fp32_peak_flops": fp32, "bf16_peak_flops": bf16}


def peak(device) -> Peak | None:
  """The peak of one jax device: an accelerator from the table, a CPU device from the host's derivation (all the
  cores serve the one CPU device, so its peak is the whole host's)."""
  if device.platform == "cpu":
    c = cpu()
    if not c["fp32_peak_flops"]:
      return None
    return Peak(f"{c['model']} ({c['cores']} cores, {c['isa']})", c["bf16_peak_flops"], c["fp32_peak_flops"],
                None, None)
  return accelerator_peak(getattr(device, "device_kind", ""))


def total_flops(devices, dtype: str) -> float | None:
  """Peak FLOP/s of a set of devices at `dtype`: accelerators add up; CPU devices (simulated ones share the
  host's cores) count once, as the host."""
  devices = list(devices)
  if devices[0].platform == "cpu":
    p = peak(devices[0])
    return p.flops(dtype) if p else None
  peaks = [peak(d) for d in devices]
  if any(p is None or p.flops(dtype) is None for p in peaks):
    return None
  return sum(p.flops(dtype) for p in peaks)


def limit_cpu_threads(n: int) -> None:
  """Runs XLA:CPU's compute on n of this process's cores; 0 (or n >= the cores there are): all of them.

  JAX sizes and places its CPU compute threads by the process's CPU affinity when it creates its clients, and the
  affinity is the supported way to limit them (jax-ml/jax#1539): narrowed for that moment, the compute threads
  stay on n cores, and the restored affinity leaves every core to the rest of the process (Orbax's writer, data
  loading, a benchmark's peer). Why: a program of many tiny ops (the GMM's EM loop: ~30 kernels of a few
  microseconds per iteration) spends more on splitting each kernel over threads than it gains (benchmarks/
  profiles/gmm_profile.py: half the CPU time on one core). Results are unchanged (tests/test_hardware.py).
  Must run before anything creates a JAX backend.
  """
  from jax._src import xla_bridge
  cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_setaffinity") else []
  if n <= 0 or n >= len(cpus):
    return
  if xla_bridge.backends_are_initialized():
    raise RuntimeError("limit_cpu_threads must run before JAX creates its backends (no jax.devices() before it)")
  os.sched_setaffinity(0, cpus[:n])
  try:
    import jax
    jax.devices()
  finally:
    os.sched_setaffinity(0, cpus)
