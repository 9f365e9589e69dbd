"""The paper's LM experiment as a family: OPT fine-tuned on fixed-length blocks of token ids, each generation's
synthetic corpus made by continuing blocks with the model's own decoder.

Datum: one block of `block_len` token ids (int32). Generation 0 trains the initial model (an HF OPT folder, or an
OPT size from scratch; it lives in `shared`, FSDP-sharded) on the real training blocks; generation g >= 1 starts
again from the initial model (config lm.start='initial', the paper's way) or from generation g-1's ('previous').
`fit` is lm_train's pure epoch (`train_epoch`) in a lax.scan over epochs, the model best on validation perplexity
kept (the paper's rule). `sample` continues blocks by exactly block_len new tokens with decode.decode_corpus (by
default 5-way beam search, repetition penalty 3.0, no early EOS), and the new tokens are the next generation's
blocks. Prompts (lm.prompts): 'own' (the paper's): every block of this generation's training set, so
samples.n must equal the number of training blocks; in accumulating regimes the training set is larger than
samples.n and the prompts are samples.n of its valid blocks drawn uniformly without replacement. 'real': the
real training blocks every generation.

Accumulating regimes hand `fit` a buffer of static capacity whose first rows are valid: lm_train's epoch
batches only the valid rows, skips the steps past them, and the cosine runs over the valid rows' step count,
so a generation trains exactly as on its valid rows alone.

Metrics per generation: real test perplexity (`test_ppl`), the kept epoch's validation perplexity, its epoch and
the last epoch's training loss; the perplexity of every training block of this generation under the generation-0
model (`data_ppl0_*`: mean and quantiles, and `data_logppl0_hist`, a fixed-bin density of log-perplexity: the
paper's Fig. 1b/c); distinct-n (distinct n-grams / all n-grams of the generated corpus) and rep-n (share of a
block's n-grams that repeat an earlier one in the same block) of the new tokens; on the synthetic Markov language
(data/markov.py) the exact ones: true log-likelihood per new token given its predecessor (`gen_true_loglik`,
`gen_impossible`), KL(source || model) per token on the real test contexts (`test_kl`), and the true token and
bigram mass, overall and in the tail, that the generated corpus still holds. `text_continuations`: a fixed set of
real test prompts (lm.text_samples) continued by each generation, written to workdir/samples/gen_NNNN.txt.
"""
import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from collapse_jax import family, paths, sharding
from collapse_jax.families.lm import decode
from collapse_jax.families.lm import train as lm_train
from collapse_jax.errors import ConfigError
from collapse_jax.families.lm import model as opt_model
from collapse_jax.families.lm.text_metrics import masked_quantiles, ngram_rates

DATA, INITS, STARTS, PROMPTS = ("markov", "text"), ("scratch", "hf"), ("initial", "previous"), ("own", "real")
NGRAMS = (2, 4)
QUANTILES = (0.05, 0.5, 0.95)
HIST_BINS = 60


def _fail(field, want, value):
  raise ConfigError(f"config.lm.{field} must be {want}, got {value!r}")


def _is_int(v):
  return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v):
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def decode_config(c) -> decode.DecodeConfig:
  """lm.decode as decode.py's config: exactly block_len new tokens unless min_new_tokens says fewer may do."""
  d = c.decode
  if d.method not in decode.METHODS:
    raise ConfigError(f"config.lm.decode.method={d.method!r} is not one of {', '.join(decode.METHODS)}")
  m = c.block_len if d.min_new_tokens < 0 else d.min_new_tokens
  return decode.DecodeConfig(method=d.method, max_new_tokens=c.block_len, min_new_tokens=m, num_beams=d.num_beams,
                             temperature=d.temperature, top_k=d.top_k, top_p=d.top_p,
                             repetition_penalty=d.repetition_penalty, length_penalty=d.length_penalty,
                             early_stopping=d.early_stopping)


def _check_samples_n(samples_n, n_blocks):
  if samples_n != n_blocks:
    raise ConfigError(f"config.samples.n={samples_n} but the LM continues each of its {n_blocks} training blocks "
                      f"into one new block: set config.samples.n={n_blocks}")


class LMFamily(family.Family):
  name = "lm"
  vmap_chains = False

  # --- config ---------------------------------------------------------------------------------------------------
  @classmethod
  def parse(cls, run, c):
    if c is None:
      raise ConfigError("config.lm is missing (use configs/lm.py)")
    if run.samples.schedule != "fixed":
      raise ConfigError(f"config.samples.schedule={run.samples.schedule!r}: the LM continues samples.n blocks "
                        "every generation, so only 'fixed' can run")
    for field, choices in (("data", DATA), ("init", INITS), ("start", STARTS), ("prompts", PROMPTS)):
      if c[field] not in choices:
        _fail(field, f"one of {', '.join(choices)}", c[field])
    if not _is_int(c.block_len) or c.block_len < 2:
      _fail("block_len", "an integer >= 2", c.block_len)
    for field, lo in (("epochs", 1), ("batch_size", 1), ("eval_batch", 1), ("decode_batch", 1), ("mesh_fsdp", 1),
                      ("mesh_tensor", 1),
                      ("text_samples", 0), ("warmup_steps", 0), ("init_seed", 0)):
      if not _is_int(c[field]) or c[field] < lo:
        _fail(field, "a positive integer" if lo else "a non-negative integer", c[field])
    for field in ("lr", "end_lr", "weight_decay", "grad_clip", "dropout"):
      if not _is_num(c[field]) or c[field] < 0 or (field == "lr" and c[field] == 0):
        _fail(field, "> 0" if field == "lr" else ">= 0", c[field])
    if c.dtype not in opt_model.DTYPES:
      _fail("dtype", f"one of {', '.join(opt_model.DTYPES)}", c.dtype)
    if c.remat not in opt_model.REMAT:
      _fail("remat", f"one of {', '.join(opt_model.REMAT)}", c.remat)
    if not isinstance(c.scan_layers, bool):
      _fail("scan_layers", "True or False", c.scan_layers)
    if c.init == "scratch" and c.model not in opt_model.SIZES:
      _fail("model", f"an OPT size ({', '.join(opt_model.SIZES)}) for init='scratch'", c.model)
    if c.data == "text" and c.text.tokenizer not in ("hf", "bytes", "bpe"):
      _fail("text.tokenizer", "one of hf, bytes, bpe", c.text.tokenizer)
    if c.data == "markov":  # known without drawing the data
      _check_samples_n(run.samples.n, c.markov.train_blocks)
    dcfg = decode_config(c)  # names config.lm.decode.method itself
    try:
      dcfg.validate()
    except ConfigError as e:
      raise ConfigError(f"config.lm.decode: {e}") from None
    return c

  def __init__(self, run, c, mesh, abstract: bool = False):
    """abstract (plan mode): shapes only; no weights are read, nor data where lm_plan.block_counts can say."""
    super().__init__(run, c, mesh, abstract)
    self.cfg_samples, self.cfg_n_real = run.samples.n, run.n_real
    shards = sharding.batch_shards(mesh)
    for field in ("batch_size", "eval_batch", "decode_batch"):
      if c[field] % shards:
        raise ConfigError(f"config.lm.{field}={c[field]} must be a multiple of the {shards} batch shards "
                          f"({' x '.join(sharding.batch_axes(mesh))})")
    self.model_cfg = self._model_config()
    self.dcfg = decode_config(c)
    try:
      self.dcfg.validate(prompt_len=c.block_len, cache_len=self.model_cfg.max_position_embeddings)
    except ConfigError as e:
      raise ConfigError(f"config.lm.block_len={c.block_len}: {e}") from None
    self.lm = decode.opt_lm(self.model_cfg)
    self.tcfg = lm_train.TrainConfig(lr=c.lr, end_lr=c.end_lr, warmup_steps=c.warmup_steps,
                                     weight_decay=c.weight_decay, grad_clip=c.grad_clip, batch_size=c.batch_size,
                                     epochs=c.epochs, eval_batch=c.eval_batch, verbose=False)
    self.datum_shape = (c.block_len,)
    self.markov = c.data == "markov"
    self.metric_names = ("test_ppl", "data_ppl0_mean", "data_ppl0_q50", "data_ppl0_q95", "data_ppl0_q05",
                         "valid_ppl", "train_loss", "best_epoch", *(f"gen_distinct_{n}" for n in NGRAMS),
                         *(f"gen_rep_{n}" for n in NGRAMS))
    if self.markov:
      self.metric_names += ("test_kl", "gen_true_loglik", "gen_impossible", "gen_tail_token_frac",
                            "gen_tail_bigram_frac", "gen_token_mass", "gen_bigram_mass")
    self._data = None

  def _model_config(self) -> opt_model.OPTConfig:
    c = self.c
    if c.init == "hf" and not c.hf_path and not (self.abstract and c.model in opt_model.SIZES):
      _fail("hf_path", "the local Hugging Face OPT folder for init='hf' (e.g. from `huggingface-cli download "
            "facebook/opt-125m`)", c.hf_path)
    if c.init == "hf" and c.hf_path:  # only config.json is read here; the weights are read by `shared`
      from collapse_jax.families.lm import hf
      path = os.path.join(hf.resolve_dir(c.hf_path), hf.CONFIG_JSON)
      try:
        with open(path) as fh:
          mc = hf.config_from_hf(json.load(fh), path, c.dtype)
      except (OSError, ValueError) as e:
        raise ConfigError(f"config.lm.hf_path: {path} is unreadable ({type(e).__name__})") from None
      return dataclasses.replace(mc, dropout=float(c.dropout), scan_layers=c.scan_layers, remat=c.remat)
    run = dict(dtype=c.dtype, dropout=float(c.dropout), scan_layers=c.scan_layers, remat=c.remat)
    if c.init == "hf":  # planning without the folder: the published size has HF's config.json's shapes
      return opt_model.get_size(c.model, **run)
    over = dict(c.model_overrides)
    if c.data == "markov":  # the vocabulary is the language's plus OPT's four specials
      over["vocab_size"] = c.markov.vocab + 4
    elif "vocab_size" not in over:  # from scratch on text: the tokenizer's size (a trained BPE may use fewer)
      over["vocab_size"] = {"bytes": 258, "bpe": c.text.bpe_vocab}.get(c.text.tokenizer, 50272)
    return opt_model.get_size(c.model, **run, **over)

  # --- data (host side, loaded once, before anything is compiled) -----------------------------------------------
  def _load(self) -> dict:
    if self._data is not None:
      return self._data
    c = self.c
    d = self._load_markov() if self.markov else self._load_text()
    n = len(d["train"])
    if self.cfg_n_real and self.cfg_n_real != n:
      raise ConfigError(f"config.n_real={self.cfg_n_real} but the LM data give {n} training blocks; leave it at 0")
    _check_samples_n(self.cfg_samples, n)
    if c.text_samples > len(d["test"]):
      _fail("text_samples", f"<= the {len(d['test'])} test blocks", c.text_samples)
    lm_train.validate(self.tcfg, self.model_cfg, lm_train.as_blocks(d["train"], "train blocks"),
                      lm_train.as_blocks(d["valid"], "valid blocks"), self.mesh)
    d["prompts"] = d["test"][:c.text_samples]
    self._data = d
    return d

  def _load_markov(self) -> dict:
    from collapse_jax.families.lm import markov
    m = self.c.markov
    src = markov.make_source(m.vocab, m.branching, m.zipf_exponent, m.seed, m.concentration)
    key = jax.random.PRNGKey(m.data_seed)
    draw = jax.jit(markov.sample_blocks, static_argnums=(1, 2))
    out = {s: np.asarray(draw(src, int(m[f"{s}_blocks"]), self.c.block_len, jax.random.fold_in(key, i)))
           for i, s in enumerate(("train", "valid", "test"))}
    return dict(out, source=src)

  def _load_text(self) -> dict:
    from collapse_jax.families.lm import text as text_lib
    t, c = self.c.text, self.c
    files = {s: [p for p in t[f"{s}_files"].split(",") if p] for s in ("train", "valid", "test")}
    if t.kind == "wikitext":
      source, splits = text_lib.wikitext(t.path), ("train", "valid", "test")
    else:
      source, splits = text_lib.TextSource("files", files={k: v for k, v in files.items() if v}), \
          tuple(s for s in ("train", "valid", "test") if files[s])
    for s in ("train", "test"):
      if s not in splits:
        _fail(f"text.{s}_files", "comma-separated text files for text.kind='files'", t[f"{s}_files"])
    tok_path = t.tokenizer_path or None
    if tok_path is None and c.init == "hf":  # OPT's tokenizer files sit beside its weights
      from collapse_jax.families.lm import hf
      tok_path = hf.resolve_dir(c.hf_path)
    tok = text_lib.tokenizer_for(t.tokenizer, source, path=tok_path,
                                 cache_dir=t.cache_dir or None, vocab_size=t.bpe_vocab)
    if tok.vocab_size > self.model_cfg.vocab_size:
      raise ConfigError(f"config.lm.text.tokenizer gives {tok.vocab_size} ids but the model has vocab_size "
                        f"{self.model_cfg.vocab_size} (set config.lm.model_overrides.vocab_size)")
    d = text_lib.load_splits(source, tok, c.block_len, t.cache_dir or None, splits)
    if "valid" not in d:  # no validation split: hold out the training split's last blocks
      k = max(1, int(round(t.holdout * len(d["train"]))))
      d["train"], d["valid"] = d["train"][:-k], d["train"][-k:]
    if t.train_blocks:
      if t.train_blocks > len(d["train"]):
        _fail("text.train_blocks", f"<= the {len(d['train'])} training blocks", t.train_blocks)
      d["train"] = d["train"][:t.train_blocks]
    return dict(d, tokenizer=tok)

  def load_data(self) -> family.Data:
    """The blocks (and the initial weights); in plan mode their shapes only (lm_plan)."""
    if self.abstract:
      from collapse_jax.families.lm import plan as lm_plan
      n = lm_plan.block_counts(self)[0]
      _check_samples_n(self.cfg_samples, n)
      return family.Data(n, lm_plan.abstract_shared(self))
    return family.Data(len(self._load()["train"]), self._shared())

  @property
  def dtype(self) -> str:  # plan mode's FLOP rate
    return self.model_cfg.dtype

  @property
  def plan_suggestions(self) -> list[str]:  # plan mode's refusal: what would make the run fit
    c = self.c
    return [f"more chips per weight: config.lm.mesh_fsdp (now {c.mesh_fsdp}) or config.lm.mesh_tensor (now "
            f"{c.mesh_tensor})", f"config.lm.remat=full (now {c.remat})",
            f"smaller config.lm.batch_size / eval_batch / decode_batch (now {c.batch_size} / {c.eval_batch} / "
            f"{c.decode_batch})", "or a chip with more HBM"]

  def step_programs(self, exp) -> list:
    from collapse_jax.families.lm import plan as lm_plan
    return lm_plan.step_programs(self, exp)

  def _shared(self):
    d = self._load()
    if self.c.init == "hf":
      from collapse_jax.families.lm import hf
      init = hf.load_opt(self.c.hf_path, self.c.dtype)[1]
    else:
      init = opt_model.init_params(self.model_cfg, jax.random.PRNGKey(self.c.init_seed))
    out = {"init": init, "train": d["train"], "valid": d["valid"], "test": d["test"], "prompts": d["prompts"]}
    return dict(out, source=d["source"]) if self.markov else out

  # --- shardings (loop hooks: family.py) -------------------------------------------------------------------------
  @classmethod
  def make_mesh(cls, run, c, devices=None):
    """('data', 'fsdp', 'tensor') over the devices (default: config.num_devices of the visible ones); 'data'
    takes what fsdp x tensor leaves."""
    devices = family.run_devices(run, devices)
    n, split = len(devices), c.mesh_fsdp * c.mesh_tensor
    if n % split:
      raise ConfigError(f"config.lm.mesh_fsdp={c.mesh_fsdp} x config.lm.mesh_tensor={c.mesh_tensor} "
                        f"does not divide the {n} devices")
    return sharding.make_lm_mesh(n // split, c.mesh_fsdp, c.mesh_tensor, devices)

  def _param_sh(self, params):
    return sharding.param_shardings(params, opt_model.logical_axes(params), self.mesh)

  def model_shardings(self, model):
    rep = sharding.replicated(self.mesh)
    return dict(jax.tree.map(lambda _: rep, model), params=self._param_sh(model["params"]))

  def shared_shardings(self, shared):
    rep = sharding.replicated(self.mesh)
    return dict(jax.tree.map(lambda _: rep, shared), init=self._param_sh(shared["init"]))

  # --- one generation --------------------------------------------------------------------------------------------
  def init_chain(self, key, shared):
    return shared["train"], {}

  def init_model(self, key, shared):
    z = jnp.zeros((), jnp.float32)
    return {"params": shared["init"], "train_loss": z, "valid_ppl": z, "best_epoch": jnp.zeros((), jnp.int32)}

  def _blocks(self, ids_NxL):
    # Tokens after an early EOS are pads: never trained on. Rows of weight 0 are left out by their users.
    return {"ids": ids_NxL, "mask": (ids_NxL != self.model_cfg.pad_token_id).astype(jnp.int32)}

  def _ppl(self, params, blocks):
    return lm_train.perplexity(params, blocks, model_cfg=self.model_cfg, eval_batch=self.c.eval_batch,
                               batch_sharding=sharding.batch_sharding(self.mesh))

  def fit(self, gen, key):
    x, w, g, prev_model, shared = gen.x, gen.w, gen.g, gen.prev, gen.shared
    init = shared["init"]
    start = init if self.c.start == "initial" else jax.tree.map(
        lambda a, b: jnp.where(g == 0, a, b), init, prev_model["params"])
    B, E, valid_N = self.tcfg.batch_size, self.tcfg.epochs, w > 0
    # The cosine runs over the valid rows' steps: a ragged buffer trains as its valid rows alone.
    tx = lm_train.make_optimizer(self.tcfg, E * lm_train.steps_per_epoch(x.shape[0], B),
                                 E * lm_train.steps_per_epoch(jnp.sum(valid_N, dtype=jnp.int32), B))
    state_sh = lm_train.state_shardings(start, jax.eval_shape(tx.init, start), self.mesh)
    state = lm_train.TrainState(jnp.zeros((), jnp.int32), start, tx.init(start), key)
    train, valid = self._blocks(x), self._blocks(shared["valid"])

    def epoch(carry, e):
      state, best, _ = carry
      state, m = lm_train.train_epoch(state, train, e, model_cfg=self.model_cfg, tx=tx,
                                      batch_size=B, batch_sharding=sharding.batch_sharding(self.mesh),
                                      state_shardings=state_sh, valid_N=valid_N, epochs=E)
      ppl = self._ppl(state.params, valid)
      better = ppl < best["valid_ppl"]  # NaN is never better: a diverged run keeps an earlier model
      new = {"params": state.params, "valid_ppl": ppl, "best_epoch": e + 1}
      best = jax.tree.map(lambda a, b: jnp.where(better, a, b), new, best)
      return (state, best, m["loss"]), None

    best = {"params": start, "valid_ppl": jnp.asarray(jnp.inf, jnp.float32), "best_epoch": jnp.int32(0)}
    carry = (state, best, jnp.zeros((), jnp.float32))
    (_, best, last_loss), _ = jax.lax.scan(epoch, carry, jnp.arange(self.tcfg.epochs, dtype=jnp.int32))
    return dict(best, train_loss=last_loss)  # the last epoch's training loss

  def _map_chunks(self, fn, ids_NxL, mask_NxL):
    """fn(ids_ExL, mask_ExL) -> per-row outputs, over eval_batch chunks (padded rows carry mask 0, dropped)."""
    n = ids_NxL.shape[0]
    E = lm_train.eval_chunk(n, self.c.eval_batch, sharding.batch_shards(self.mesh))
    C = -(-n // E)
    pad = lambda a: jnp.pad(a, ((0, C * E - n), (0, 0))).reshape(C, E, -1)  # noqa: E731
    bs = sharding.batch_sharding(self.mesh)
    out = jax.lax.map(lambda a: fn(*(jax.lax.with_sharding_constraint(t, bs) for t in a)),
                      (pad(ids_NxL), pad(mask_NxL)))
    return jax.tree.map(lambda o: o.reshape((C * E,) + o.shape[2:])[:n], out)

  def _block_nll(self, params, blocks):
    """(summed next-token NLL, predicted tokens) of every block, by lm_train's token_nll row by row."""
    def chunk(ids, mask):
      logits = opt_model.apply(self.model_cfg, params, ids, mask)
      return jax.vmap(lambda l, i, m: lm_train.token_nll(l[None], i[None], m[None]))(logits, ids, mask)
    return self._map_chunks(chunk, blocks["ids"], blocks["mask"])

  def log_ppl_range(self) -> float:
    return math.ceil(math.log(self.model_cfg.vocab_size)) + 2.0

  def evaluate(self, model, gen):
    model0, shared = gen.model0, gen.shared
    test = self._blocks(shared["test"])
    out = {"test_ppl": self._ppl(model["params"], test), "valid_ppl": model["valid_ppl"],
           "train_loss": model["train_loss"], "best_epoch": model["best_epoch"].astype(jnp.float32)}
    # This generation's training blocks (generation g-1's output, real at g = 0) scored by generation 0.
    x, w = gen.x, gen.w
    nll_N, count_N = self._block_nll(model0["params"], self._blocks(x))
    logppl_N = nll_N / jnp.maximum(count_N, 1.0)
    valid_N = w > 0
    n = jnp.maximum(jnp.sum(valid_N), 1)
    out["data_ppl0_mean"] = jnp.sum(jnp.where(valid_N, jnp.exp(logppl_N), 0.0)) / n
    for q, v in zip(QUANTILES, masked_quantiles(jnp.exp(logppl_N), valid_N, QUANTILES)):
      out[f"data_ppl0_q{round(100 * q):02d}"] = v
    hi = self.log_ppl_range()
    counts, _ = jnp.histogram(jnp.clip(logppl_N, 0.0, hi * (1 - 1e-6)), bins=HIST_BINS, range=(0.0, hi),
                              weights=valid_N.astype(jnp.float32))
    out["data_logppl0_hist"] = (counts / (n * hi / HIST_BINS)).astype(jnp.float32)
    if self.markov:
      from collapse_jax.families.lm import markov
      src = shared["source"]

      def kl(ids, mask):
        logp = jax.nn.log_softmax(opt_model.apply(self.model_cfg, model["params"], ids, mask), axis=-1)
        rows = jax.vmap(lambda i, l, m: markov.kl_on_text(src, i[None], l[None], m[None]))(ids, logp, mask)
        return rows * jnp.sum(mask, axis=1)

      out["test_kl"] = jnp.sum(self._map_chunks(kl, test["ids"], test["mask"])) / jnp.sum(test["mask"])
    return out

  def _prompts(self, x, w, n, key, shared):
    if self.c.prompts == "real":
      x, w = shared["train"], jnp.ones((shared["train"].shape[0],), jnp.float32)
    if x.shape[0] == n:  # replace / real_fraction: every block of the training set, in order
      return x
    u = jnp.where(w > 0, jax.random.uniform(key, (x.shape[0],)), 2.0)
    return x[jnp.sort(jax.lax.top_k(-u, n)[1])]

  def sample(self, model, n, key, gen):
    shared = gen.shared
    prompts_NxL = self._prompts(gen.x, gen.w, n, jax.random.fold_in(key, 0), shared)
    rows = jnp.concatenate([prompts_NxL, shared["prompts"]])  # the fixed text prompts ride along
    out = decode.decode_corpus(self.lm, model["params"], rows, jnp.ones_like(rows), self.dcfg,
                               jax.random.fold_in(key, 1), batch_size=self.c.decode_batch, mesh=self.mesh)
    new_NxL = out["tokens"][:n]
    metrics = {"text_continuations": out["tokens"][n:]}
    for k in NGRAMS:
      metrics[f"gen_distinct_{k}"], metrics[f"gen_rep_{k}"] = ngram_rates(new_NxL, k)
    if self.markov:
      from collapse_jax.families.lm import markov
      src, L = shared["source"], self.c.block_len
      # Each new token scored given its true predecessor: the prompt's last token for the first one.
      both = jnp.concatenate([prompts_NxL, new_NxL], axis=1)
      ll = markov.true_loglik(src, both, jnp.broadcast_to(jnp.arange(2 * L) >= L, both.shape))
      metrics["gen_true_loglik"], metrics["gen_impossible"] = ll["loglik"], ll["impossible"]
      cov = markov.tail_coverage(src, new_NxL, self.c.markov.tail_fraction)
      for name in ("tail_token_frac", "tail_bigram_frac", "token_mass", "bigram_mass"):
        metrics[f"gen_{name}"] = cov[name]
    return new_NxL, metrics

  # --- host side: figures and texts ------------------------------------------------------------------------------
  def _text(self, ids) -> str:
    if self.markov:
      return " ".join(str(int(i)) for i in ids)
    return self._load()["tokenizer"].decode(ids)

  def plot(self, workdir, metrics, arrays, snapshots):
    conts = arrays.get("text_continuations")
    if conts is not None and conts.size:
      paths.makedirs(os.path.join(workdir, "samples"))
      prompts = self._load()["prompts"]
      for g, rows in enumerate(conts):
        parts = [f"=== prompt {i} ===\n{self._text(p)}\n--- generation {g} continues ---\n{self._text(r)}\n"
                 for i, (p, r) in enumerate(zip(prompts, rows))]
        paths.write_atomic(os.path.join(workdir, "samples", f"gen_{g:04d}.txt"), "\n".join(parts))
    hist = arrays.get("data_logppl0_hist")
    if hist is None or not len(hist):
      return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    hi = self.log_ppl_range()
    centers = (np.arange(HIST_BINS) + 0.5) * hi / HIST_BINS
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for g, (h, col) in enumerate(zip(hist, plt.cm.viridis(np.linspace(0, 1, len(hist))))):
      ax.plot(np.exp(centers), h, color=col, label=f"gen {g}" + (" (real)" if g == 0 else ""))
    ax.set(xscale="log", xlabel="perplexity of a training block under the generation-0 model",
           ylabel="density (per unit log-perplexity)", title="LM: each generation's training data (paper Fig. 1b/c)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.savefig(fig, os.path.join(workdir, "plots", "lm_data_ppl0.png"), dpi=110)
    plt.close(fig)
