"""LM training throughput: our compiled epoch (lm_train.train_epoch) against Hugging Face's OPTForCausalLM in
PyTorch, same config, AdamW + cosine schedule, same batch and sequence length, in the same run.

  python benchmarks/lm_bench.py [--shape cpu|opt125m] [--steps 8] [--rounds 5] [--torch-device auto]
  python benchmarks/lm_bench.py --shape opt125m          # on a GPU: seq 64 x batch 256 and seq 1024 x batch 16

Shapes: `cpu` (default): a small OPT (hidden 256, 4 layers, vocab 8192), seq 64 x batch 16, float32 on both sides.
`opt125m`: OPT-125m, bf16 compute on both sides (JAX: params float32, matmuls bf16; PyTorch: float32 weights
under torch.autocast(bfloat16)), the paper's blocks (seq 64 x batch 256) and long blocks (seq 1024 x batch 16).
Dropout 0.1 on both sides (the model's default, as fine-tuning runs it).

JAX: one compile stage, then timed calls of the jitted epoch over `steps` batches (shuffle, gather, lax.scan of
train steps, state donated), ending in block_until_ready. PyTorch (skipped with a message when torch or
transformers is missing): a warm-up call, then the same number of steps per call, loss from labels=input_ids,
zero_grad / backward / step / scheduler.step, ending in .item(). Rounds alternate JAX and PyTorch so load from
other processes hits both alike; the speed-up is the median of per-round ratios. MFU = flops_per_token *
tokens/s / peak (lm_train's table; n/a on CPU unless --peak-flops is given); the same formula for both sides.
Output: a table, then JSON lines (benchmarks/common.py).
"""
import argparse
import os
import statistics
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from collapse_jax import lm_train, sharding  # noqa: E402
from collapse_jax.models import opt  # noqa: E402

SHAPES = {
    # name: (model config overrides on top of a get_size base, [(seq_len, batch), ...])
    "cpu": (("tiny", dict(vocab_size=8192, hidden_size=256, num_layers=4, num_heads=4, ffn_dim=1024,
                          max_position_embeddings=512, word_embed_proj_dim=256, dtype="float32")), [(64, 16)]),
    "opt125m": (("opt-125m", dict(dtype="bfloat16")), [(64, 256), (1024, 16)]),
}


def jax_runner(cfg, ids_NxL, batch, mesh):
  tcfg = lm_train.TrainConfig(batch_size=batch, epochs=1000, verbose=False)  # the schedule never reaches its end
  params = opt.init_params(cfg, jax.random.key(0))
  state, state_sh, tx = lm_train.setup(tcfg, cfg, params, ids_NxL.shape[0], jax.random.key(1), mesh)
  blocks = jax.device_put(lm_train.as_blocks(ids_NxL), sharding.replicated(mesh))
  t0 = time.perf_counter()
  epoch = lm_train.epoch_program(tcfg, cfg, tx, state_sh, mesh).lower(state, blocks, jnp.int32(0)).compile()
  compile_s = time.perf_counter() - t0
  holder = {"state": state, "e": 0}

  def run():
    holder["state"], m = epoch(holder["state"], blocks, jnp.int32(holder["e"]))
    holder["e"] += 1
    return float(m["loss"])  # waits for the device

  return run, compile_s, f"jax {jax.__version__} ({mesh.devices.size} x {jax.devices()[0].device_kind})"


def torch_runner(cfg, ids_NxL, batch, device, bf16):
  try:
    import torch
    import transformers
  except ImportError as e:
    return None, f"torch/transformers not importable ({e}); PyTorch peer skipped"
  if device == "auto":
    device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.manual_seed(0)
  hf_cfg = transformers.OPTConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads, ffn_dim=cfg.ffn_dim, max_position_embeddings=cfg.max_position_embeddings,
      word_embed_proj_dim=cfg.word_embed_proj_dim, do_layer_norm_before=cfg.do_layer_norm_before,
      dropout=cfg.dropout, attention_dropout=cfg.attention_dropout)
  model = transformers.OPTForCausalLM(hf_cfg).to(device).train()
  optim = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.0)
  sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, T_max=10**6, eta_min=1e-6)
  data = torch.from_numpy(ids_NxL.astype(np.int64)).to(device)
  mask = torch.ones_like(data)

  def run():
    total = torch.zeros((), device=device)
    for idx in torch.randperm(len(data), device=device).split(batch):
      with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
        loss = model(input_ids=data[idx], attention_mask=mask[idx], labels=data[idx]).loss
      optim.zero_grad(set_to_none=True)
      loss.backward()
      optim.step()
      sched.step()
      total += loss.detach()
    return total.item()  # waits for the device

  where = f"{torch.get_num_threads()} threads" if device == "cpu" else torch.cuda.get_device_name()
  return run, f"torch {torch.__version__} + transformers {transformers.__version__} ({where})"


def bench_one(cfg, seq_len, batch, args, mesh):
  n = args.steps * batch
  rng = np.random.default_rng(0)
  ids_NxL = rng.integers(3, cfg.vocab_size, (n, seq_len)).astype(np.int32)
  run_jax, compile_s, jax_desc = jax_runner(cfg, ids_NxL, batch, mesh)
  run_jax()  # first call: allocations, thread pools
  bf16 = cfg.dtype == "bfloat16"
  run_torch, torch_desc = (None, "PyTorch peer off (--no-torch)") if args.no_torch else \
      torch_runner(cfg, ids_NxL, batch, args.torch_device, bf16)
  if run_torch is None:
    print(torch_desc)
  else:
    run_torch()  # warm-up
  load = [round(os.getloadavg()[0], 2)]
  times = {"jax": [], "torch": []}
  for _ in range(args.rounds):
    for name, fn in (("jax", run_jax), ("torch", run_torch)):
      if fn is not None:
        t = time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - t)
  load.append(round(os.getloadavg()[0], 2))
  peak = lm_train.peak_flops_per_device(jax.devices()[0], args.peak_flops)
  n_params = opt.count_params(jax.eval_shape(lambda k: opt.init_params(cfg, k), jax.random.key(0)))
  rows = []
  for name, desc in (("jax", jax_desc), ("torch", torch_desc)):
    if not times[name]:
      continue
    med = statistics.median(times[name])
    tok_s = n * seq_len / med
    # The torch peer runs on one device; JAX on the mesh's devices.
    mfu = lm_train.mfu(cfg, seq_len, tok_s, mesh.devices.size if name == "jax" else 1, peak)
    rows.append({"impl": name, "seq": seq_len, "batch": batch, "steps": args.steps, "dtype": cfg.dtype,
                 "tokens_per_s": tok_s, "mfu": None if mfu is None else round(mfu, 4), "median_s": med,
                 "compile_s": compile_s if name == "jax" else None, "params": n_params,
                 "flops_per_token": opt.flops_per_token(cfg, seq_len), "desc": desc, "loadavg_1m": load})
  if len(rows) == 2:
    ratios = [t / j for j, t in zip(times["jax"], times["torch"])]
    rows[0]["speedup_vs_torch"] = statistics.median(ratios)
    rows[0]["round_ratios"] = [round(r, 3) for r in ratios]
  return rows


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--shape", choices=sorted(SHAPES), default="cpu")
  p.add_argument("--steps", type=int, default=8, help="batches per timed call")
  p.add_argument("--rounds", type=int, default=5, help="timed calls per implementation (alternating)")
  p.add_argument("--data", type=int, default=0, help="JAX mesh 'data' size (0: all devices / fsdp)")
  p.add_argument("--fsdp", type=int, default=1, help="JAX mesh 'fsdp' size")
  p.add_argument("--peak-flops", type=float, default=0.0, help="per-device peak FLOP/s for MFU (0: by device kind)")
  p.add_argument("--torch-device", default="auto", help="cpu, cuda, or auto (cuda when available)")
  p.add_argument("--no-torch", action="store_true")
  args = p.parse_args(argv)
  (base, overrides), runs = SHAPES[args.shape]
  cfg = opt.get_size(base, **overrides)
  data = args.data or len(jax.devices()) // args.fsdp
  mesh = sharding.make_mesh_2d(data, args.fsdp)
  rows = []
  for seq_len, batch in runs:
    rows += bench_one(cfg, seq_len, batch, args, mesh)
  common.report(f"lm_train ({args.shape})", rows, ["impl", "seq", "batch", "dtype", "tokens_per_s", "mfu",
                                                   "median_s", "compile_s", "speedup_vs_torch", "desc"])


if __name__ == "__main__":
  main()
