"""The paper's LM recursion: OPT trained on the text the previous generation wrote (offline Markov text by default).

OPT trained on fixed-length blocks of tokens; every generation continues each block of its own training set by
block_len new tokens (5-way beam search, repetition penalty 3.0) and those new tokens are the next generation's
training blocks. replace: 5 epochs, no real data kept; real_fraction: 10 epochs, 10% of each
training set drawn afresh from the real blocks.

Offline default (no download): a synthetic first-order Markov language with Zipfian unigrams (data/markov.py),
train/valid/test blocks drawn on device by fixed keys, a tiny OPT trained from scratch, so every metric is also
exact against the true source (true log-likelihood of generated text, KL(source || model), tail mass kept).
  python -m collapse_jax.main --config=configs/lm.py --workdir=runs/lm   # 5 generations; wall time below
  python -m collapse_jax.main --config=configs/lm.py:real_fraction --workdir=runs/lm_rf
Variants (comma separated, e.g. configs/lm.py:scratch_wikitext2,real_fraction):
  markov             the offline default above
  ci                 the same, much smaller (tests: 8-token blocks, 2 beams, 2 epochs, 3 generations)
  opt_wikitext2      the paper's setting: a local facebook/opt-125m folder (`huggingface-cli download
                     facebook/opt-125m --local-dir DIR`, or its HF cache models--facebook--opt-125m folder) and the
                     wikitext-2-raw-v1 files wiki.{train,valid,test}.raw in one directory (from the
                     wikitext-2-raw-v1.zip of the WikiText release, or `datasets.load_dataset("wikitext",
                     "wikitext-2-raw-v1")` written out line by line); 64+64 tokens, 5 epochs, batch 128, lr 2e-5,
                     5 beams, repetition penalty 3.0; a GPU/TPU is needed (36,864 blocks x 5 beams per generation):
                       --config=configs/lm.py:opt_wikitext2 --config.lm.hf_path=OPT_DIR \
                       --config.lm.text.path=WIKITEXT_DIR
                     Trains on the first 36,864 blocks of the training split (a multiple of the batch; the split
                     has about 37.5k): to use every block, set lm.text.train_blocks=0 and samples.n to the count
                     the run's first error message gives. Expected: generation 0 (fine-tuned from the pretrained
                     model) reaches a real test perplexity near 34; it rises over the generations, and the data
                     of later generations score lower perplexity under generation 0 with a long tail (paper Fig. 1).
  size=NAME          with opt_wikitext2: the recursion at OPT size NAME (opt-125m, opt-1.3b, opt-6.7b, opt-13b, opt-30b,
                     opt-66b; lm.hf_path = facebook/NAME's folder) with the mesh and remat found to fit by the plan
                     (WORKSPACE.md "Scale"; the slice each was planned for is in SCALE below). Plan first, no
                     weights needed: `collapse-jax --config=lm:opt_wikitext2,size=opt-1.3b --plan=v5e-8`; then on
                     the slice: `launch/run_tpu.sh lm:opt_wikitext2,size=opt-1.3b gs://.../run
                     --config.lm.hf_path=... --config.lm.text.path=...`.
  scratch_wikitext2  a tiny OPT from scratch on wikitext-2 in --config.lm.text.path=DIR (wiki.*.raw or valid.txt /
                     test.txt; required): the valid split as the training text (lm.text.train_split, small enough
                     for a CPU), its last 5% of blocks held out for validation, the test split as the test set, a
                     byte-level BPE trained on the training text (3,840 training blocks on the valid.txt measured
                     below; with other files the first error gives the count for --config.samples.n).
                     2 CPU cores: ~5 min per generation with --config.lm.text.train_blocks=1024
                     --config.samples.n=1024 (all 3,840 blocks take ~4x longer); generation 0 reached a real
                     test perplexity of 634 (real_fraction) / 862 (replace), rising over the generations while the
                     generated blocks score ever lower perplexity under generation 0 (WORKSPACE.md has the table;
                     measured when valid.txt was read as plain lines, whitespace-only ones kept: 3,859 blocks).
  real_fraction      regime real_fraction 0.1 with 10 epochs (the paper's second setting)
  accumulate         regime accumulate (prompts: samples.n blocks drawn from the training set)
Outputs: metrics.jsonl (test_ppl, data_ppl0_* = perplexity of each generation's training blocks under
generation 0, gen_distinct_n / gen_rep_n, and on the Markov language test_kl, gen_true_loglik, gen_tail_*),
plots/lm_metrics.png, plots/lm_data_ppl0.png (the paper's Fig. 1b/c), samples/gen_NNNN.txt (fixed real prompts
continued by each generation). samples.n must equal the number of training blocks (the run says so if not).
Measured (python -m benchmarks.results --only lm; commit d8d0b1c, 2026-12-07):
Machine: Intel(R) Xeon(R) Processor (avx512), 2 cores, jax 0.10.2, jaxlib 0.10.2.
Wall time 28.5 s, 5 generations (`--config=lm`; start-up and compilation included; others' load 0.0 cores).

| generation | 0 | 1 | 2 | 3 | 4 |
|---|---|---|---|---|---|
| real test perplexity [test_ppl] | 39.33 | 100.5 | 112.8 | 119.5 | 109.4 |
| training data's perplexity under gen 0 (mean) [data_ppl0_mean] | 39.63 | 61.29 | 105.3 | 92.2 | 107.2 |
| training data's perplexity under gen 0 (95th pct) [data_ppl0_q95] | 80.34 | 72.53 | 125.4 | 113.9 | 129.5 |
| training data's perplexity under gen 0 (median) [data_ppl0_q50] | 35.4 | 60.78 | 104.8 | 90.82 | 108 |
| KL(source ‖ model) per token [test_kl] | 2.111 | 3.045 | 3.149 | 3.207 | 3.121 |
| tail tokens' mass kept [gen_tail_token_frac] | 0.07498 | 0.1849 | 0.03395 | 0.02716 | 0.02716 |
| impossible bigrams (share) [gen_impossible] | 0.3132 | 0.5964 | 0.5153 | 0.6103 | 0.558 |
| repeated bigrams in a block [gen_rep_2] | 0 | 0 | 0 | 0 | 0 |
(end of measured block lm)
Measured (python -m benchmarks.results --only lm_real_fraction; commit d8d0b1c, 2026-12-07):
Machine: Intel(R) Xeon(R) Processor (avx512), 2 cores, jax 0.10.2, jaxlib 0.10.2.
Wall time 33.1 s, 5 generations (`--config=lm:real_fraction`; start-up and compilation included; others' load 0.0 cores).

| generation | 0 | 1 | 2 | 3 | 4 |
|---|---|---|---|---|---|
| real test perplexity [test_ppl] | 18.28 | 34.05 | 50.73 | 62.05 | 62.23 |
| training data's perplexity under gen 0 (mean) [data_ppl0_mean] | 17.37 | 15.85 | 6.892 | 4.771 | 4.959 |
| training data's perplexity under gen 0 (95th pct) [data_ppl0_q95] | 34.64 | 25.44 | 24.11 | 22.62 | 25.52 |
| training data's perplexity under gen 0 (median) [data_ppl0_q50] | 15.57 | 18.93 | 2.183 | 2.183 | 2.183 |
| KL(source ‖ model) per token [test_kl] | 1.344 | 1.93 | 2.333 | 2.533 | 2.538 |
| tail tokens' mass kept [gen_tail_token_frac] | 0.05052 | 0 | 0 | 0.008461 | 0 |
| impossible bigrams (share) [gen_impossible] | 0.1154 | 0.03375 | 0.0119 | 0.01337 | 0.01685 |
| repeated bigrams in a block [gen_rep_2] | 0.2454 | 0.8013 | 0.9131 | 0.9228 | 0.9179 |
(end of measured block lm_real_fraction)
The source's best perplexity, exp(entropy rate), is 4.7: generation 0 is a weak model. In the default (replace,
5 epochs) run the real test perplexity and KL to the source jump after generation 0 and stay high; the generated
blocks repeat no bigram (rep-2 is 0: the repetition penalty also discourages the language's self-loops) and a
large share of their bigrams are impossible under the source, so, unlike the paper's wikitext result, generated
data score *higher* perplexity under generation 0 than the real data. :real_fraction (10 epochs) trains better
models and shows the paper's picture: real test perplexity and KL rise over the generations while from
generation 2 the generated data's median perplexity under generation 0 falls far below the real data's, its
95th percentile staying high (a long tail), and rep-2 rises towards 1. In both, the tail tokens' mass kept is
small at generation 0 and smaller still by generation 4. Float32 training amplifies CPU differences: the blocks'
figures reproduce on the CPU they name.
"""
import ml_collections

from collapse_jax.config import base_config, variants
from collapse_jax.errors import ConfigError

VARIANTS = ("markov", "ci", "opt_wikitext2", "size=NAME", "scratch_wikitext2", "real_fraction", "accumulate")

def _lm_fields() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      data="markov",               # markov | text
      block_len=32,                # tokens per block; each generation adds exactly block_len new tokens per block
      init="scratch",              # scratch: OPT size `model` from init_seed; hf: the folder hf_path
      model="tiny",
      model_overrides=dict(hidden_size=64, num_layers=2, num_heads=4, ffn_dim=256, max_position_embeddings=64),
      hf_path="",
      dtype="float32",             # compute dtype (parameters are float32); bfloat16 on accelerators
      dropout=0.1,                 # OPT's
      init_seed=0,
      start="initial",             # each generation fine-tunes the initial model (the paper) | previous
      prompts="own",               # own: this generation's training blocks (the paper) | real: the real blocks
      epochs=5, batch_size=32, eval_batch=64, lr=1e-3, end_lr=1e-5, warmup_steps=0, weight_decay=0.0,
      grad_clip=0.0,
      decode=dict(method="beam", num_beams=5, repetition_penalty=3.0, min_new_tokens=-1,  # -1: block_len
                  temperature=1.0, top_k=0, top_p=1.0, length_penalty=1.0, early_stopping=False),
      decode_batch=64,             # prompts per decoding batch (a multiple of the mesh's batch shards)
      text_samples=8,              # fixed real test prompts continued by each generation -> samples/gen_NNNN.txt
      mesh_fsdp=1,                 # devices per 'fsdp' group (parameters split over them, ZeRO-3)
      mesh_tensor=1,               # devices per 'tensor' group (heads, MLP, vocabulary split); the rest: 'data'
      remat="none",                # activations recomputed in the backward pass: none | dots (matmuls kept) | full
      scan_layers=True,            # layers as one lax.scan (compile time flat in depth) | False: unrolled
      markov=dict(vocab=256, branching=8, zipf_exponent=1.0, seed=0, concentration=1.0, data_seed=0,
                  train_blocks=512, valid_blocks=64, test_blocks=128, tail_fraction=0.5),
      text=dict(kind="files",      # wikitext: wiki.{train,valid,test}.raw in `path` | files: the *_files below
                path="",             # wikitext: the directory (wiki.{train,valid,test}.raw or {split}.txt)
                train_split="train", # wikitext: the split trained on (valid: scratch_wikitext2's smaller text)
                train_files="", valid_files="", test_files="",  # files: comma-separated paths
                tokenizer="bytes",   # hf (the OPT folder's) | bytes | bpe (trained on the training text)
                tokenizer_path="", bpe_vocab=8192, cache_dir="",
                holdout=0.05,        # without a valid split: this share of the training blocks validates
                train_blocks=0,      # the first N training blocks only (0: all)
                # --plan without the files: the valid/test block counts to assume (0: read the files)
                valid_blocks=0, test_blocks=0),
  ))


def get_config(arg: str | None = None):
  c = base_config()
  c.family = "lm"
  c.seed = 0
  c.generations = 5
  c.chains = 1
  c.checkpoint_every = 1           # one compiled generation, reused; a checkpoint after each
  c.regime.name = "replace"
  c.snapshot_size = 0              # the continuations of fixed prompts go to samples/ instead
  c.lm = _lm_fields()
  # Applied in VARIANTS order whatever the argument's: size after opt_wikitext2 (whose model it replaces),
  # real_fraction after the data variants (whose epochs it overrides).
  flags, values = variants(arg, VARIANTS)
  if "ci" in flags:
    c.generations = 3
    c.lm.update(block_len=8, epochs=2, batch_size=8, eval_batch=8, decode_batch=8, text_samples=4, lr=3e-3)
    c.lm.model_overrides.update(hidden_size=32, num_layers=1, num_heads=2, ffn_dim=64, max_position_embeddings=16)
    c.lm.decode.num_beams = 2
    c.lm.markov.update(vocab=48, branching=4, train_blocks=28, valid_blocks=8, test_blocks=8)
  if "opt_wikitext2" in flags:
    c.generations = 10
    c.lm.update(data="text", block_len=64, init="hf", model="opt-125m", epochs=5, batch_size=128,
                eval_batch=128, lr=2e-5, end_lr=1e-6, decode_batch=128, text_samples=16)
    c.lm.text.update(kind="wikitext", tokenizer="hf", train_blocks=36864, **_WIKITEXT2_EVAL_BLOCKS)
  if "size" in values:
    if values["size"] not in SCALE:
      raise ConfigError(f"config variant size=NAME takes one of {', '.join(SCALE)}, got {values['size']!r}")
    c.lm.update(model=values["size"], **SCALE[values["size"]])
  if "scratch_wikitext2" in flags:
    c.lm.update(data="text", block_len=64, epochs=5, batch_size=32, eval_batch=64, decode_batch=64, lr=1e-3)
    c.lm.model_overrides.update(hidden_size=128, num_layers=2, num_heads=4, ffn_dim=512,
                                max_position_embeddings=128, vocab_size=8192)
    c.lm.text.update(kind="wikitext", train_split="valid", tokenizer="bpe", bpe_vocab=8192)
  if "accumulate" in flags:
    c.regime.name = "accumulate"
  if "real_fraction" in flags:
    c.regime.name, c.regime.real_fraction = "real_fraction", 0.1
    c.lm.epochs = 10
  # samples.n: one new block per training block (the family refuses any other count, naming the right one).
  if c.lm.data == "markov":
    c.samples.n = c.lm.markov.train_blocks
  else:
    c.samples.n = c.lm.text.train_blocks or _SCRATCH_WIKITEXT2_BLOCKS
  return c


# opt_wikitext2 under --plan without the files: wikitext-2-raw's validation and test splits in 64-token blocks of
# OPT's (GPT-2's) BPE, about 255k and 288k tokens (the test split's 287,644 tokens as HF's perplexity guide counts
# them; the validation split scaled by its word count), rounded up to whole batches of 128.
_WIKITEXT2_EVAL_BLOCKS = dict(valid_blocks=3968, test_blocks=4608)

# size=NAME: the paper's recursion at another OPT size (init='hf' from facebook/NAME's folder, lm.hf_path), with
# the mesh and remat that `collapse-jax --plan` finds to fit the slice named (WORKSPACE.md, "Scale"); on other
# slices override lm.mesh_fsdp / lm.mesh_tensor / lm.remat from the plan there.
SCALE = {
    "opt-125m": dict(dtype="float32"),                                                 # any: fits one chip
    "opt-1.3b": dict(dtype="bfloat16", mesh_fsdp=8),                                   # v5e-8
    "opt-6.7b": dict(dtype="bfloat16", mesh_fsdp=4),                                   # v5p-8
    "opt-13b": dict(dtype="bfloat16", mesh_fsdp=64),                                   # v5e-64
    "opt-30b": dict(dtype="bfloat16", mesh_fsdp=32),                                   # v5p-64
    "opt-66b": dict(dtype="bfloat16", mesh_fsdp=64, mesh_tensor=4, remat="full"),      # v5e-256
}

# 64-token blocks of the wikitext-2 valid.txt of the figures above (the tokens version, 1,121,681 bytes) read as
# wikitext (whitespace-only lines empty) under its 8192-id BPE: 4,042, less the 5% held out for validation (202);
# measured with collapse_jax.families.lm.data on 2026-12-07 (test.txt: 4,905 blocks).
_SCRATCH_WIKITEXT2_BLOCKS = 3840
