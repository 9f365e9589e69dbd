"""What the LM decodes from and trains on, through the loop (configs/lm.py:ci): in the accumulating regimes the
prompts are drawn only from the buffer's valid rows; on real text with lm.decode.min_new_tokens below block_len an
EOS ends a continuation early, the rest of its block is pads, and pads stay out of every perplexity and of the next
generation's decoding (a block with pads is continued from its last real token)."""
import collections
import os

import jax
import numpy as np
import pytest

from collapse_jax import family as family_lib, loop
from collapse_jax.families.lm import decode
from collapse_jax.families.lm import model as opt_model
from tests import helpers
from tests.helpers import load_config
from tests.toy_text import TOY

N_BLOCKS, L = 28, 8  # configs/lm.py:ci


@pytest.fixture
def decoded(monkeypatch):
  """Every (rows, mask) the family hands decode_corpus inside the compiled loop, in generation order."""
  calls, orig = [], decode.decode_corpus

  def spy(lm, params, rows, mask, *a, **k):
    jax.debug.callback(lambda r, m: calls.append((np.asarray(r), np.asarray(m))), rows, mask, ordered=True)
    return orig(lm, params, rows, mask, *a, **k)

  monkeypatch.setattr(decode, "decode_corpus", spy)
  return calls


@pytest.mark.parametrize("regime", [dict(regime__name="accumulate"),
                                    dict(regime__name="accumulate_subsample", regime__subsample=40)],
                         ids=["accumulate", "accumulate_subsample"])
def test_accumulating_regimes_prompt_only_valid_rows(tmp_path, decoded, regime):
  G = 3
  cfg = load_config("lm", "ci", generations=G, lm__dropout=0.0, snapshot_generations=tuple(range(G)),
                    snapshot_size=N_BLOCKS, plots=False, checkpoint_min_seconds=0, **regime)
  exp = loop.Experiment(cfg)
  hist = loop.run(cfg, str(tmp_path / "run"), experiment=exp)
  shared = jax.tree.map(np.asarray, exp.data.shared)
  assert len(decoded) == G
  for g, (rows, mask) in enumerate(decoded):
    # The buffer's valid rows at generation g: the real blocks, then each earlier generation's new blocks. Its
    # other rows (capacity not yet filled; accumulate_subsample's 40-row draw while the pool holds 28) are zeros.
    valid = np.concatenate([shared["train"]] + [hist["snapshots"][h] for h in range(g)])
    prompts = rows[:N_BLOCKS]
    np.testing.assert_array_equal(rows[N_BLOCKS:], shared["prompts"])  # the fixed text prompts ride along
    assert mask.all()  # the Markov language has no pads
    # samples.n distinct valid rows (a multiset: generated blocks may repeat, each copy counts once).
    have = collections.Counter(map(bytes, valid))
    drawn = collections.Counter(map(bytes, prompts))
    assert not drawn - have, f"generation {g}: {sum((drawn - have).values())} prompts are not valid buffer rows"
    if g and regime["regime__name"] == "accumulate":
      # Drawn uniformly from all valid rows, not the first samples.n of them: both the real rows and the newer
      # generated ones are continued (all from one side: probability ~1e-16 for 28 of 56).
      real = collections.Counter(map(bytes, shared["train"]))
      assert 0 < sum((drawn & real).values()) < N_BLOCKS, g


def _one_word_per_line(directory) -> tuple[str, dict]:
  """The toy corpus with one word per line (blank lines kept), as wiki.*.raw: a line ends every few bytes, and
  with it comes the EOS (the bytes tokenizer's BOS = EOS = 256) that starts the next line, so a small model
  learns to end continuations. Returns the directory and each split's rows as wikitext reads them."""
  os.makedirs(directory, exist_ok=True)
  rows = {}
  for split, body in TOY.items():
    rows[split] = ["" if not line.strip() else f" {w}\n" for line in body.split("\n")[:-1]
                   for w in (line.split() or [""])]
    with open(os.path.join(directory, f"wiki.{split}.raw"), "w", encoding="utf-8") as fh:
      fh.write("".join(r or " \n" for r in rows[split]))
  return str(directory), rows


@pytest.fixture(scope="module")
def eos_run(tmp_path_factory):
  """Two generations on that text, EOS allowed after one new token and no repetition penalty."""
  tmp = tmp_path_factory.mktemp("eos")
  wiki, rows = _one_word_per_line(tmp / "wiki")
  n = sum(1 + len(r.encode()) for r in rows["train"]) // L  # blocks of L: each row is BOS + its UTF-8 bytes
  cfg = load_config("lm", "ci", generations=2, lm__data="text", samples__n=n, lm__dropout=0.0, lm__epochs=20,
                    lm__decode__min_new_tokens=1, lm__decode__repetition_penalty=1.0, snapshot_generations=(0, 1),
                    snapshot_size=n, plots=False, checkpoint_min_seconds=0)
  cfg.lm.text.update(kind="wikitext", path=wiki, tokenizer="bytes")
  exp = loop.Experiment(cfg)
  wd = str(tmp / "run")
  hist = loop.run(cfg, wd, experiment=exp)
  return dict(cfg=cfg, exp=exp, wd=wd, hist=hist, n=n)


def test_eos_ends_a_continuation_and_pads_fill_the_block(eos_run):
  fam, new = eos_run["exp"].family, eos_run["hist"]["snapshots"]
  eos, pad = fam.model_cfg.eos_token_id, fam.model_cfg.pad_token_id
  assert (eos, pad) == (256, 257)  # the bytes tokenizer's, not OPT's 2 / 1
  early = 0
  for g in (0, 1):
    for row in new[g]:
      ends = np.flatnonzero(row == eos)
      if not ends.size:
        assert not (row == pad).any(), row
        continue
      e = ends[0]
      assert e >= 1, row  # min_new_tokens=1: not as the first new token
      assert not (row[:e] == pad).any() and (row[e + 1:] == pad).all(), row
      early += e < L - 1
  assert early >= 3, f"only {early} continuations ended early: the test needs EOS and pads to happen"


def _masked_logppl(fam, params, ids):
  """Per-row mean NLL over the next-token pairs whose both tokens are real (not pad), in float64 from float32
  logits of the model run with the pad mask."""
  mask = (ids != fam.model_cfg.pad_token_id).astype(np.int32)
  logits = np.asarray(opt_model.apply(fam.model_cfg, params, ids, mask), np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - \
      logits.max(-1, keepdims=True)
  nll = -np.take_along_axis(logp[:, :-1], ids[:, 1:, None], axis=-1)[..., 0]
  w = mask[:, 1:] * mask[:, :-1]
  return (nll * w).sum(1) / np.maximum(w.sum(1), 1), nll, w


def test_pads_stay_out_of_perplexity_unit_and_end_to_end(eos_run):
  fam, hist, wd = eos_run["exp"].family, eos_run["hist"], eos_run["wd"]
  pad = fam.model_cfg.pad_token_id
  model0 = helpers.restore_carry(wd, 1)["model0"]["params"]
  # Unit: the family's blocks mask exactly the pads (an EOS is a real token), and its perplexity counts only
  # pairs of real tokens.
  blocks = hist["snapshots"][0]
  got = fam._blocks(blocks)
  np.testing.assert_array_equal(np.asarray(got["mask"]), (blocks != pad).astype(np.int32))
  _, nll, w = _masked_logppl(fam, model0, blocks)
  assert (w == 0).any()
  # float32 token mean of ~300 NLLs vs float64: gamma(300) ~ 2e-5 relative worst case; 2e-5 as tests/test_lm.py.
  np.testing.assert_allclose(float(jax.jit(fam._ppl)(model0, got)), np.exp((nll * w).sum() / w.sum()), rtol=2e-5)
  # End to end: generation 1 trains on generation 0's blocks, pads and all; their perplexity under generation 0
  # (data_ppl0_*) is over real tokens only.
  lp, _, _ = _masked_logppl(fam, model0, blocks)
  m = hist["metrics"]
  np.testing.assert_allclose(m["data_ppl0_mean"][1, 0], np.exp(lp).mean(), rtol=2e-5)
  np.testing.assert_allclose(m["data_ppl0_q50"][1, 0], np.quantile(np.exp(lp), 0.5), rtol=2e-5)
  assert np.isfinite(m["train_loss"][1, 0]) and np.isfinite(m["test_ppl"]).all()


def test_a_block_with_pads_is_continued_from_its_last_real_token(eos_run):
  """Blocks with pads are decoded left-padded (pads in front, masked out), as HF decodes left-padded prompts:
  generation 1 in the loop (whose prompts are generation 0's blocks) and the family's sample on real blocks cut
  short by an EOS, against decode.py on its own from the checkpointed models, token for token."""
  exp, hist, wd, n = eos_run["exp"], eos_run["hist"], eos_run["wd"], eos_run["n"]
  fam = exp.family
  pad, eos = fam.model_cfg.pad_token_id, fam.model_cfg.eos_token_id
  shared = jax.tree.map(np.asarray, exp.data.shared)
  dcfg = decode.DecodeConfig(method="beam", max_new_tokens=L, min_new_tokens=1, num_beams=2, repetition_penalty=1.0)

  def run(params, ids, mask):
    return np.asarray(decode.decode_corpus(decode.opt_lm(fam.model_cfg), params, ids, mask, dcfg, batch_size=8,
                                           mesh=exp.mesh)["tokens"])

  def left(prompts):
    rows = np.concatenate([np.stack([np.concatenate([r[r == pad], r[r != pad]]) for r in prompts]),
                           shared["prompts"]])
    return rows, (rows != pad).astype(np.int32)

  want = run(helpers.restore_carry(wd, 2)["prev"]["params"], *left(hist["snapshots"][0]))
  np.testing.assert_array_equal(hist["snapshots"][1], want[:n])
  np.testing.assert_array_equal(hist["arrays"]["text_continuations"][1], want[n:])
  # Generation 0's model (which continues text variably) on real blocks ended early at position k: the pads
  # change its continuations when read as tokens at the end of the prompt, so left-padding is what is tested.
  params0 = helpers.restore_carry(wd, 1)["model0"]["params"]
  k = 2 + np.arange(n) % (L - 3)
  cut = np.where(np.arange(L) < k[:, None], shared["train"], pad)
  cut[np.arange(n), k] = eos
  model = {"params": params0}
  gen = family_lib.Generation(np.int32(1), cut, np.ones(n, np.float32), model, model, {}, exp.data.shared)
  got, metrics = jax.jit(fam.sample, static_argnums=1)(model, n, jax.random.PRNGKey(0), gen)
  want = run(params0, *left(cut))
  np.testing.assert_array_equal(np.asarray(got), want[:n])
  np.testing.assert_array_equal(np.asarray(metrics["text_continuations"]), want[n:])
  raw = np.concatenate([cut, shared["prompts"]])
  assert (run(params0, raw, np.ones_like(raw))[:n] != want[:n]).any(axis=1).sum() >= 3
