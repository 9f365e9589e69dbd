"""New tokens per second of collapse_jax.families.lm.decode (one compiled program per corpus) and, optionally,
of Hugging Face `generate` on the same shape in the same run: 5-beam search with repetition penalty 3.0 (the
paper's setting) and sampling (top-k 50, top-p 0.95), 64-token prompts continued by 64 new tokens (min = max new
tokens, so both sides do exactly the same number of steps), random weights.

  python benchmarks/decode_bench.py                          # small CPU shape, JAX only
  python benchmarks/decode_bench.py --hf                     # + HF generate at its best batch (needs '.[bench]')
  python benchmarks/decode_bench.py --shape opt125m --hf --rows 8 --batch 8 --hf_batches 4,8

"New tokens" counts the continuation tokens returned (64 per prompt), not beam hypotheses. Each side decodes at
its best batch: JAX at each size of --batch (compiled by a first call, whose time less a timed call's is
`compile_s`) and HF at each of --hf_batches run once untimed and once timed; then the two at their best batches
alternate for --rounds rounds (method, quiet check and records: benchmarks/common.py); torch gets the cores JAX
uses. MFU and memory-bandwidth use are
estimates from the arithmetic (`cost` below) against the device's peak (collapse_jax/hardware.py).
"""
import argparse
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from collapse_jax import hardware  # noqa: E402
from collapse_jax.families.lm import decode  # noqa: E402
from collapse_jax.families.lm import model as opt  # noqa: E402
from collapse_jax.families.lm import sizes  # noqa: E402

SHAPES = {"small": dict(size="tiny"), "opt125m": dict(size="opt-125m")}
METHODS = {
    "beam5_rep3": decode.DecodeConfig(method="beam", num_beams=5, max_new_tokens=64, min_new_tokens=64,
                                      repetition_penalty=3.0),
    "sample": decode.DecodeConfig(method="sample", max_new_tokens=64, min_new_tokens=64, top_k=50, top_p=0.95),
}


def prompts(cfg, rows, length, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, cfg.vocab_size, (rows, length)).astype(np.int32)
  return ids, np.ones_like(ids)


def cost(cfg, n_params: int, rows: int, batch: int, prompt: int, dcfg) -> tuple[float, float]:
  """FLOPs and memory bytes of decoding `rows` prompts in batches of `batch`: the prefill, then one token per
  hypothesis per step. A forward token at context c costs flops_per_token(c) / 3 = 2N + 4 * layers * hidden * c;
  each step reads every weight once per batch (float32 parameters) and each hypothesis's keys and values so far."""
  hyps = dcfg.num_beams if dcfg.method == "beam" else 1
  kv_bytes = 2 * cfg.num_layers * cfg.hidden_size * np.dtype(cfg.dtype).itemsize
  flops = rows * sum(sizes.flops_per_token(cfg, c) / 3 for c in range(1, prompt + 1))
  steps = range(prompt, prompt + dcfg.max_new_tokens)
  flops += rows * hyps * sum(sizes.flops_per_token(cfg, c + 1) / 3 for c in steps)
  nbytes = (rows / batch) * len(steps) * n_params * 4 + rows * hyps * sum(kv_bytes * (c + 1) for c in steps)
  return flops, nbytes


def jax_runner(cfg, params, dcfg, ids, mask, batch):
  lm = decode.opt_lm(cfg)
  return lambda: jax.block_until_ready(  # noqa: E731
      decode.decode_corpus(lm, params, ids, mask, dcfg, jax.random.key(0), batch_size=batch)["tokens"])


def hf_runner(cfg, dcfg, ids, mask, batches, args):
  """HF generate at the best of `batches` (one untimed and one timed call each), or None without torch."""
  try:
    torch = common.pin_torch(args)
    import transformers
  except ImportError as e:
    print(f"torch/transformers not importable ({e}): HF peer skipped")
    return None, None, None
  from collapse_jax.families.lm import hf
  torch.manual_seed(0)
  model = transformers.OPTForCausalLM(transformers.OPTConfig(**hf.config_to_hf(cfg))).eval()
  kw = dict(max_new_tokens=dcfg.max_new_tokens, min_new_tokens=dcfg.min_new_tokens, pad_token_id=cfg.pad_token_id)
  if dcfg.method == "beam":
    kw.update(num_beams=dcfg.num_beams, repetition_penalty=dcfg.repetition_penalty, do_sample=False)
  else:
    kw.update(do_sample=True, top_k=dcfg.top_k, top_p=dcfg.top_p)

  def make(b):
    x, m = torch.tensor(ids[:b], dtype=torch.long), torch.tensor(mask[:b], dtype=torch.long)

    def run():
      with torch.no_grad():
        return model.generate(x, attention_mask=m, **kw)
    return run

  best = None
  for b in (b for b in batches if b <= ids.shape[0]):
    run = make(b)
    run()
    secs = common.alternate({"hf": run}, 1)["hf"][0]
    print(f"  hf batch {b}: {b * dcfg.max_new_tokens / secs:.1f} new tokens/s", flush=True)
    if best is None or b / secs > best[0] / best[1]:
      best = (b, secs)
  desc = f"hf generate (torch {torch.__version__} {torch.get_num_threads()} threads, transformers " \
         f"{transformers.__version__})"
  return make(best[0]), best[0], desc


def best_jax(cfg, params, dcfg, ids, mask, batches):
  """JAX at the best of `batches` prompts per batch (each compiled, then timed once), as HF gets its best batch."""
  best = None
  for b in (b for b in batches if ids.shape[0] % b == 0):
    run = jax_runner(cfg, params, dcfg, ids, mask, b)
    first = common.alternate({"jax": run}, 1)["jax"][0]
    secs = common.alternate({"jax": run}, 1)["jax"][0]
    print(f"  jax batch {b}: {ids.shape[0] * dcfg.max_new_tokens / secs:.1f} new tokens/s", flush=True)
    if best is None or secs < best[2]:
      best = (run, b, secs, first)
  return best[0], best[1], best[3] - best[2]


def bench_method(cfg, params, n_params, name, args, ids, mask):
  dcfg = METHODS[name]
  run_jax, jax_batch, compile_s = best_jax(cfg, params, dcfg, ids, mask, [int(b) for b in args.batch.split(",")])
  fns = {"jax": run_jax}
  run_hf, hf_batch, hf_desc = hf_runner(cfg, dcfg, ids, mask, [int(b) for b in args.hf_batches.split(",")], args) \
      if args.hf else (None, None, None)
  if run_hf is not None:
    fns["hf"] = run_hf
  state = common.wait_quiet(args, f"decode {args.shape} {name}")
  times = common.alternate(fns, args.rounds)
  new = dcfg.max_new_tokens
  devices = jax.devices()
  shape = f"{args.shape} ({SHAPES[args.shape]['size']}, {args.prompt}+{new} tokens)"
  rows = []
  for impl, rows_n, batch in (("jax", ids.shape[0], jax_batch), ("hf", hf_batch, hf_batch)):
    if impl not in fns:
      continue
    st = common.summary(times[impl])
    flops, nbytes = cost(cfg, n_params, rows_n, batch, args.prompt, dcfg)
    # The same peak for both sides: on a CPU both use every core; on a GPU both use one device.
    peak = hardware.peak(devices[0])
    pf = peak.flops(cfg.dtype) if peak else None
    bw = peak.hbm_bytes_per_s if peak else None
    rows.append({"shape": shape, "impl": "jax decode_corpus" if impl == "jax" else hf_desc, "method": name,
                 "batch": batch, "rows": rows_n, **st, "new_tokens_per_s": rows_n * new / st["median_s"],
                 "compile_s": round(compile_s, 2) if impl == "jax" else None,
                 "mfu": flops / st["median_s"] / pf if pf else None,
                 "hbm_bw_util": nbytes / st["median_s"] / bw if bw else None})
  if len(rows) == 2:
    rows[0].update(common.ratio(times["jax"], times["hf"], ids.shape[0] * new, hf_batch * new))
  return rows, state


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
  ap.add_argument("--methods", default=",".join(METHODS))
  ap.add_argument("--rows", type=int, default=256, help="prompts decoded per timed call")
  ap.add_argument("--batch", default="16,32,64",
                  help="JAX prompts per batch (lax.map over rows / batch): the best of these comma-separated sizes")
  ap.add_argument("--prompt", type=int, default=64)
  ap.add_argument("--hf", action="store_true", help="also time HF generate (needs torch + transformers)")
  ap.add_argument("--hf_batches", default="1,8,32,64")
  common.add_args(ap)
  args = ap.parse_args(argv)
  common.check_rounds(args)
  cfg = sizes.get_size(SHAPES[args.shape]["size"], dtype="float32", dropout=0.0)
  params = opt.init_params(cfg, jax.random.key(0))
  n_params = sizes.count_params(params)
  ids, mask = prompts(cfg, args.rows, args.prompt)
  out = []
  for name in args.methods.split(","):
    rows, state = bench_method(cfg, params, n_params, name, args, ids, mask)
    out += common.report(f"decode ({args.shape}, {name}): new tokens/s", rows,
                         ["impl", "batch", "rows", "new_tokens_per_s", "median_s", "spread", "compile_s", "mfu",
                          "hbm_bw_util", "ratio"], state)
  return out


if __name__ == "__main__":
  main()
