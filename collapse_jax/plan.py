"""Plan mode: compile a run's real programs ahead of time for a target (a Cloud TPU slice, or the local devices) and
report per-chip memory, XLA's FLOPs and bytes, and a roofline time per generation, without running anything.

TPU targets need no TPU: `jax.experimental.topologies.get_topology_desc` (libtpu) gives compile-only devices of any
topology on any machine. Parameters enter as abstract shapes (ShapeDtypeStructs with shardings), so no weights are
read. A run whose program does not fit a chip's HBM is refused before anything runs (check_fits).

Figures are per chip: XLA compiles one SPMD program per chip, and its memory_analysis / cost_analysis describe that
program. Two traps (issue 15): cost_analysis counts a while-loop (scan) body once, and on 8+ chips the windowed
collective matmuls are loops too; so per-step costs come from programs compiled for one step (`Step`), multiplied
by how many times a generation runs them, never from the whole chunk's count.
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
from typing import Callable, NamedTuple

import jax
import numpy as np

from collapse_jax import hardware
from collapse_jax.targets import Target, compile_for, target
from collapse_jax.errors import ConfigError

GiB = 2**30
PHASES = ("train", "decode", "eval")
DEFAULT_SUGGESTIONS = ("split the parameters over more chips (a larger fsdp or tensor axis)",
                       "turn on activation rematerialisation (remat)", "a smaller batch")


# --- what XLA says about one compiled program -----------------------------------------------------------------
def compile_stats(compiled) -> dict:
  """Per-chip bytes of a compiled program and XLA's cost figures.

  total = arguments + outputs - aliased + temporaries + generated code. Verified (tests/test_plan.py, v5e:2x2 and
  CPU): a donated argument whose buffer an output reuses is counted in both argument_size and output_size, and
  alias_size is that buffer's bytes once (f(a) -> a * 2 with a donated: alias = a's per-chip bytes; without
  donation alias = 0), so it is subtracted once. XLA's own peak_memory (TPU only; 0 on CPU) is reported beside:
  on v5e it adds ~1 MiB of the runtime's reserve to this sum.
  """
  m = compiled.memory_analysis()
  out = {"argument_bytes": int(m.argument_size_in_bytes), "output_bytes": int(m.output_size_in_bytes),
         "alias_bytes": int(m.alias_size_in_bytes), "temp_bytes": int(m.temp_size_in_bytes),
         "code_bytes": int(m.generated_code_size_in_bytes)}
  out["total_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
                        + out["code_bytes"])
  out["xla_peak_bytes"] = int(getattr(m, "peak_memory_in_bytes", 0) or 0)
  cost = compiled.cost_analysis()
  cost = (cost[0] if cost else {}) if isinstance(cost, (list, tuple)) else (cost or {})
  out["flops"] = float(cost.get("flops", 0.0))
  out["bytes_accessed"] = float(cost.get("bytes accessed", 0.0))
  return out


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
# `%name = f32[256,512]{1,0:T(8,128)S(1)} opcode(`: one array-shaped instruction (tuples start with '(').
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%(\S+)\s*=\s*(\w+)\[([\d,]*)\](\{[^}]*\})?\s+([\w-]+)\(")
_OP_NAME = re.compile(r'op_name="((?:[^"\\]|\\.)*)"')
# No buffer of their own (views, tuples' pieces).
# (copy-done is kept: its result is the copy's destination, e.g. an output moved out of VMEM.)
_NO_BUFFER = {"bitcast", "get-tuple-element", "tuple", "all-gather-done", "all-reduce-done",
              "collective-permute-done", "async-done"}


def biggest_buffers(compiled, k: int = 6) -> list[tuple[int, str, str]]:
  """The k largest per-chip HBM buffers of a compiled program as (bytes, shape, name), named by the JAX op or
  argument path that made them (HLO metadata op_name; arguments carry their pytree path, e.g. "carry['prev']").

  Read from the optimized HLO text: instructions of the entry computation and of loop bodies (not of fusions,
  whose intermediates live in registers/VMEM), arrays in memory space 0 (S(1) is the TPU's on-chip VMEM). One
  entry per (name, shape): a scan body's op appears once. An estimate of what buffer assignment holds, good for
  naming what is large.
  """
  text = compiled.as_text()
  fused = set(re.findall(r"calls=%([\w.\-]+)", text)) | set(re.findall(r"to_apply=%([\w.\-]+)", text))
  seen: dict[tuple[str, str], int] = {}
  skip = False
  for line in text.splitlines():
    head = re.match(r"^(?:ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$", line)
    if head and not line.startswith(" "):
      skip = head.group(1) in fused
      continue
    m = _INSTR.match(line)
    if skip or not m:
      continue
    name, dtype, dims, layout, opcode = m.groups()
    if opcode in _NO_BUFFER or dtype not in _DTYPE_BYTES or (layout and re.search(r"S\([1-9]", layout)):
      continue
    if opcode == "parameter" and "sharding=" not in line:  # a loop body's parameter: the carry's own buffers
      continue
    shape = f"{dtype}[{dims}]"
    n = _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    op = _OP_NAME.search(line)
    src = op.group(1).replace("\\'", "'") if op else f"%{name}"
    if opcode == "parameter":
      src = f"argument {src}"
    seen[(src, shape)] = max(seen.get((src, shape), 0), n)
  ranked = sorted(((n, shape, src) for (src, shape), n in seen.items()), reverse=True)
  return ranked[:k]


def roofline(flops: float, bytes_: float, peak: hardware.Peak, dtype: str = "bfloat16") -> tuple[float, str]:
  """Seconds one chip needs at best: compute-bound at the peak FLOP/s of `dtype` (TPUs publish bf16 only: their
  f32 matmuls run as bf16 passes, so bf16's rate is the bound) or memory-bound at the HBM bandwidth."""
  f = peak.flops(dtype) or peak.bf16_flops
  t_compute = flops / f if f else math.inf
  t_memory = bytes_ / peak.hbm_bytes_per_s if peak.hbm_bytes_per_s else 0.0
  return (t_compute, "compute") if t_compute >= t_memory else (t_memory, "memory")


# --- per-step programs -------------------------------------------------------------------------------------
class Step(NamedTuple):
  name: str
  phase: str                   # one of PHASES
  fn: Callable                 # a jitted function
  args: tuple                  # abstract args: ShapeDtypeStructs with shardings
  count: int                   # how many times one generation runs it
  model_flops: float | None    # textbook FLOPs of one call (all chips), for MFU
  # A model whose layers run as a scan has its layer counted once by XLA: ((fn, args) with 1 layer, the same with
  # 2 layers, both unrolled; the real layer count): flops and bytes are extrapolated linearly in depth.
  probes: tuple | None = None


def _costs(step: Step, tgt: Target, st: dict | None = None) -> tuple[dict, float, float]:
  """(memory stats of the real program, its flops, bytes): from the probes where the step has them. `st`: the
  real program's stats if already compiled."""
  st = st or compile_stats(compile_for(step.fn.lower(*step.args), tgt))
  if step.probes is None:
    cost = compile_stats(compile_for(step.fn.lower(*step.args), tgt, costing=True)) if tgt.platform == "tpu" else st
    return st, cost["flops"], cost["bytes_accessed"]
  (f1, a1), (f2, a2), layers = step.probes
  one, two = (compile_stats(compile_for(f.lower(*a), tgt, costing=True)) for f, a in ((f1, a1), (f2, a2)))
  flops, nbytes = ((one[k] + (layers - 1) * (two[k] - one[k])) for k in ("flops", "bytes_accessed"))
  return st, flops, nbytes


def step_memory(steps: list[Step], tgt: Target) -> list[dict]:
  """compile_stats of each step's real program (memory first: a survey skips the probes of what cannot fit)."""
  return [compile_stats(compile_for(s.fn.lower(*s.args), tgt)) for s in steps]


def step_costs(steps: list[Step], tgt: Target, dtype: str = "bfloat16", memory: list | None = None) -> dict:
  """Each step compiled alone (a scan body would be counted once in the chunk's cost_analysis), its per-chip
  flops and bytes times its count, summed per phase; roofline minutes per generation and the MFU it implies."""
  rows, phases = [], {}
  for s in steps:
    if s.phase not in PHASES:
      raise ValueError(f"step {s.name!r}: phase {s.phase!r} is not one of {PHASES}")
    st, flops, nbytes = _costs(s, tgt, memory[steps.index(s)] if memory else None)
    t, bound = roofline(flops, nbytes, tgt.peak, dtype)
    rows.append({"name": s.name, "phase": s.phase, "count": s.count, "flops": flops, "bytes_accessed": nbytes,
                 "seconds": t, "bound": bound, "model_flops": s.model_flops, "memory": st})
    p = phases.setdefault(s.phase, {"flops": 0.0, "bytes_accessed": 0.0, "seconds": 0.0, "model_flops": 0.0,
                                    "steps_counted": 0, "model_flops_known": True})
    p["flops"] += flops * s.count
    p["bytes_accessed"] += nbytes * s.count
    p["seconds"] += t * s.count  # each step's own bound: a memory-bound decode step is not hidden by training
    p["steps_counted"] += s.count
    if s.model_flops is None:
      p["model_flops_known"] = False
    else:
      p["model_flops"] += s.model_flops * s.count
  peak_flops = tgt.peak.flops(dtype) or tgt.peak.bf16_flops
  for p in phases.values():
    p["minutes"] = p["seconds"] / 60
    p["mfu"] = (p["model_flops"] / (p["seconds"] * tgt.chips * peak_flops)
                if p["model_flops_known"] and p["seconds"] > 0 and peak_flops else None)
  return {"note": "per-step figures from programs compiled for one step (XLA's cost_analysis counts a "
                  "while/scan body once), times the steps one generation runs; a scanned model's flops and bytes "
                  "from 1- and 2-layer unrolled copies, extrapolated to its depth", "steps": rows, "phases": phases}


# --- fitting ---------------------------------------------------------------------------------------------
def check_fits(stats: dict, tgt: Target, suggestions=None, buffers=None) -> str:
  """A one-line verdict; raises ConfigError when the program's per-chip total exceeds the chip's HBM (CPU targets
  are reported, never refused: host memory is shared and swappable)."""
  hbm = tgt.peak.hbm_bytes
  total = stats["total_bytes"]
  if hbm is None:
    return f"{total / GiB:.2f} GiB per device (no memory figure for {tgt.peak.name})"
  verdict = f"{total / GiB:.2f} GiB per chip of {hbm / GiB:.1f} GiB ({100 * total / hbm:.0f}%)"
  if total <= hbm or tgt.platform == "cpu":
    return verdict + ("" if total <= hbm else ": more than the host's memory")
  big = ", ".join(f"{n / GiB:.2f} GiB {shape} {src}" for n, shape, src in (buffers or [])[:5])
  helps = "; ".join(suggestions or DEFAULT_SUGGESTIONS)
  raise ConfigError(f"does not fit {tgt.name} ({tgt.peak.name}): {verdict}; biggest buffers: {big or 'unknown'}; "
                    f"would help: {helps}")


# --- the plan of a run ----------------------------------------------------------------------------------
def run(cfg, target_name: str, out_path: str | None = None, workdir: str | None = None,
        dtype: str | None = None, whole: bool = True) -> dict:
  """Compile the run's generation chunk (and the family's per-step programs, where it has them) for the target;
  print a short report, write it as JSON (out_path; else <workdir>/plan.json with a workdir; else stdout only),
  and return it. Raises ConfigError when the chunk does not fit a chip. A family that can (the LM: Family.load_data
  in plan mode) enters as shapes only: no weights read, nor data where its config gives the sizes. `dtype`: the FLOP rate the
  roofline uses (default: the family's `dtype`). whole=False (a quick survey, e.g.
  benchmarks/scale_table.py): the chunk is not compiled; its memory is estimated as what it holds throughout
  (its arguments, exact from their shardings) plus the largest step program's own total."""
  from collapse_jax import loop, paths
  if out_path is None and workdir:
    paths.check_workdir(workdir)  # made and checked writable before anything compiles
    out_path = os.path.join(workdir, "plan.json")
  elif out_path and not paths.is_remote(out_path):
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  tgt = target(target_name)
  # Abstract where the family can (the LM), else real host arrays (small: a dataset) of which only shapes travel.
  exp = loop.Experiment(cfg, devices=tgt.devices, abstract=True)
  fam, mesh = exp.family, exp.mesh
  shared_abs, carry_abs = exp.shared_abstract, exp.carry_abstract
  gs = jax.ShapeDtypeStruct((exp.run.checkpoint_every,), np.int32)
  dtype = dtype or fam.dtype
  steps = fam.step_programs(exp)
  memory = step_memory(steps, tgt) if steps else None
  if whole or not steps:
    compiled = compile_for(exp.chunk_fn().lower(carry_abs, gs, shared_abs), tgt)
    stats, buffers = compile_stats(compiled), biggest_buffers(compiled)
  else:
    flat = jax.tree_util.tree_flatten_with_path({"carry": carry_abs, "shared": shared_abs})[0]
    held = sum(_shard_bytes(x) for _, x in flat)
    i = max(range(len(steps)), key=lambda i: memory[i]["total_bytes"])
    stats = {"argument_bytes": held, "output_bytes": 0, "alias_bytes": 0, "temp_bytes": 0, "code_bytes": 0,
             "total_bytes": held + memory[i]["total_bytes"], "flops": 0.0, "bytes_accessed": 0.0,
             "estimate": f"not compiled: the chunk's arguments + the {steps[i].name} program's total"}
    buffers = sorted(((_shard_bytes(x), f"{np.dtype(x.dtype).name}{list(x.shape)}".replace(" ", ""),
                       "argument " + jax.tree_util.keystr(path)) for path, x in flat), reverse=True)[:6]
  try:
    verdict, refused = check_fits(stats, tgt, list(fam.plan_suggestions), buffers), None
  except ConfigError as e:
    verdict, refused = None, e
  # No roofline for a run that cannot start.
  costs = step_costs(steps, tgt, dtype, memory) if steps and not refused else None
  report = {
      "target": {"name": tgt.name, "topology": tgt.topology, "chips": tgt.chips, "chip": tgt.peak.name,
                 "hbm_bytes": tgt.peak.hbm_bytes, "peak_flops": tgt.peak.flops(dtype) or tgt.peak.bf16_flops,
                 "hbm_bytes_per_s": tgt.peak.hbm_bytes_per_s, "dtype": dtype},
      "config": {"family": cfg.family, "mesh": dict(mesh.shape), "generations": cfg.generations,
                 "checkpoint_every": cfg.checkpoint_every},
      "chunk": {**stats, "note": f"one compiled chunk of {cfg.checkpoint_every} generations; its flops/bytes count "
                                 "each loop body once (a lower bound)",
                "biggest_buffers": [{"bytes": n, "shape": s, "name": src} for n, s, src in buffers]},
      "steps": costs,
  }
  if refused:
    report["refused"] = str(refused)
  else:
    report["fits"] = verdict
  _emit(report, out_path)
  if refused:
    raise refused
  return report


def _shard_bytes(x) -> int:
  """Bytes one device holds of an abstract array placed by its sharding."""
  return int(np.prod(x.sharding.shard_shape(x.shape), dtype=np.int64)) * np.dtype(x.dtype).itemsize


def _b(n: float) -> str:
  for unit, size in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= size:
      return f"{n / size:.3g} {unit}"
  return f"{n:.0f} B"


def _emit(report: dict, out_path: str | None) -> None:
  t, c = report["target"], report["chunk"]
  lines = [f"plan: {report['config']['family']} on {t['name']} ({t['chips']} x {t['chip']}, mesh "
           f"{report['config']['mesh']})",
           f"  per chip: arguments {_b(c['argument_bytes'])}, outputs {_b(c['output_bytes'])}, aliased "
           f"{_b(c['alias_bytes'])}, temporaries {_b(c['temp_bytes'])}, code {_b(c['code_bytes'])}; total "
           f"{_b(c['total_bytes'])}" + (f" -> {report['fits']}" if "fits" in report else " -> REFUSED"),
           "  biggest buffers per chip:"]
  lines += [f"    {_b(b['bytes']):>10}  {b['shape']:<24} {b['name'][:90]}" for b in c["biggest_buffers"]]
  if report["steps"]:
    lines.append(f"  roofline per generation ({report['steps']['note']}):")
    for ph, p in report["steps"]["phases"].items():
      mfu = f", MFU {100 * p['mfu']:.0f}%" if p["mfu"] is not None else ""
      lines.append(f"    {ph}: {p['minutes']:.3g} min over {p['steps_counted']} steps, {p['flops']:.3g} FLOPs and "
                   f"{p['bytes_accessed']:.3g} bytes per chip{mfu}")
  else:
    lines.append(f"  chunk as XLA counts it (loop bodies once): {c['flops']:.3g} FLOPs, {c['bytes_accessed']:.3g} "
                 "bytes per chip; the family gives no per-step programs for a roofline")
  print("\n".join(lines), flush=True)
  text = json.dumps(report, indent=2, default=float)
  if out_path:
    from collapse_jax import paths
    paths.write_atomic(out_path, text)
    print(f"  written to {out_path}", flush=True)
  else:
    sys.stdout.write(text + "\n")
