"""The peak table and the host CPU's derived peak (collapse_jax/hardware.py)."""
import jax
import pytest

from collapse_jax import hardware


@pytest.mark.parametrize("kind,name", [
    ("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM"), ("NVIDIA H200", "NVIDIA H200"),
    ("NVIDIA A100-SXM4-80GB", "NVIDIA A100 SXM 80GB"), ("NVIDIA L4", "NVIDIA L4"), ("TPU v4", "TPU v4"),
    ("TPU v5 lite", "TPU v5e"), ("TPU v5e", "TPU v5e"), ("TPU v5", "TPU v5p"), ("TPU v5p", "TPU v5p"),
    ("TPU v6 lite", "TPU v6e"), ("TPU v6e", "TPU v6e")])
def test_accelerator_kinds_map_to_their_peaks(kind, name):
  # jax's device_kind strings; "TPU v5 lite" must not fall through to v5p (the table's order matters).
  assert hardware.accelerator_peak(kind).name == name


def test_unknown_accelerator_has_no_peak():
  assert hardware.accelerator_peak("NVIDIA GeForce GTX 1080") is None
  assert hardware.accelerator_peak("TPU v3") is None


def test_published_figures():
  h100 = hardware.accelerator_peak("NVIDIA H100 80GB HBM3")
  assert h100.bf16_flops == 989e12 and h100.hbm_bytes_per_s == 3.35e12 and h100.flops("bfloat16") == 989e12
  assert h100.flops("float32") == 67e12
  assert hardware.accelerator_peak("TPU v5 lite").bf16_flops == 197e12
  assert hardware.accelerator_peak("TPU v6 lite").hbm_bytes_per_s == 1.64e12


CPUINFO = """processor\t: 0
vendor_id\t: {vendor}
cpu family\t: {family}
model name\t: Test CPU
cpu MHz\t\t: 2000.000
flags\t\t: fpu sse sse2 {flags}

processor\t: 1
"""


@pytest.mark.parametrize("vendor,family,flags,isa,per_cycle,bf16_factor", [
    ("GenuineIntel", 6, "avx avx2 fma avx512f avx512_bf16", "avx512", 64, 2),   # two 512-bit FMA pipes
    ("GenuineIntel", 6, "avx avx2 fma", "avx2", 32, 1),
    ("AuthenticAMD", 25, "avx avx2 fma avx512f", "avx512", 32, 1),            # Zen 4: 512-bit ops on 256-bit pipes
    ("AuthenticAMD", 26, "avx avx2 fma avx512f", "avx512", 64, 1),            # Zen 5: full width
    ("GenuineIntel", 6, "", "sse", 16, 1),
])
def test_cpu_peak_from_cores_clock_and_isa(monkeypatch, tmp_path, vendor, family, flags, isa, per_cycle,
                                           bf16_factor):
  text = CPUINFO.format(vendor=vendor, family=family, flags=flags)
  monkeypatch.setattr(hardware, "_cpuinfo", lambda: {
      k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in text.split("\n\n")[0].splitlines())})
  monkeypatch.setattr(hardware.os, "sched_getaffinity", lambda _: {0, 1, 2}, raising=False)
  c = hardware.cpu()
  assert (c["isa"], c["cores"], c["fp32_flops_per_cycle_per_core"]) == (isa, 3, per_cycle)
  # cores x clock (the cpufreq maximum may raise it on a real host; this fake has only "cpu MHz") x FLOPs/cycle
  assert c["fp32_peak_flops"] >= 3 * 2.0e9 * per_cycle
  assert c["bf16_peak_flops"] == bf16_factor * c["fp32_peak_flops"]


def test_total_flops_counts_simulated_cpu_devices_once():
  devs = jax.devices()  # 8 simulated CPU devices share the host's cores
  one = hardware.total_flops(devs[:1], "float32")
  assert one is None or hardware.total_flops(devs, "float32") == one


def test_limit_cpu_threads_needs_a_fresh_process():
  jax.devices()  # this test process's backends exist already
  with pytest.raises(RuntimeError, match="before JAX creates its backends"):
    hardware.limit_cpu_threads(1)
  hardware.limit_cpu_threads(0)  # 0: nothing to do, allowed at any time


PIN_CHILD = """
import glob, os
from collapse_jax import hardware
hardware.limit_cpu_threads(1)
import jax, jax.numpy as jnp
x = jnp.ones((512, 512)); (x @ x).block_until_ready()
allowed = {}
for t in glob.glob("/proc/self/task/*"):
  name = open(t + "/comm").read().strip()
  cpus = [l.split(":")[1].strip() for l in open(t + "/status") if l.startswith("Cpus_allowed_list")][0]
  allowed.setdefault(name, set()).add(cpus)
main = [l.split(":")[1].strip() for l in open(f"/proc/self/task/{os.getpid()}/status")
        if l.startswith("Cpus_allowed_list")][0]
print(repr((sorted(os.sched_getaffinity(0)), main, allowed)))
"""


@pytest.mark.skipif(not hasattr(hardware.os, "sched_setaffinity") or len(hardware.os.sched_getaffinity(0)) < 2,
                    reason="needs Linux and two cores")
def test_limit_cpu_threads_pins_xla_compute_only(repo):
  import ast
  import subprocess
  import sys
  r = subprocess.run([sys.executable, "-c", PIN_CHILD], cwd=repo, capture_output=True, text=True, timeout=120,
                     env=dict(hardware.os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu"))
  assert r.returncode == 0, r.stderr[-2000:]
  main_cpus, main_allowed, allowed = ast.literal_eval(r.stdout.strip().splitlines()[-1])
  assert len(main_cpus) >= 2 and main_allowed != str(min(main_cpus))  # the main thread keeps every core
  assert allowed.get("tf_XLAEigen") == {str(min(main_cpus))}, allowed  # XLA's compute threads: one core


@pytest.mark.slow
def test_cpu_threads_flag_changes_no_result(tmp_path):
  from tests import helpers
  runs = {}
  for n in (0, 1):
    r = helpers.cli("--config=gmm:quick", f"--workdir={tmp_path / str(n)}", f"--cpu_threads={n}",
                    "--config.generations=60", "--config.checkpoint_every=20")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    runs[n] = (tmp_path / str(n) / "metrics.jsonl").read_text()
  assert runs[0] == runs[1] and runs[0].count("\n") == 60  # byte-identical metrics, one line per generation
