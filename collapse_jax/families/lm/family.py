"""The paper's LM experiment as a family: OPT fine-tuned on fixed-length blocks of token ids, each generation's
synthetic corpus made by continuing blocks with the model's own decoder.

Datum: one block of `block_len` token ids (int32). Generation 0 trains the initial model (an HF OPT folder, or an
OPT size from scratch; it lives in `shared`, FSDP-sharded) on the real training blocks; generation g >= 1 starts
again from the initial model (config lm.start='initial', the paper's way) or from generation g-1's ('previous').
`fit` is the trainer's `fit` (train.py: every epoch in one lax.scan, the model best on validation perplexity kept,
the paper's rule), the same function lm_train.train runs for tests and benchmarks. `sample` continues blocks by
exactly block_len new tokens with decode.decode_corpus (by default 5-way beam search, repetition penalty 3.0, no
early EOS), and the new tokens are the next generation's blocks. With lm.decode.min_new_tokens < block_len an EOS
may end a continuation early and pads fill the rest of its block: pads are masked out of training and every
perplexity (`_blocks`), and a block with pads is continued from its last real token (`_left_aligned`).
Prompts (lm.prompts): 'own' (the paper's): every block of this generation's training set, so samples.n must
equal the number of training blocks; in accumulating regimes the training set is larger than samples.n and the
prompts are samples.n of its valid blocks drawn uniformly without replacement. 'real': the real training blocks
every generation.

Accumulating regimes hand `fit` a buffer of static capacity whose first rows are valid: lm_train's epoch
batches only the valid rows, skips the steps past them, and the cosine runs over the valid rows' step count,
so a generation trains exactly as on its valid rows alone.

The family's other jobs have their own modules: config.py (config.lm typed, and its one translation into the
model's, trainer's and decoder's configs), data.py (`load_data`'s reading and checks), outputs.py (texts and the
Fig. 1b/c plot), plan.py (plan mode's shapes and step programs).

Metrics per generation: real test perplexity (`test_ppl`), the kept epoch's validation perplexity, its epoch and
the last epoch's training loss; the perplexity of every training block of this generation under the generation-0
model (`data_ppl0_*`: mean and quantiles, and `data_logppl0_hist`, a fixed-bin density of log-perplexity: the
paper's Fig. 1b/c); distinct-n (distinct n-grams / all n-grams of the generated corpus) and rep-n (share of a
block's n-grams that repeat an earlier one in the same block) of the new tokens; on the synthetic Markov language
(markov.py) the exact ones: true log-likelihood per new token given its predecessor (`gen_true_loglik`,
`gen_impossible`), KL(source || model) per token on the real test contexts (`test_kl`), and the true token and
bigram mass, overall and in the tail, that the generated corpus still holds. `text_continuations`: a fixed set of
real test prompts (lm.text_samples) continued by each generation, written to workdir/samples/gen_NNNN.txt.
"""
import jax
import jax.numpy as jnp
import numpy as np

from collapse_jax import family, ops, sharding
from collapse_jax.errors import ConfigError
from collapse_jax.families.lm import config as lm_config
from collapse_jax.families.lm import data as lm_data
from collapse_jax.families.lm import decode, outputs
from collapse_jax.families.lm import model as opt_model
from collapse_jax.families.lm import train as lm_train
from collapse_jax.families.lm.loss import token_nll
from collapse_jax.families.lm.outputs import HIST_BINS
from collapse_jax.families.lm.text_metrics import masked_quantiles, ngram_rates

NGRAMS = (2, 4)
QUANTILES = (0.05, 0.5, 0.95)


class LMFamily(family.Family):
  name = "lm"
  Config = lm_config.LMConfig
  vmap_chains = False
  headline = ("test_ppl", "data_ppl0_mean", "data_ppl0_q95")
  titles = {"test_ppl": "real test perplexity", "data_ppl0_mean": "training data's perplexity under gen 0 (mean)",
            "data_ppl0_q50": "training data's perplexity under gen 0 (median)",
            "data_ppl0_q95": "training data's perplexity under gen 0 (95th pct)",
            "data_ppl0_q05": "training data's perplexity under gen 0 (5th pct)",
            "valid_ppl": "validation perplexity (kept epoch)", "train_loss": "training loss (last epoch)",
            "best_epoch": "epoch kept (best on validation)", "gen_distinct_2": "distinct bigrams / all (new text)",
            "gen_distinct_4": "distinct 4-grams / all (new text)", "gen_rep_2": "repeated bigrams in a block",
            "gen_rep_4": "repeated 4-grams in a block", "test_kl": "KL(source ‖ model) per token",
            "gen_true_loglik": "true log-likelihood per new token", "gen_impossible": "impossible bigrams (share)",
            "gen_tail_token_frac": "tail tokens' mass kept", "gen_tail_bigram_frac": "tail bigrams' mass kept",
            "gen_token_mass": "token mass kept", "gen_bigram_mass": "bigram mass kept"}
  groups = (("perplexity on real data", ("test_ppl", "valid_ppl")),
            ("training data's perplexity under generation 0", ("data_ppl0_q05", "data_ppl0_q50", "data_ppl0_mean",
                                                                "data_ppl0_q95")),
            ("distinct n-grams / all (new text)", ("gen_distinct_2", "gen_distinct_4")),
            ("repeated n-grams in a block (new text)", ("gen_rep_2", "gen_rep_4")),
            ("source mass the new text keeps", ("gen_token_mass", "gen_bigram_mass", "gen_tail_token_frac",
                                                "gen_tail_bigram_frac")))

  # --- config and placement -------------------------------------------------------------------------------------
  @classmethod
  def check(cls, run, c) -> None:
    lm_config.check(run, c)

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

  def __init__(self, run, c, mesh, abstract: bool = False):
    """abstract (plan mode): shapes only; no weights are read, nor data where the config gives the counts."""
    super().__init__(run, c, mesh, abstract)
    lm_train.check_batch_shards(mesh, {f"config.lm.{f}": getattr(c, f) for f in ("batch_size", "eval_batch",
                                                                                  "decode_batch")})
    self.parts = lm_config.translate(c, abstract)
    self.model_cfg, self.tcfg, self.dcfg = self.parts
    self.lm = decode.opt_lm(self.model_cfg)
    self.markov = c.markov_data
    self.metric_names = ("test_ppl", "data_ppl0_mean", "data_ppl0_q50", "data_ppl0_q95", "data_ppl0_q05",
                         "valid_ppl", "train_loss", "best_epoch", *(f"gen_distinct_{n}" for n in NGRAMS),
                         *(f"gen_rep_{n}" for n in NGRAMS))
    if self.markov:
      self.metric_names += ("test_kl", "gen_true_loglik", "gen_impossible", "gen_tail_token_frac",
                            "gen_tail_bigram_frac", "gen_token_mass", "gen_bigram_mass")
    self.blocks = None   # the host data (data.load), once load_data has read them
    self.counts = None   # data.Counts, once load_data has them

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

  # --- data (host side, read once, before anything is compiled) -------------------------------------------------
  def load_data(self) -> family.Data:
    """The blocks and the initial weights (data.py); in plan mode their shapes only, read from the config where it
    gives the block counts."""
    counts = lm_data.config_counts(self.c) if self.abstract else None
    if counts is None:
      self.blocks = lm_data.load(self.run, self.c, self.parts)
      counts = lm_data.counts(self.blocks)
    elif not self.markov:  # text counts from the config (the Markov language's: config.check)
      lm_config.check_counts(self.run, counts.train)
    self.counts = counts
    if self.abstract:
      from collapse_jax.families.lm import plan as lm_plan
      return family.Data(counts.train, lm_plan.abstract_shared(self))
    shared = {"init": lm_data.init_params(self.c, self.model_cfg),
              **{k: self.blocks[k] for k in ("train", "valid", "test", "prompts")}}
    return family.Data(counts.train, dict(shared, source=self.blocks["source"]) if self.markov else shared)

  def param_shardings(self, params):
    return sharding.param_shardings(params, opt_model.logical_axes(params), self.mesh)

  def model_shardings(self, model):
    rep = sharding.replicated(self.mesh)
    return dict(jax.tree.map(lambda _: rep, model), params=self.param_shardings(model["params"]))

  def shared_shardings(self, shared):
    rep = sharding.replicated(self.mesh)
    return dict(jax.tree.map(lambda _: rep, shared), init=self.param_shardings(shared["init"]))

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
    init = gen.shared["init"]
    start = init if self.c.start == "initial" else jax.tree.map(
        lambda a, b: jnp.where(gen.g == 0, a, b), init, gen.prev["params"])
    best, _ = lm_train.fit(self.tcfg, self.model_cfg, start, self._blocks(gen.x), self._blocks(gen.shared["valid"]),
                           key, mesh=self.mesh, valid_N=gen.w > 0)
    return best

  def _map_chunks(self, fn, blocks):
    """fn(ids_ExL, mask_ExL) -> per-row outputs, over eval_batch chunks split over the batch axes."""
    bs = sharding.batch_sharding(self.mesh)
    E = ops.chunk_size(blocks["ids"].shape[0], self.c.eval_batch, sharding.batch_shards(self.mesh))
    return ops.chunked_map(fn, (blocks["ids"], blocks["mask"]), E, lambda a: jax.lax.with_sharding_constraint(a, bs))

  def _block_nll(self, params, blocks):
    """(summed next-token NLL, predicted tokens) of every block, by the trainer's token_nll row by row."""
    def chunk(ids, mask):
      logits = opt_model.apply(self.model_cfg, params, ids, mask)
      return jax.vmap(lambda l, i, m: token_nll(l[None], i[None], m[None]))(logits, ids, mask)
    return self._map_chunks(chunk, blocks)

  def log_ppl_range(self) -> float:
    return outputs.log_ppl_range(self.model_cfg.vocab_size)

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

      out["test_kl"] = jnp.sum(self._map_chunks(kl, test)) / jnp.sum(test["mask"])
    return out

  def _prompts(self, x, w, n, key, shared):
    if self.c.prompts == "real":
      x, w = shared["train"], jnp.ones((shared["train"].shape[0],), jnp.float32)
    if x.shape[0] == n:  # replace / real_fraction: every block of the training set, in order
      return x
    return x[jnp.sort(ops.valid_first(key, w > 0, n))]  # samples.n valid blocks, uniformly, in buffer order

  def _left_aligned(self, rows_NxL):
    """(rows, mask): each row's pads (the tail after an early EOS, lm.decode.min_new_tokens < block_len) moved to
    its front and masked out, so decoding continues a row from its last real token as it continues HF's
    left-padded prompts. Rows without pads are unchanged."""
    real_NxL = rows_NxL != self.model_cfg.pad_token_id
    order_NxL = jnp.argsort(real_NxL, axis=1, stable=True)  # pads first, the real tokens in their order
    return (jnp.take_along_axis(rows_NxL, order_NxL, axis=1),
            jnp.take_along_axis(real_NxL, order_NxL, axis=1).astype(jnp.int32))

  def sample(self, model, n, key, gen):
    shared = gen.shared
    prompts_NxL = self._prompts(gen.x, gen.w, n, jax.random.fold_in(key, 0), shared)
    rows, mask = self._left_aligned(jnp.concatenate([prompts_NxL, shared["prompts"]]))  # fixed prompts ride along
    out = decode.decode_corpus(self.lm, model["params"], rows, mask, self.dcfg, jax.random.fold_in(key, 1),
                               batch_size=self.c.decode_batch, mesh=self.mesh)
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
    return self.blocks["tokenizer"].decode(ids)

  def array_edges(self):
    return {"data_logppl0_hist": np.linspace(0.0, self.log_ppl_range(), HIST_BINS + 1)}

  def texts(self, arrays, g):
    conts = arrays.get("text_continuations")
    if conts is None or not conts.size:
      return {}
    return {f"sample_{i}": f"{self._text(p)} ⟶ {self._text(r)}" for i, (p, r) in
            enumerate(zip(self.blocks["prompts"], conts[g]))}

  def plot(self, workdir, metrics, arrays, snapshots):
    conts = arrays.get("text_continuations")
    if conts is not None and conts.size:
      outputs.write_texts(workdir, conts, self.blocks["prompts"], self._text)
    hist = arrays.get("data_logppl0_hist")
    if hist is not None and len(hist):
      outputs.plot_data_ppl0(workdir, hist, self.log_ppl_range())
