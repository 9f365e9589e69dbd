"""Plan mode for the LM (collapse_jax/families/lm/plan.py through plan.run): the generation chunk and its step programs
compiled for a TPU topology (libtpu, from the test extra) and for the local CPU devices from abstract shapes (no
weights, no data files); opt-125m's per-chip memory against a hand count; an LM too large for its chips refused
with its biggest buffers named.
"""
import json

import jax
import pytest

from collapse_jax import loop, plan, sharding
from collapse_jax.errors import ConfigError
from collapse_jax.families.lm import model as opt
from collapse_jax.families.lm import sizes
from helpers import load_config

# num_devices=0: every chip of the target (helpers.load_config's default of 1 would plan one chip of it).

GiB = 2**30


@pytest.mark.parametrize("target", ["v5e:2x2", "local"])
def test_lm_plan_runs_from_shapes_alone(tmp_path, target):
  """The CI config (3 layers here: scanned, so XLA counts one; the probes extrapolate) planned whole: chunk
  compiled, steps costed with their counts, JSON written, no data read."""
  cfg = load_config("lm", "ci", num_devices=0, lm__mesh_fsdp=2, lm__model_overrides__num_layers=3)
  rep = plan.run(cfg, target, out_path=str(tmp_path / "plan.json"))
  assert json.loads((tmp_path / "plan.json").read_text())["fits"] == rep["fits"]
  assert rep["chunk"]["argument_bytes"] > 0 and rep["chunk"]["temp_bytes"] > 0
  steps = {s["name"]: s for s in rep["steps"]["steps"]}
  c = cfg.lm
  # One generation of the CI config: 28 blocks, batch 8 -> 4 steps per epoch; decoding 28 + 4 prompts in batches
  # of 8, each a prefill + first token and block_len - 1 more tokens.
  assert steps["train step"]["count"] == c.epochs * 4
  assert steps["decode prefill + token 1"]["count"] == 4
  assert steps["decode token"]["count"] == 4 * (c.block_len - 1)
  # The scanned layers' flops come from the unrolled probes: a training step is ~3x a forward pass of its tokens
  # (counting one layer of three would give ~1.5-2x here).
  fwd = sizes.flops_per_token(loop.Experiment(cfg, sharding.make_lm_mesh(1, 2, 1)).family.model_cfg, c.block_len) / 3
  chips = 4 if target != "local" else len(jax.devices())
  assert 2.5 < steps["train step"]["flops"] * chips / (fwd * c.batch_size * c.block_len) < 4.5


def _opt125m(tgt, fsdp):
  """opt-125m's (the paper's config) train step and decode programs, compiled for tgt on a (1, fsdp, 1) mesh."""
  from collapse_jax.families.lm import plan as lm_plan
  cfg = load_config("lm", "opt_wikitext2", num_devices=0, lm__mesh_fsdp=fsdp, lm__dtype="bfloat16")
  exp = loop.Experiment(cfg, abstract=True, devices=tgt.devices)
  steps = [plan.Step(*s) for s in lm_plan._programs(exp.family, exp, exp.family.model_cfg)]
  return exp.family, {s.name: m for s, m in zip(steps, plan.step_memory(steps, tgt))}


def test_opt125m_memory_against_a_hand_count():
  """opt-125m on the 8 local devices as (data 2 x fsdp 4) (exact bytes: a TPU pads each array's two minor
  dimensions to its (8, 128) tiles, e.g. the [heads, 64] of the attention kernels to 128): the train step's arguments are its float32 parameters and Adam's two moments,
  a quarter per chip (every dimension divides by 4: nothing replicated), plus the batch; its total adds the
  gradients (a quarter) and activations. The decode token step holds the parameters and the KV cache: 12 layers x
  K and V x 128 prompts x 5 beams x 12 heads x (64 + 64) slots x 64 dims in bfloat16, split over the 4 chips'
  prompts, and the shared prompt prefix (64 slots per prompt, once per prompt)."""
  tgt = plan.target("local")
  fam, mem = _opt125m(tgt, 4)
  n = sizes.count_params(jax.eval_shape(lambda: opt.init_params(fam.model_cfg, jax.random.key(0))))
  assert n == 125_239_296  # HF's count for facebook/opt-125m (tied head)
  train = mem["train step"]
  batch = 2 * 128 * 64 * 4 // 8  # ids and mask, int32, split over the 8 batch shards
  # Arguments: 3 float32 copies (params, mu, nu) / 4 + the batch + 20 bytes of scalars (the step, optax's two
  # int32 counts, the key's two uint32 words).
  assert train["argument_bytes"] - (3 * 4 * n // 4 + batch) == 20
  grads = 4 * n // 4
  assert train["total_bytes"] >= train["argument_bytes"] + grads
  acts = 12 * 8 * 32 * 64 * 768 * 2 + 3 * 32 * 64 * 50272 * 4  # per layer ~8 [b, l, e] bf16 + 3 logits copies
  assert train["total_bytes"] <= train["argument_bytes"] + grads + acts + train["code_bytes"] + 64 * 2**20
  tok = mem["decode token"]
  rows = 128 // 8
  cache = 12 * 2 * rows * 5 * 12 * 64 * 64 * 2 + 12 * 2 * rows * 12 * 64 * 64 * 2  # own slots + shared prefix
  params = 4 * n // 4
  assert tok["argument_bytes"] >= params + cache
  assert tok["argument_bytes"] - (params + cache) < 0.05 * (params + cache)  # masks, seen-token table, sequences


def test_an_lm_too_large_is_refused_naming_its_buffers(tmp_path):
  """A 2-layer OPT of width 8192 (fc kernels [2, 8192, 8192]: 0.5 GiB each in float32) held as the initial,
  previous and generation-0 weights, plus the trained copy, Adam's moments and gradients, does not fit a v5e chip
  data-parallel (no fsdp): refused before anything runs, naming the stacked kernels and what would help. (The
  compiled chunk's refusal, whole=True, names its HLO buffers the same way: test_plan.py; ~90 s for this model.)"""
  cfg = load_config("lm", "ci", num_devices=0, lm__model_overrides__hidden_size=8192, lm__model_overrides__num_heads=64,
                    lm__model_overrides__ffn_dim=8192, lm__model_overrides__num_layers=2)
  with pytest.raises(ConfigError, match=r"does not fit v5e:2x2.*biggest buffers: .*\[2,8192,8192\].*mesh_fsdp") as e:
    plan.run(cfg, "v5e:2x2", out_path=str(tmp_path / "plan.json"), whole=False)
  assert "\n" not in str(e.value)
  assert "refused" in json.loads((tmp_path / "plan.json").read_text())
