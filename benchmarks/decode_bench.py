"""New tokens per second of collapse_jax.decode (one compiled program per corpus) and, optionally, of Hugging Face
`generate` on the same shape in the same run: 5-beam search with repetition penalty 3.0 (the paper's setting) and
sampling (top-k 50, top-p 0.95), 64-token prompts continued by 64 new tokens (min = max new tokens, so both sides
do exactly the same number of steps), random weights.

  .venv/bin/python benchmarks/decode_bench.py                          # small CPU shape, JAX only
  /work/hfenv/bin/python benchmarks/decode_bench.py --hf               # + HF generate at its best batch
  /work/hfenv/bin/python benchmarks/decode_bench.py --shape opt125m --hf --rows 8 --batch 8 --hf_batches 4,8 \
      --repeats 1

"New tokens" counts the continuation tokens returned (64 per prompt), not beam hypotheses. JAX: compile time is
reported apart; the timed call is a second call of the compiled program, ended by block_until_ready. HF: each
batch size of --hf_batches runs once untimed (warm-up) and once timed; the best is reported.
"""
import argparse
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from collapse_jax import decode  # noqa: E402
from collapse_jax.models import opt  # noqa: E402

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


def bench_jax(cfg, params, name, dcfg, ids, mask, batch, repeats):
  lm = decode.opt_lm(cfg)
  run = lambda: jax.block_until_ready(  # noqa: E731
      decode.decode_corpus(lm, params, ids, mask, dcfg, jax.random.key(0), batch_size=batch)["tokens"])
  t = time.perf_counter()
  run()
  first = time.perf_counter() - t
  secs, _ = common.timed(lambda: run(), repeats=repeats)
  return {"impl": "jax decode_corpus", "method": name, "batch": batch, "rows": ids.shape[0],
          "compile_s": round(first - secs, 2), "seconds": round(secs, 3),
          "new_tokens_per_s": ids.shape[0] * dcfg.max_new_tokens / secs}


def bench_hf(cfg, name, dcfg, ids, mask, batches):
  import torch
  import transformers
  from collapse_jax import hf
  torch.manual_seed(0)
  model = transformers.OPTForCausalLM(transformers.OPTConfig(**hf.config_to_hf(cfg))).eval()
  kw = dict(max_new_tokens=dcfg.max_new_tokens, min_new_tokens=dcfg.min_new_tokens, pad_token_id=cfg.pad_token_id)
  if dcfg.method == "beam":
    kw.update(num_beams=dcfg.num_beams, repetition_penalty=dcfg.repetition_penalty, do_sample=False)
  else:
    kw.update(do_sample=True, top_k=dcfg.top_k, top_p=dcfg.top_p)
  best = None
  for b in batches:
    if b > ids.shape[0]:
      continue
    x, m = torch.tensor(ids[:b], dtype=torch.long), torch.tensor(mask[:b], dtype=torch.long)
    with torch.no_grad():
      model.generate(x, attention_mask=m, **kw)
      t = time.perf_counter()
      model.generate(x, attention_mask=m, **kw)
    secs = time.perf_counter() - t
    row = {"impl": f"hf generate (torch {torch.__version__}, {torch.get_num_threads()} threads)", "method": name,
           "batch": b, "rows": b, "seconds": round(secs, 3), "new_tokens_per_s": b * dcfg.max_new_tokens / secs}
    print(f"  hf {name} batch {b}: {row['new_tokens_per_s']:.1f} new tokens/s", flush=True)
    if best is None or row["new_tokens_per_s"] > best["new_tokens_per_s"]:
      best = row
  return best


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
  ap.add_argument("--methods", default=",".join(METHODS))
  ap.add_argument("--rows", type=int, default=256, help="prompts decoded per timed call")
  ap.add_argument("--batch", type=int, default=64, help="JAX prompts per batch (lax.map over rows / batch)")
  ap.add_argument("--prompt", type=int, default=64)
  ap.add_argument("--repeats", type=int, default=2, help="timed JAX calls (best is reported)")
  ap.add_argument("--hf", action="store_true", help="also time HF generate (needs torch + transformers)")
  ap.add_argument("--hf_batches", default="1,8,32,64")
  args = ap.parse_args()
  cfg = opt.get_size(SHAPES[args.shape]["size"], dtype="float32", dropout=0.0)
  params = opt.init_params(cfg, jax.random.key(0))
  ids, mask = prompts(cfg, args.rows, args.prompt)
  rows = []
  for name in args.methods.split(","):
    dcfg = METHODS[name]
    r = bench_jax(cfg, params, name, dcfg, ids, mask, args.batch, args.repeats)
    print(f"  jax {name}: {r['new_tokens_per_s']:.1f} new tokens/s (compile {r['compile_s']} s)", flush=True)
    rows.append(r)
    if args.hf:
      h = bench_hf(cfg, name, dcfg, ids, mask, [int(b) for b in args.hf_batches.split(",")])
      if h is not None:
        r["vs_hf"] = r["new_tokens_per_s"] / h["new_tokens_per_s"]
        rows.append(h)
  for r in rows:
    r["shape"] = f"{args.shape} ({SHAPES[args.shape]['size']}, {args.prompt}+64 tokens)"
  common.report("decode: new tokens/s", rows, ["shape", "impl", "method", "batch", "rows", "compile_s", "seconds",
                                               "new_tokens_per_s", "vs_hf"])


if __name__ == "__main__":
  main()
