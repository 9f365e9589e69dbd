"""Mutants of the throughput tooling: the peak table, the CPU pinning, the benchmark methodology and the suite
(tests/test_hardware.py, tests/test_bench_suite.py)."""
from benchmarks.mutants import Mutant

HW, COMMON = "collapse_jax/hardware.py", "benchmarks/common.py"
_H, _B = "tests/test_hardware.py::", "tests/test_bench_suite.py::"

MUTANTS = [
    Mutant(name="bench_v5e_is_v5p", file=HW, old='(r"tpu v5 ?(lite|e)", ', new='(r"tpu v5 ?(xx)", ',
           tests=(f"{_H}test_accelerator_kinds_map_to_their_peaks",),
           why="TPU v5e ('TPU v5 lite') falls through to v5p's peak: MFU off by 2.3x"),
    Mutant(name="bench_zen4_full_width", file=HW, old='vendor == "AuthenticAMD" and family < 26',
           new='vendor == "AuthenticAMD" and family < 25',
           tests=(f"{_H}test_cpu_peak_from_cores_clock_and_isa",),
           why="Zen 4's double-pumped AVX-512 counted at full width: its CPU peak doubled"),
    Mutant(name="bench_pin_not_narrowed", file=HW, old="os.sched_setaffinity(0, cpus[:n])",
           new="os.sched_setaffinity(0, cpus)", tests=(f"{_H}test_limit_cpu_threads_pins_xla_compute_only",),
           why="--cpu_threads has no effect"),
    Mutant(name="bench_pin_not_restored", file=HW, old="  finally:\n    os.sched_setaffinity(0, cpus)\n",
           new="  finally:\n    pass\n", tests=(f"{_H}test_limit_cpu_threads_pins_xla_compute_only",),
           why="the whole process, not just XLA's compute, stays on one core"),
    Mutant(name="bench_own_cpu_counted_as_load", file=COMMON,
           old="return max(0.0, ((b1 - b0) - (s1 - s0)) / (t1 - t0))", new="return max(0.0, (b1 - b0) / (t1 - t0))",
           tests=(f"{_B}test_own_work_is_not_counted_as_load",),
           why="the benchmark's own earlier work makes the machine look loaded"),
    Mutant(name="bench_others_not_seen", file=COMMON,
           old="return max(0.0, ((b1 - b0) - (s1 - s0)) / (t1 - t0))", new="return 0.0",
           tests=(f"{_B}test_quiet_check_sees_a_busy_process",),
           why="a loaded machine passes the quiet check"),
    Mutant(name="bench_loaded_not_refused", file=COMMON, old="    if not args.allow_loaded:\n",
           new="    if False:\n", tests=(f"{_B}test_loaded_machine_is_refused_or_marked",),
           why="a loaded machine is measured without refusal"),
    Mutant(name="bench_rounds_not_alternating", file=COMMON,
           old="for name in (names if r % 2 == 0 else names[::-1]):", new="for name in names:",
           tests=(f"{_B}test_rounds_alternate_and_ratio_is_median_of_round_rates",),
           why="JAX always runs first: drift within a round favours one side"),
    Mutant(name="bench_ratio_ignores_work", file=COMMON, old="r = [(jax_work / j) / (peer_work / p)",
           new="r = [(1 / j) / (1 / p)", tests=(f"{_B}test_rounds_alternate_and_ratio_is_median_of_round_rates",),
           why="decoding's JAX and HF calls differ in size: the ratio compares calls, not rates"),
]
