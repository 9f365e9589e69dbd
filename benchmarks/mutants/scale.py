"""Mutants of the LM at scale and plan mode (issue 15): sharding rules, scanned layers, remat, the stacked KV
cache, HF's per-layer tensors, and the planner's step counting (tests/test_scale.py, tests/test_sharding.py,
tests/test_opt.py, tests/test_decode.py, tests/test_lm_plan.py)."""
from benchmarks.mutants import Mutant

SH, OPT, KV, HF = ("collapse_jax/sharding.py", "collapse_jax/families/lm/model.py", "collapse_jax/families/lm/kv_cache.py",
                   "collapse_jax/families/lm/hf.py")
PLAN, LMP = "collapse_jax/plan.py", "collapse_jax/families/lm/plan.py"
_S, _SH, _P = "tests/test_scale.py::", "tests/test_sharding.py::", "tests/test_lm_plan.py::"

MUTANTS = [
    Mutant(name="scale_params_not_filled", file=SH, old="  for axis in fill:", new="  for axis in ():",
           tests=(f"{_S}test_train_step_sharded_equals_single_device", f"{_SH}test_logical_spec_rules"),
           why="LayerNorms, biases and the position table stay replicated over fsdp x tensor: not 1/8 per device"),
    Mutant(name="scale_no_tensor_heads", file=SH, old='    ("heads", TENSOR), ("mlp", TENSOR),',
           new='    ("mlp", TENSOR),', tests=(f"{_SH}test_logical_spec_rules",),
           why="attention heads no longer split over 'tensor' (Megatron's column-parallel q/k/v lost)"),
    Mutant(name="scale_cache_writes_layer_0", file=KV, old="    start = (self.i, 0, 0,", new="    start = (0, 0, 0,",
           tests=("tests/test_opt.py::test_prefill_then_cached_steps_equal_full_forward",
                  "tests/test_decode.py::test_opt_beams_read_one_shared_prompt_cache"),
           why="every layer writes its K/V into layer 0's slots of the stacked cache"),
    Mutant(name="scale_remat_ignored", file=OPT, old='    if cfg.remat != "none" and cache is None:',
           new="    if False:", tests=(f"{_S}test_remat_gives_the_same_gradients",),
           why="lm.remat is accepted and does nothing: activations are all kept"),
    Mutant(name="scale_hf_layers_reversed", file=HF, old="      stacks.setdefault(path, []).append(value)",
           new="      stacks.setdefault(path, []).insert(0, value)", tests=("tests/test_opt.py::test_logits_match_hf_fp32",),
           why="HF's layer i lands at the stacked index L - 1 - i"),
    Mutant(name="plan_scan_counted_once", file=PLAN, old="one[k] + (layers - 1) * (two[k] - one[k])",
           new="one[k] + 0 * (two[k] - one[k])", tests=(f"{_P}test_lm_plan_runs_from_shapes_alone",),
           why="a scanned model's step is costed as one layer (XLA counts a scan body once)"),
    Mutant(name="plan_one_epoch", file=LMP, old="c.epochs * lm_train.steps_per_epoch(rows, B)",
           new="lm_train.steps_per_epoch(rows, B)", tests=(f"{_P}test_lm_plan_runs_from_shapes_alone",),
           why="the roofline counts one epoch's training steps per generation, not epochs of them"),
]
