"""collapse_jax/families/lm/decode.py: token-for-token parity with Hugging Face generate on the tiny OPT fixture (committed
outputs of tests/fixtures/make_decode_fixture.py), beam search == exhaustive search on a tiny fake model, sampler
distributions by chi-square against a fake model of known logits, keys independent of batching and sharding,
one compile per program, and one-line ConfigErrors raised before compiling."""
import contextlib
import dataclasses
import functools
import itertools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from collapse_jax import sharding
from collapse_jax.families.lm import decode
from collapse_jax.families.lm import hf
from collapse_jax.errors import ConfigError

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")

_compiles = []
_listening = [False]
jax.monitoring.register_event_duration_secs_listener(
    lambda name, secs, **kw: _compiles.append(name) if _listening[0] and "backend_compile" in name else None)


@contextlib.contextmanager
def counting_compiles():
  _compiles.clear()
  _listening[0] = True
  try:
    yield _compiles
  finally:
    _listening[0] = False


# --- Hugging Face parity -----------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def hf_fixture():
  with open(os.path.join(FIXTURES, "decode_hf.json")) as fh:
    d = json.load(fh)
  cfg, params = hf.load_opt(os.path.join(FIXTURES, "opt_preln"), dtype="float32")
  # The fixture script multiplies the final LayerNorm by LOGIT_SCALE (exact: a power of two); so do we.
  params = dict(params, final_layer_norm={k: v * d["logit_scale"] for k, v in params["final_layer_norm"].items()})
  return d, decode.opt_lm(cfg), params


def as_decode_config(kwargs, max_new):
  beams = kwargs.get("num_beams", 1)
  return decode.DecodeConfig(method="beam" if beams > 1 else "greedy", max_new_tokens=max_new, num_beams=beams,
                             min_new_tokens=kwargs.get("min_new_tokens", 0),
                             repetition_penalty=kwargs.get("repetition_penalty", 1.0),
                             length_penalty=kwargs.get("length_penalty", 1.0),
                             early_stopping=kwargs.get("early_stopping", False))


def check_hf_cases(select):
  d, lm, params = hf_fixture()
  cases = [c for c in d["cases"] if select(c)]
  assert cases
  bad = []
  for c in cases:
    cfg = as_decode_config(c["kwargs"], d["max_new_tokens"])
    out = decode.decode_corpus(lm, params, np.array(c["ids"]), np.array(c["mask"]), cfg, batch_size=3,
                               eos_token_id=c["kwargs"].get("eos_token_id", d["eos_token_id"]))
    got = np.asarray(out["tokens"])
    if not np.array_equal(got, np.array(c["new"])):
      bad.append(f"{c['name']}: got {got.tolist()} want {c['new']}")
    elif c["scores"] is not None and not np.allclose(np.asarray(out["scores"]), c["scores"], rtol=0, atol=2e-5):
      bad.append(f"{c['name']}: scores {np.asarray(out['scores']).tolist()} want {c['scores']}")
  assert not bad, "\n".join(bad)
  return len(cases)


def test_paper_settings_match_hf():
  """Greedy, and 5 beams with repetition penalty 3.0 and min = max new tokens (the paper's generate call), on
  unpadded and left-padded prompts (lengths 6, 4, 2): tokens exact, beam scores to 2e-5."""
  assert check_hf_cases(lambda c: c["name"].startswith(("greedy_plain", "greedy_padded", "greedy_min10",
                                                        "beam5_rep3"))) == 6


def test_eos_stopping_matches_hf():
  """Cases that stop on EOS (a frequent token named as EOS): greedy with rows padded after EOS, min_new_tokens
  with repetition penalty, and 4-beam search under every early_stopping mode and four length penalties."""
  assert check_hf_cases(lambda c: "eos" in c["name"]) == 30


# --- fake models ---------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def const_lm(vocab):
  """Logits params["logits"] at every step, whatever the input: each draw is independent with a known law."""
  def apply(params, ids_BxL, mask_BxL, cache):
    return jnp.broadcast_to(params["logits"], (*ids_BxL.shape, vocab)), cache

  return decode.LM(apply=apply, init_cache=lambda b, n: {"steps": jnp.zeros((), jnp.int32)}, vocab_size=vocab,
                   max_len=1 << 20, eos_token_id=None, pad_token_id=0)


def markov_w(vocab, max_len, seed=0, scale=1.5):
  return scale * np.random.default_rng(seed).standard_normal((max_len, vocab, vocab, vocab)).astype(np.float32)


@functools.lru_cache(maxsize=None)
def markov_lm(vocab, max_len, eos=None):
  """Logits w[position, last token, previous token] (position of the last real token; the first token's
  previous is 0): history-dependent, so beam search differs from greedy. Its cache is three per-row arrays."""
  def apply(params, ids_BxL, mask_BxL, cache):
    def one(c, x):
      tok_B, real_B = x[0], x[1] > 0
      last_B = jnp.where(real_B, tok_B, c["last"])
      prev_B = jnp.where(real_B, c["last"], c["prev"])
      n_B = c["n"] + real_B
      return {"last": last_B, "prev": prev_B, "n": n_B}, params["w"][jnp.maximum(n_B - 1, 0), last_B, prev_B]

    cache, logits_LxBxV = jax.lax.scan(one, cache, (ids_BxL.T, mask_BxL.T))
    return logits_LxBxV.transpose(1, 0, 2), cache

  def init_cache(b, n):
    return {k: jnp.zeros((b,), jnp.int32) for k in ("last", "prev", "n")}

  return decode.LM(apply=apply, init_cache=init_cache, vocab_size=vocab, max_len=max_len, eos_token_id=eos,
                   pad_token_id=vocab - 1)


def enumerate_best(w, prompt, cfg, eos):
  """HF's beam objective by brute force: every hypothesis (ending in EOS or at max_new_tokens), scored by its
  processed log-probabilities (repetition penalty on log-softmax, EOS banned before min_new_tokens) summed and
  divided by (new tokens) ** length_penalty; float64."""
  vocab, best = w.shape[1], (-math.inf, None)
  for length in range(1, cfg.max_new_tokens + 1):
    for seq in itertools.product(range(vocab), repeat=length):
      stops_early = eos is not None and seq[-1] == eos
      if (eos is not None and eos in seq[:-1]) or (length < cfg.max_new_tokens and not stops_early):
        continue
      hist, total = list(prompt), 0.0
      for g, y in enumerate(seq):
        prev = hist[-2] if len(hist) > 1 else 0
        z = w[len(hist) - 1, hist[-1], prev].astype(np.float64)
        logp = z - z.max() - np.log(np.exp(z - z.max()).sum())
        for s in set(hist):
          logp[s] = logp[s] * cfg.repetition_penalty if logp[s] < 0 else logp[s] / cfg.repetition_penalty
        if eos is not None and g < cfg.min_new_tokens:
          logp[eos] = -math.inf
        total += logp[y]
        hist.append(y)
      score = total / length**cfg.length_penalty
      if score > best[0]:
        best = (score, list(seq) + [vocab - 1] * (cfg.max_new_tokens - length))
  return best


@pytest.mark.parametrize("eos,kw", [
    (None, dict(length_penalty=1.0)),
    (0, dict(min_new_tokens=1, repetition_penalty=2.0, length_penalty=1.5, early_stopping="never")),
    (0, dict(repetition_penalty=1.3, length_penalty=-0.5, early_stopping=False)),
    (1, dict(length_penalty=0.0, early_stopping=True)),
])
def test_beam_search_equals_exhaustive_search(eos, kw):
  """Vocabulary 3, 3 new tokens, 27 beams (>= every hypothesis, so no candidate is cut by the beam width): HF's
  beam search must return the brute-force best hypothesis and its score, for 4 prompts at once. Where HF's
  early-stop heuristic is a true bound (early_stopping "never", or length_penalty <= 0) or harmless (True with
  every hypothesis finished together), that makes it exact."""
  vocab, max_len = 3, 8
  lm, w = markov_lm(vocab, max_len, eos), markov_w(vocab, max_len, seed=1)
  cfg = decode.DecodeConfig(method="beam", max_new_tokens=3, num_beams=27, **kw)
  prompts = np.array([[0, 1], [2, 2], [1, 0], [2, 1]])
  out = decode.decode_corpus(lm, {"w": w}, prompts, np.ones_like(prompts), cfg, batch_size=4)
  for r, prompt in enumerate(prompts):
    score, seq = enumerate_best(w, prompt, cfg, eos)
    assert np.asarray(out["tokens"])[r].tolist() == seq, (r, score)
    assert abs(float(out["scores"][r]) - score) < 1e-5


# --- sampling ------------------------------------------------------------------------------------------------------

# Not sorted: a sampler that returns a token's rank instead of its id (e.g. after top-k) draws the wrong law.
LOGITS = np.log(np.array([0.08, 0.22, 0.03, 0.14, 0.02, 0.18, 0.06, 0.12, 0.05, 0.1]))


def expected_law(logits, temperature=1.0, top_k=0, top_p=1.0, spare=0):
  """The sampling law from the definitions (float64): softmax(logits / T), keep the k largest, then drop the
  least likely tokens while their total mass stays <= 1 - top_p (always keeping the most likely); `spare`
  more tokens left in the nucleus models an off-by-one there."""
  z = logits / temperature
  keep = np.ones_like(z, bool)
  if top_k:
    keep &= z >= np.sort(z)[-top_k]
  p = np.where(keep, np.exp(z - z.max()), 0.0)
  p /= p.sum()
  if top_p < 1.0:
    mass = 0.0
    for i in np.argsort(p)[:-1]:  # ascending, never the top token
      if keep[i] and mass + p[i] <= 1.0 - top_p:
        mass += p[i]
        keep[i] = False
      elif keep[i]:
        break
    dropped = [i for i in np.argsort(-p) if not keep[i] and p[i] > 0]
    keep[dropped[:spare]] = True
  p = np.where(keep, p, 0.0)
  return p / p.sum()


SAMPLERS = [dict(temperature=1.0), dict(temperature=0.5), dict(temperature=2.0, top_k=4), dict(top_p=0.7),
            dict(temperature=0.7, top_k=6, top_p=0.8)]
ROWS, STEPS = 256, 40  # 10,240 independent draws per setting
ALPHA = 1e-3


def wrong_laws(kw):
  """The bugs the test must catch, as the laws they would sample from."""
  t, k, p = kw.get("temperature", 1.0), kw.get("top_k", 0), kw.get("top_p", 1.0)
  law = expected_law(LOGITS, t, k, p)
  out = {"token ids shifted by one": np.roll(law, 1)}
  if kw != dict(temperature=1.0):
    out["no warping"] = expected_law(LOGITS)
  if t != 1.0:
    out["temperature multiplied"] = expected_law(LOGITS, 1.0 / t, k, p)
  if k:
    out["top_k off by one"] = expected_law(LOGITS, t, k + 1, p)
  if p < 1.0:
    out["one more nucleus token"] = expected_law(LOGITS, t, k, p, spare=1)
  return out


def power(law, alt, n):
  """Power of the chi-square test (level ALPHA, over law's support) against draws from alt: mass outside the
  support is caught by the zero-count check with probability 1 - (1 - outside) ** n."""
  support = law > 0
  outside = alt[~support].sum()
  lam = n * (((alt - law)[support] ** 2) / law[support]).sum()
  df = support.sum() - 1
  chi = stats.ncx2.sf(stats.chi2.isf(ALPHA, df), df, lam) if df > 0 else 0.0
  return 1.0 - (1.0 - chi) * (1.0 - outside) ** n


@pytest.mark.parametrize("kw", SAMPLERS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_sampler_law_chi_square(kw):
  """Draw 10,240 tokens from a model whose logits never change and test them against the law computed from the
  definitions: no draw outside its support, and a chi-square goodness-of-fit p-value above 1e-3. The power of
  that test against each plausible bug (token ids off by one, no warping, temperature multiplied instead of
  divided, top-k off by one, a nucleus one token too wide) is computed below from the noncentral chi-square and
  must be >= 0.99.
  Subtler errors are caught less surely: logits 10% too sharp has power 0.84 at T = 1 and 0.999 at T = 0.5, but
  only 0.01-0.3 once top-k / top-p have cut the support to 4 tokens (computed with `power`, not asserted)."""
  n = ROWS * STEPS
  law = expected_law(LOGITS, **kw)
  for name, alt in wrong_laws(kw).items():
    assert power(law, alt, n) >= 0.99, f"{name}: power {power(law, alt, n):.3f}"
  cfg = decode.DecodeConfig(method="sample", max_new_tokens=STEPS, **kw)
  prompts = np.zeros((ROWS, 1), np.int32)
  out = decode.decode_corpus(const_lm(len(LOGITS)), {"logits": jnp.asarray(LOGITS, jnp.float32)}, prompts,
                             np.ones_like(prompts), cfg, jax.random.key(7), batch_size=ROWS)
  counts = np.bincount(np.asarray(out["tokens"]).ravel(), minlength=len(LOGITS))
  assert counts[law == 0].sum() == 0, counts
  pval = stats.chisquare(counts[law > 0], n * law[law > 0]).pvalue
  assert pval > ALPHA, (counts.tolist(), (n * law).round(1).tolist())


def test_samples_do_not_depend_on_batching_or_mesh():
  """Row i draws with fold_in(key, i) and step t with fold_in(row key, t): 7 prompts in batches of 8 over an
  8-device mesh, of 2 with no mesh, and of 4 over a 2x2 ('data', 'fsdp') mesh give the same tokens (sampling
  and beam search); a different key gives different samples."""
  vocab, max_len = 5, 12
  lm, params = markov_lm(vocab, max_len, eos=4), {"w": markov_w(vocab, max_len, seed=3)}
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 4, (7, 4)).astype(np.int32)
  mask = (np.arange(4)[None, :] >= rng.integers(0, 3, (7, 1))).astype(np.int32)  # left-padded, ragged
  key = jax.random.key(11)
  for cfg in (decode.DecodeConfig(method="sample", max_new_tokens=6, top_k=3, repetition_penalty=1.2),
              decode.DecodeConfig(method="beam", max_new_tokens=6, num_beams=3, repetition_penalty=1.5)):
    runs = [decode.decode_corpus(lm, params, ids, mask, cfg, key, batch_size=bs, mesh=mesh)["tokens"]
            for bs, mesh in ((8, sharding.make_mesh(8)), (2, None), (4, sharding.make_lm_mesh(2, 2)))]
    for r in runs[1:]:
      np.testing.assert_array_equal(np.asarray(r), np.asarray(runs[0]))
    if cfg.method == "sample":
      other = decode.decode_corpus(lm, params, ids, mask, cfg, jax.random.key(12), batch_size=2)["tokens"]
      assert (np.asarray(other) != np.asarray(runs[0])).any()


def test_left_padding_changes_nothing():
  """A prompt left-padded with pad_token_id continues exactly as the unpadded prompt (the fake model skips pads,
  so any difference is the decoder's): greedy and beam search with repetition penalty 3, which must not count
  the pads as seen tokens (the pad id is one of the model's 5 tokens here, so it is often a contender)."""
  vocab, max_len = 5, 12
  lm, params = markov_lm(vocab, max_len), {"w": markov_w(vocab, max_len, seed=5)}
  ids = np.random.default_rng(1).integers(0, vocab - 1, (8, 3)).astype(np.int32)
  padded = np.concatenate([np.full((8, 2), lm.pad_token_id, np.int32), ids], axis=1)
  pad_mask = np.concatenate([np.zeros((8, 2), np.int32), np.ones_like(ids)], axis=1)
  for cfg in (decode.DecodeConfig(max_new_tokens=6, repetition_penalty=3.0),
              decode.DecodeConfig(method="beam", max_new_tokens=6, num_beams=3, repetition_penalty=3.0)):
    plain = decode.decode_corpus(lm, params, ids, np.ones_like(ids), cfg, batch_size=8)
    left = decode.decode_corpus(lm, params, padded, pad_mask, cfg, batch_size=8)
    np.testing.assert_array_equal(np.asarray(left["tokens"]), np.asarray(plain["tokens"]))
    np.testing.assert_allclose(np.asarray(left["scores"]), np.asarray(plain["scores"]), rtol=0, atol=1e-6)


def test_knobs_do_not_recompile():
  """Penalties, min_new_tokens, early_stopping, temperature, top_p and the EOS id are arguments of the compiled
  program: changing them runs the same executable (and changes the output)."""
  vocab, max_len = 5, 12
  lm, params = markov_lm(vocab, max_len, eos=4), {"w": markov_w(vocab, max_len, seed=4)}
  ids = np.array([[1, 2, 3], [3, 1, 0]], np.int32)
  base = decode.DecodeConfig(method="beam", max_new_tokens=5, num_beams=2, repetition_penalty=1.1)
  first = decode.decode_corpus(lm, params, ids, np.ones_like(ids), base, batch_size=2)
  other = dataclasses.replace(base, repetition_penalty=3.0, min_new_tokens=5, length_penalty=-2.0,
                              early_stopping="never")
  with counting_compiles() as compiles:
    again = decode.decode_corpus(lm, params, ids, np.ones_like(ids), other, batch_size=2, eos_token_id=2)
  assert not compiles, compiles
  assert not np.array_equal(np.asarray(first["tokens"]), np.asarray(again["tokens"]))


# --- bad input -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change,match", [
    (dict(max_new_tokens=13), r"prompt length 4 \+ DecodeConfig.max_new_tokens=13 exceeds the model's cache length 16"),
    (dict(num_beams=0), r"DecodeConfig.num_beams=0"),
    (dict(top_p=0.0), r"DecodeConfig.top_p=0.0: must be in \(0, 1\]"),
    (dict(top_p=1.5), r"DecodeConfig.top_p=1.5"),
    (dict(method="nucleus"), r"DecodeConfig.method='nucleus': must be one of greedy, sample, beam"),
    (dict(min_new_tokens=9), r"DecodeConfig.min_new_tokens=9"),
    (dict(temperature=0.0), r"DecodeConfig.temperature=0.0"),
    (dict(early_stopping="always"), r"DecodeConfig.early_stopping='always'"),
])
def test_bad_config_is_refused_before_compiling(change, match):
  lm, params = markov_lm(5, 16), {"w": markov_w(5, 16)}
  cfg = dataclasses.replace(decode.DecodeConfig(method="beam", max_new_tokens=8, num_beams=2), **change)
  ids = np.ones((3, 4), np.int32)
  with counting_compiles() as compiles, pytest.raises(ConfigError, match=match) as e:
    decode.decode_corpus(lm, params, ids, np.ones_like(ids), cfg, batch_size=3)
  assert "\n" not in str(e.value) and not compiles


def test_bad_call_is_refused_before_compiling():
  lm, params = markov_lm(5, 16), {"w": markov_w(5, 16)}
  ids = np.ones((4, 4), np.int32)
  calls = [
      (dict(mask_NxP=np.ones((4, 3))), "prompt mask shape"),
      (dict(batch_size=3, mesh=sharding.make_mesh(2)), "batch_size=3 is not a multiple of the mesh's 2"),
      (dict(batch_size=0), "batch_size must be a positive integer"),
      (dict(cfg=decode.DecodeConfig(method="sample", max_new_tokens=2)), "needs a key"),
  ]
  for change, match in calls:
    kw = dict(lm=lm, params=params, ids_NxP=ids, mask_NxP=np.ones_like(ids),
              cfg=decode.DecodeConfig(max_new_tokens=2), batch_size=2, **{})
    kw.update(change)
    with counting_compiles() as compiles, pytest.raises(ConfigError, match=match) as e:
      decode.decode_corpus(**kw)
    assert "\n" not in str(e.value) and not compiles


# --- OPT: beams share their prompt's cache -------------------------------------------------------------------------

def test_opt_beams_read_one_shared_prompt_cache():
  """kv_cache.share_prefix keeps each prompt's K/V once (batch G, not G x beams) and the copies attend over it plus
  their own slots: two copies of each left-padded prompt, fed different tokens for 3 steps, get the logits of
  the full uncached forward of prompt + their own tokens."""
  from collapse_jax.families.lm import model as opt
  d, lm, params = hf_fixture()
  cfg = hf.load_opt(os.path.join(FIXTURES, "opt_preln"), dtype="float32")[0]
  case = next(c for c in d["cases"] if c["name"] == "greedy_padded")
  ids, mask = np.array(case["ids"], np.int32), np.array(case["mask"], np.int32)
  g, p = ids.shape
  _, cache = jax.jit(lambda c: opt.apply(cfg, params, ids, mask, cache=c))(opt.init_cache(cfg, g, p))
  beams = lm.beam_cache(cache, 2, 3)
  assert beams.prefix_k.shape[:2] == (cfg.num_layers, g)
  assert beams.k.shape == (cfg.num_layers, g, cfg.num_heads, 3 * 2, cfg.head_dim)  # per prompt: 3 slots x 2 copies
  new = np.array([[5, 9, 14], [7, 7, 3], [11, 30, 2], [40, 41, 42], [8, 6, 4], [60, 1, 99]], np.int32)
  step = jax.jit(lambda c, tok: opt.apply(cfg, params, tok, jnp.ones_like(tok), cache=c))
  got = []
  for t in range(3):
    logits, beams = step(beams, new[:, t:t + 1])
    got.append(np.asarray(logits)[:, 0])
  full_ids = np.concatenate([np.repeat(ids, 2, axis=0), new], axis=1)
  full_mask = np.concatenate([np.repeat(mask, 2, axis=0), np.ones_like(new)], axis=1)
  want = np.asarray(jax.jit(functools.partial(opt.apply, cfg))(params, full_ids, full_mask))[:, p:]
  np.testing.assert_allclose(np.stack(got, axis=1), want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_opt_beam_reorder_reads_ancestors():
  """Beam reordering (kv_cache.reorder_copies) moves only which copy's slots each row reads, never K/V: 3 copies of
  each left-padded prompt, reordered after every step to parents drawn within their prompt (repeats allowed, as
  beam search does), get at every step the logits of the full uncached forward of prompt + their history."""
  from collapse_jax.families.lm import model as opt
  d, lm, params = hf_fixture()
  cfg = hf.load_opt(os.path.join(FIXTURES, "opt_preln"), dtype="float32")[0]
  case = next(c for c in d["cases"] if c["name"] == "greedy_padded")
  ids, mask = np.array(case["ids"], np.int32), np.array(case["mask"], np.int32)
  (g, p), k, steps = ids.shape, 3, 4
  _, cache = jax.jit(lambda c: opt.apply(cfg, params, ids, mask, cache=c))(opt.init_cache(cfg, g, p))
  beams = lm.beam_cache(cache, k, steps)
  rng = np.random.default_rng(0)
  step = jax.jit(lambda c, tok: opt.apply(cfg, params, tok, jnp.ones_like(tok), cache=c))
  hist = np.zeros((g * k, 0), np.int32)
  for t in range(steps):
    tok = rng.integers(3, cfg.vocab_size, (g * k, 1)).astype(np.int32)
    logits, beams = step(beams, tok)
    hist = np.concatenate([hist, tok], axis=1)
    full_ids = np.concatenate([np.repeat(ids, k, axis=0), hist], axis=1)
    full_mask = np.concatenate([np.repeat(mask, k, axis=0), np.ones_like(hist)], axis=1)
    want = np.asarray(jax.jit(functools.partial(opt.apply, cfg))(params, full_ids, full_mask))[:, -1]
    np.testing.assert_allclose(np.asarray(logits)[:, 0], want, rtol=0, atol=1e-5 * np.abs(want).max())
    rows = (np.arange(g)[:, None] * k + rng.integers(0, k, (g, k))).reshape(-1)
    moved = lm.reorder(beams, jnp.asarray(rows))  # eager: K/V pass through as the same arrays
    assert moved.k is beams.k and moved.v is beams.v
    beams, hist = moved, hist[rows]


def test_opt_grown_prompt_cache_decodes_as_full_cache():
  """kv_cache.grow_cache (greedy/sampling prefill the prompt's slots only, then grow the cache to prompt + new
  tokens) decodes exactly as prefilling into the full cache: same greedy and sampled tokens, left-padded."""
  d, lm, params = hf_fixture()
  case = next(c for c in d["cases"] if c["name"] == "greedy_padded")
  ids, mask = np.array(case["ids"], np.int32), np.array(case["mask"], np.int32)
  full = dataclasses.replace(lm, grow=None)
  for cfg in (decode.DecodeConfig(max_new_tokens=5, repetition_penalty=3.0),
              decode.DecodeConfig(method="sample", max_new_tokens=5, top_k=20, top_p=0.9)):
    want = decode.decode_corpus(full, params, ids, mask, cfg, jax.random.key(3), batch_size=len(ids))["tokens"]
    got = decode.decode_corpus(lm, params, ids, mask, cfg, jax.random.key(3), batch_size=len(ids))["tokens"]
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
