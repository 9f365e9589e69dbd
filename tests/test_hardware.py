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
