"""Plan mode (collapse_jax/plan.py): per-chip memory and FLOPs of programs compiled for a TPU topology without a
TPU (libtpu, installed by the test extra) and for the local CPU devices, checked against hand counts; target
names; the roofline; the refusal of a program too large for a chip; the GMM's whole plan through run() and the CLI.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from collapse_jax import config, hardware, plan, targets
from collapse_jax.errors import ConfigError

GiB = 2**30


def _mesh(tgt):
  return jax.make_mesh((tgt.chips,), ("x",), axis_types=(jax.sharding.AxisType.Auto,), devices=tgt.devices)


@pytest.mark.parametrize("name,topology,chips,chip", [
    ("v5e-8", "v5e:2x4", 8, "TPU v5e"), ("v5e-256", "v5e:16x16", 256, "TPU v5e"),
    ("v5e-16x16", "v5e:16x16", 256, "TPU v5e"), ("v5e:2x2", "v5e:2x2", 4, "TPU v5e"),
    ("v5p-8", "v5p:2x2x1", 4, "TPU v5p"), ("v5p-64", "v5p:2x4x4", 32, "TPU v5p"),
    ("v5p:2x2x2", "v5p:2x2x2", 8, "TPU v5p"), ("v6e-8", "v6e:2x4", 8, "TPU v6e"), ("v4-8", "v4:2x2x1", 4, "TPU v4"),
])
def test_target_names_and_a_sharded_matmul(name, topology, chips, chip):
  """Cloud's names (v4/v5p count TensorCores, 2 per chip; v5e/v6e chips) map to libtpu topologies with one device
  per chip, and each compiles a matmul split over every chip: XLA's flops per chip = 2 N M K / chips."""
  tgt = targets.target(name)
  assert (tgt.topology, tgt.chips, len(tgt.devices), tgt.peak.name) == (topology, chips, chips, chip)
  mesh = _mesh(tgt)
  n, m, k = 8 * chips, 256, 512
  a = jax.ShapeDtypeStruct((n, m), jnp.float32, sharding=NamedSharding(mesh, P("x")))
  b = jax.ShapeDtypeStruct((m, k), jnp.float32, sharding=NamedSharding(mesh, P()))
  st = plan.compile_stats(targets.compile_for(jax.jit(jnp.matmul).lower(a, b), tgt))
  assert st["flops"] == 2 * n * m * k / chips


@pytest.mark.parametrize("name", ["v9-8", "v5e", "v5p-7", "v5e:2x2x2", "tpu", "v5e-12"])
def test_bad_target_names(name):
  with pytest.raises(ConfigError, match=r"--plan="):
    targets.target(name)


def test_missing_libtpu_names_the_fix(monkeypatch):
  real = targets.importlib.util.find_spec
  monkeypatch.setattr(targets.importlib.util, "find_spec", lambda n, *a: None if n == "libtpu" else real(n, *a))
  with pytest.raises(ConfigError, match=r"needs libtpu: pip install -e '\.\[tpu\]'$"):
    targets.target("v5e-8")


def test_local_target():
  tgt = targets.target("local")
  assert (tgt.chips, tgt.platform, tgt.topology) == (8, "cpu", None)
  # Simulated devices share the host: 8 of them make one host's peak.
  host = hardware.peak(jax.devices()[0])
  assert tgt.chips * tgt.peak.fp32_flops == pytest.approx(host.fp32_flops)


@pytest.mark.parametrize("name", ["v5e:2x2", "local"])
def test_memory_and_flops_hand_count(name):
  """f(a, b) = (2 a, a @ b) with a [N, M] f32 split over the chips and b [M, K] replicated. Per chip: arguments
  N M 4 / c + M K 4; outputs N M 4 / c + N K 4 / c (plus the output tuple's table: at most 1 KiB); with `a`
  donated, 2 a reuses a's buffer: aliased = N M 4 / c, counted once in the total."""
  tgt = targets.target(name)
  c = tgt.chips
  mesh = _mesh(tgt)
  n, m, k = 64 * c, 512, 256
  a = jax.ShapeDtypeStruct((n, m), jnp.float32, sharding=NamedSharding(mesh, P("x")))
  b = jax.ShapeDtypeStruct((m, k), jnp.float32, sharding=NamedSharding(mesh, P()))
  f = lambda a, b: (a * 2, a @ b)
  a_chip, b_chip, y_chip = n * m * 4 // c, m * k * 4, n * k * 4 // c
  for donate in (False, True):
    fn = jax.jit(f, donate_argnums=0 if donate else ())
    st = plan.compile_stats(targets.compile_for(fn.lower(a, b), tgt))
    assert st["argument_bytes"] == a_chip + b_chip
    assert 0 <= st["output_bytes"] - (a_chip + y_chip) <= 1024
    assert st["alias_bytes"] == (a_chip if donate else 0)
    # What the chip holds at once besides code and scratch: a (or 2a in its place), b, 2a (undonated), a @ b.
    live = st["total_bytes"] - st["code_bytes"] - st["temp_bytes"]
    assert 0 <= live - (a_chip + b_chip + y_chip + (0 if donate else a_chip)) <= 1024
    # The matmul's 2 N M K / c plus at most one FLOP per element of 2a.
    assert 2 * n * m * k / c <= st["flops"] <= 2 * n * m * k / c + n * m / c


def test_biggest_buffers_are_the_hbm_arrays():
  """(2 a, tanh(a @ b) @ b^T) on v5e:2x2: HBM holds the two arguments and the two outputs, named by argument path
  and JAX op; the [64, 256] intermediate lives inside a fusion / in VMEM and is not listed."""
  tgt = targets.target("v5e:2x2")
  mesh = _mesh(tgt)
  a = jax.ShapeDtypeStruct((256, 512), jnp.float32, sharding=NamedSharding(mesh, P("x")))
  b = jax.ShapeDtypeStruct((512, 256), jnp.float32, sharding=NamedSharding(mesh, P()))
  f = jax.jit(lambda a, b: (a * 2, jnp.tanh(a @ b) @ b.T))
  got = plan.biggest_buffers(targets.compile_for(f.lower(a, b), tgt), k=20)
  assert got == [(512 * 256 * 4, "f32[512,256]", "argument b"), (64 * 512 * 4, "f32[64,512]", "jit(<lambda>)/mul"),
                 (64 * 512 * 4, "f32[64,512]", "jit(<lambda>)/dot_general"), (64 * 512 * 4, "f32[64,512]", "argument a")]
  # A scan: XLA keeps the loop's bf16 copy of w and the carry in VMEM (S(1)), and copies the result out to HBM.
  w = jax.ShapeDtypeStruct((1024, 512), jnp.float32, sharding=NamedSharding(mesh, P("x")))
  x = jax.ShapeDtypeStruct((64, 512), jnp.float32, sharding=NamedSharding(mesh, P()))
  scan = jax.jit(lambda w, x: jax.lax.scan(lambda c, _: (jnp.tanh(c @ w.T) @ w, None), x, None, length=3)[0])
  got = plan.biggest_buffers(targets.compile_for(scan.lower(w, x), tgt), k=3)
  assert got == [(256 * 512 * 4, "f32[256,512]", "argument w"), (64 * 512 * 4, "f32[64,512]", "argument x"),
                 (64 * 512 * 4, "f32[64,512]", "%copy-done")]


def test_roofline():
  p = hardware.Peak("toy", 100e12, None, 1e12, 16 * GiB)
  assert plan.roofline(1e12, 1e9, p) == (pytest.approx(0.01), "compute")
  assert plan.roofline(1e9, 1e11, p) == (pytest.approx(0.1), "memory")
  f32 = hardware.Peak("toy", 100e12, 25e12, 1e12, None)
  assert plan.roofline(1e12, 0, f32, "float32") == (pytest.approx(0.04), "compute")


def test_step_costs_count_and_mfu():
  """A bf16 matmul split over 4 v5e chips, run 5 times a generation: the phase counts 5 steps and 5 x the per-chip
  flops. At n = 8192 it is compute-bound on v5e (275 GFLOP vs XLA's 0.34 GB accessed per chip; at 2048 XLA counts
  46 MB, memory-bound), so its roofline MFU is 1: XLA's per-chip flops are the textbook count / 4."""
  tgt = targets.target("v5e:2x2")
  mesh = _mesh(tgt)
  n = 8192
  a = jax.ShapeDtypeStruct((n, n), jnp.bfloat16, sharding=NamedSharding(mesh, P("x")))
  b = jax.ShapeDtypeStruct((n, n), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
  steps = [plan.Step("mm", "train", jax.jit(jnp.matmul), (a, b), 5, 2 * n**3)]
  out = plan.step_costs(steps, tgt)
  ph = out["phases"]["train"]
  per_chip = 2 * n**3 / 4
  assert ph["steps_counted"] == 5 and ph["flops"] == 5 * per_chip
  assert out["steps"][0]["bound"] == "compute"
  assert ph["seconds"] == pytest.approx(5 * per_chip / tgt.peak.bf16_flops)
  assert ph["mfu"] == pytest.approx(1.0)
  assert "compiled for one step" in out["note"]
  with pytest.raises(ValueError, match="phase"):
    plan.step_costs([steps[0]._replace(phase="sample")], tgt)


def test_too_big_for_a_v5e_chip_is_refused_naming_its_buffers():
  """32 GiB split over 4 chips, doubled into a new output: 16 GiB per chip, more than a v5e's 16 GiB with the code.
  XLA's TPU compiler itself stops at that (RESOURCE_EXHAUSTED, no buffer named): targets.compile_for lets it finish."""
  tgt = targets.target("v5e:2x2")
  mesh = _mesh(tgt)
  params = {"huge": jax.ShapeDtypeStruct((4 * 65536, 32768), jnp.float32, sharding=NamedSharding(mesh, P("x")))}
  compiled = targets.compile_for(jax.jit(lambda p: p["huge"] * 2).lower(params), tgt)
  stats = plan.compile_stats(compiled)
  assert stats["argument_bytes"] == 8 * GiB and stats["output_bytes"] == 8 * GiB
  buffers = plan.biggest_buffers(compiled)
  assert {b[2] for b in buffers[:2]} == {"argument p['huge']", "jit(<lambda>)/mul"}
  with pytest.raises(ConfigError, match=r"does not fit v5e:2x2.*8.00 GiB f32\[65536,32768\] argument p\['huge'\]"
                                        r".*would help: use remat") as e:
    plan.check_fits(stats, tgt, ["use remat"], buffers)
  assert "\n" not in str(e.value)
  # Half of it fits; a CPU target reports and never refuses.
  assert "of 16.0 GiB" in plan.check_fits(dict(stats, total_bytes=8 * GiB), tgt)
  assert "per chip" in plan.check_fits(dict(stats, total_bytes=10**15), targets.target("local"))


def _carry_bytes_per_chip(tree) -> int:
  return sum(int(np.prod(s.sharding.shard_shape(s.shape))) * s.dtype.itemsize for s in jax.tree.leaves(tree))


def test_gmm_plan_end_to_end(tmp_path):
  """The GMM's real chunk, compiled for v5e:2x2 through run(): JSON written, its arguments are the carry (one chain
  per chip, donated: aliased in full) and the chunk's generation indices."""
  cfg = config.load("gmm", "quick")
  out = tmp_path / "sub" / "plan.json"
  report = plan.run(cfg, "v5e:2x2", out_path=str(out))
  saved = json.loads(out.read_text())
  assert saved["chunk"]["total_bytes"] == report["chunk"]["total_bytes"] > 0
  assert saved["target"]["chips"] == 4 and saved["config"]["mesh"] == {"data": 4}
  assert "of 16.0 GiB" in saved["fits"] and saved["chunk"]["biggest_buffers"]
  from collapse_jax import loop
  exp = loop.Experiment(cfg, devices=targets.target("v5e:2x2").devices)
  carry = _carry_bytes_per_chip(exp.carry_abstract)
  # TPU layouts pad small arrays (a scalar takes a 512-byte tile): at least the carry, and not much more.
  c = saved["chunk"]
  assert carry <= c["alias_bytes"] <= c["argument_bytes"] <= carry + 64 * 1024


def test_cli_plan_and_refusal(tmp_path, repo):
  env = dict(os.environ, PYTHONPATH=repo)
  cmd = [sys.executable, "-m", "collapse_jax.main", "--config=gmm:quick", "--plan=v5e:2x2"]
  ok = subprocess.run(cmd + [f"--workdir={tmp_path / 'w'}"], env=env, capture_output=True, text=True, cwd=repo)
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert json.loads((tmp_path / "w" / "plan.json").read_text())["target"]["topology"] == "v5e:2x2"
  assert "per chip" in ok.stdout and not (tmp_path / "w" / "checkpoints").exists()
  # 450M held-out points per chain: the log-likelihood's [2, 2, N] temporaries pass 16 GiB.
  bad = subprocess.run(cmd + ["--config.gmm.heldout=450000000", f"--plan_out={tmp_path / 'bad.json'}"], env=env,
                       capture_output=True, text=True, cwd=repo)
  assert bad.returncode == 2
  err = bad.stderr.strip().splitlines()[-1]
  assert err.startswith("error: does not fit v5e:2x2") and "argument carry['aux']['heldout']" in err
  assert json.loads((tmp_path / "bad.json").read_text())["refused"] == err[len("error: "):]


def test_help_lists_the_plan_flags():
  from collapse_jax import cli, main  # noqa: F401  (main defines the flags the help lists)
  text = cli.help_text()
  assert "\n  --plan:" in text and "\n  --plan_out:" in text
