"""LM training throughput: the experiment's trainer (lm_train.fit, as the LM family runs it each generation)
against Hugging Face's OPTForCausalLM in PyTorch, same config, AdamW + cosine schedule, same batch and sequence
length, in the same run.

  python benchmarks/lm_bench.py [--shape cpu|opt125m] [--steps 8] [--rounds 5] [--torch-device auto]
  python benchmarks/lm_bench.py --shape opt125m          # on a GPU: seq 64 x batch 256 and seq 1024 x batch 16

Shapes: `cpu` (default): a small OPT (hidden 256, 4 layers, vocab 8192), seq 64 x batch 16 and seq 64 x batch 128,
float32 on both sides.
`opt125m`: OPT-125m, bf16 compute on both sides (JAX: params float32, matmuls bf16; PyTorch: float32 weights
under torch.autocast(bfloat16)), the paper's blocks (seq 64 x batch 256) and long blocks (seq 1024 x batch 16).
Dropout 0.1 on both sides (the model's default, as fine-tuning runs it).

JAX: one compile stage (lm_train.program), then timed calls of fit for one epoch over `steps` batches (optimizer
init, shuffle, gather, lax.scan of train steps, then fit's validation perplexity and best-epoch selection, on one
row per batch shard: a few forward rows against `steps` x batch trained ones), ending in block_until_ready; each
call trains afresh from the same parameters. PyTorch (skipped with a message when torch or
transformers is missing): a warm-up call, then the same number of steps per call, loss from labels=input_ids,
zero_grad / backward / step / scheduler.step, ending in .item(); torch gets the cores JAX uses. Method (quiet
machine, alternating rounds, medians and spread, machine/versions/commit in every row): benchmarks/common.py.
MFU = flops_per_token * tokens/s / peak, the same formula for both sides; the peak is the device's published one
or, on a CPU, the host's derived from cores, clock and ISA (collapse_jax/hardware.py).
"""
import argparse
import os
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from collapse_jax import hardware, sharding  # noqa: E402
from collapse_jax.families.lm import model as opt  # noqa: E402
from collapse_jax.families.lm import sizes  # noqa: E402
from collapse_jax.families.lm import train as lm_train  # noqa: E402

SHAPES = {
    # name: (model config overrides on top of a get_size base, [(seq_len, batch), ...])
    "cpu": (("tiny", dict(vocab_size=8192, hidden_size=256, num_layers=4, num_heads=4, ffn_dim=1024,
                          max_position_embeddings=512, word_embed_proj_dim=256, dtype="float32")),
            [(64, 16), (64, 128)]),
    "opt125m": (("opt-125m", dict(dtype="bfloat16")), [(64, 256), (1024, 16)]),
}


def jax_runner(cfg, ids_NxL, batch, mesh):
  shards = sharding.batch_shards(mesh)
  tcfg = lm_train.TrainConfig(batch_size=batch, epochs=1, eval_batch=shards, verbose=False)
  params = opt.init_params(cfg, jax.random.key(0))
  rep = sharding.replicated(mesh)
  p_sh = sharding.param_shardings(params, opt.logical_axes(params), mesh)
  args = (jax.device_put(params, p_sh), jax.device_put(lm_train.as_blocks(ids_NxL), rep),
          jax.device_put(lm_train.as_blocks(ids_NxL[:shards]), rep), jax.random.key_data(jax.random.key(1)))
  t0 = time.perf_counter()
  fit = lm_train.program(tcfg, cfg, params, mesh).lower(*args).compile()
  compile_s = time.perf_counter() - t0

  def run():
    _, best, _ = fit(*args)
    return float(best["train_loss"])  # waits for the device

  return run, compile_s, f"jax {jax.__version__} ({mesh.devices.size} x {jax.devices()[0].device_kind})"


def torch_runner(cfg, ids_NxL, batch, device, bf16, args):
  try:
    torch = common.pin_torch(args)
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
      torch_runner(cfg, ids_NxL, batch, args.torch_device, bf16, args)
  fns = {"jax": run_jax}
  if run_torch is None:
    print(torch_desc)
  else:
    run_torch()  # warm-up
    fns["torch"] = run_torch
  state = common.wait_quiet(args, f"lm_train seq {seq_len} x batch {batch}")
  times = common.alternate(fns, args.rounds)
  peak = args.peak_flops or hardware.total_flops(mesh.devices.flat, cfg.dtype)
  n_params = sizes.count_params(jax.eval_shape(lambda k: opt.init_params(cfg, k), jax.random.key(0)))
  rows = []
  for name, desc in (("jax", jax_desc), ("torch", torch_desc)):
    if name not in fns:
      continue
    st = common.summary(times[name])
    tok_s = n * seq_len / st["median_s"]
    # The same peak for both sides: on a CPU both use every core; on a GPU both use one device.
    mfu = lm_train.mfu(cfg, seq_len, tok_s, peak)
    rows.append({"impl": name, "seq": seq_len, "batch": batch, "steps": args.steps, "dtype": cfg.dtype,
                 "tokens_per_s": tok_s, "mfu": None if mfu is None else round(mfu, 4), **st,
                 "compile_s": compile_s if name == "jax" else None, "params": n_params,
                 "flops_per_token": sizes.flops_per_token(cfg, seq_len), "peak_flops": peak, "desc": desc})
  if len(rows) == 2:
    rows[0].update(common.ratio(times["jax"], times["torch"]))
  return rows, state


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--shape", choices=sorted(SHAPES), default="cpu")
  p.add_argument("--steps", type=int, default=8, help="batches per timed call")
  p.add_argument("--data", type=int, default=0, help="JAX mesh 'data' size (0: all devices / fsdp)")
  p.add_argument("--fsdp", type=int, default=1, help="JAX mesh 'fsdp' size")
  p.add_argument("--peak-flops", type=float, default=0.0, help="peak FLOP/s of all devices for MFU (0: derived)")
  p.add_argument("--batches", default="", help="comma-separated batch sizes (default: the shape's)")
  p.add_argument("--torch-device", default="auto", help="cpu, cuda, or auto (cuda when available)")
  p.add_argument("--no-torch", action="store_true")
  common.add_args(p)
  args = p.parse_args(argv)
  common.check_rounds(args)
  (base, overrides), runs = SHAPES[args.shape]
  if args.batches:
    runs = [(runs[0][0], int(b)) for b in args.batches.split(",")]
  cfg = sizes.get_size(base, **overrides)
  data = args.data or len(jax.devices()) // args.fsdp
  mesh = sharding.make_lm_mesh(data, args.fsdp)
  out = []
  for seq_len, batch in runs:
    rows, state = bench_one(cfg, seq_len, batch, args, mesh)
    out += common.report(f"lm_train ({args.shape}, seq {seq_len} x batch {batch})", rows,
                         ["impl", "dtype", "tokens_per_s", "mfu", "median_s", "spread", "compile_s", "ratio",
                          "desc"], state)
  return out


if __name__ == "__main__":
  main()
