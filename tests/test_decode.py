"""collapse_jax/families/lm/decode.py: token-for-token parity with Hugging Face generate on the tiny OPT fixture
(committed outputs of tests/fixtures/make_decode_fixture.py), keys independent of batching and sharding, left
padding, the loop's parts and states, one compile per program, one-line ConfigErrors raised before compiling, and
OPT's cache hooks (beams share their prompt's cache). Beam search against exhaustive search: tests/test_beam.py;
sampling laws: tests/test_sampling.py."""
import contextlib
import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from collapse_jax import sharding
from collapse_jax.errors import ConfigError
from collapse_jax.families.lm import decode
from collapse_jax.families.lm import hf
from tests.decode_fakes import markov_lm, markov_w

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


# --- batching, padding, knobs ------------------------------------------------------------------------------------

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


def test_loop_parts_named_states_run_by_hand_equal_generate_batch():
  """loop_parts as the planner uses it: the state after the first token is a SampleState / BeamState whose named
  fields have the documented shapes, and body run by hand while cond holds, then finish, gives generate_batch's
  tokens (its while_loop) exactly, sampling with top-k and beam search, both with the repetition penalty on."""
  vocab, max_len, b, n = 5, 12, 3, 6
  lm, params = markov_lm(vocab, max_len, eos=4), {"w": jnp.asarray(markov_w(vocab, max_len, seed=6))}
  ids = np.random.default_rng(2).integers(0, 4, (b, 4)).astype(np.int32)
  mask = np.ones_like(ids)
  keys = jax.random.key_data(jax.vmap(lambda r: jax.random.fold_in(jax.random.key(5), r))(jnp.arange(b)))
  for cfg in (decode.DecodeConfig(method="sample", max_new_tokens=n, top_k=3, repetition_penalty=1.3),
              decode.DecodeConfig(method="beam", max_new_tokens=n, num_beams=2, repetition_penalty=1.3)):
    def parts(k, cfg=cfg):
      return decode.loop_parts(lm, cfg, params, ids, mask, jax.random.wrap_key_data(k))

    state = jax.jit(lambda k: parts(k)[0])(keys)
    body = jax.jit(lambda k, s: parts(k)[1](s))
    cond_finish = jax.jit(lambda k, s: (parts(k)[2](s), parts(k)[3](s)))
    if cfg.method == "beam":
      assert isinstance(state, decode.BeamState)
      assert state.run_seq_BxKxN.shape == state.fin_seq_BxKxN.shape == (b, 2, n)
      assert state.run_score_BxK.shape == state.fin_score_BxK.shape == state.fin_BxK.shape == (b, 2)
      assert state.open_B.shape == (b,) and state.seen_RxV.shape == (b * 2, vocab)
    else:
      assert isinstance(state, decode.SampleState)
      assert state.tokens_BxN.shape == (b, n) and state.seen_BxV.shape == (b, vocab) and state.done_B.shape == (b,)
    assert int(state.t) == 1
    go, got = cond_finish(keys, state)
    while bool(go):
      state = body(keys, state)
      go, got = cond_finish(keys, state)
    want = jax.jit(lambda k: decode.generate_batch(lm, cfg, params, ids, mask, jax.random.wrap_key_data(k)))(keys)
    np.testing.assert_array_equal(np.asarray(got["tokens"]), np.asarray(want["tokens"]))
    np.testing.assert_allclose(np.asarray(got["scores"]), np.asarray(want["scores"]), rtol=0, atol=1e-6)


# --- bad input -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change,match", [
    (dict(max_new_tokens=13),
     r"^prompt length 4 \+ DecodeConfig.max_new_tokens=13 exceeds the model's cache length 16$"),
    (dict(max_new_tokens=0), r"^DecodeConfig\.max_new_tokens must be a positive integer, got 0$"),
    (dict(num_beams=0), r"^DecodeConfig\.num_beams must be a positive integer, got 0$"),
    (dict(num_beams=True), r"^DecodeConfig\.num_beams must be a positive integer, got True$"),
    (dict(top_p=0.0), r"^DecodeConfig\.top_p must be in \(0, 1\], got 0\.0$"),
    (dict(top_p=1.5), r"^DecodeConfig\.top_p must be in \(0, 1\], got 1\.5$"),
    (dict(top_k=-1), r"^DecodeConfig\.top_k must be a non-negative integer \(0: off\), got -1$"),
    (dict(method="nucleus"), r"^DecodeConfig\.method='nucleus' is not one of greedy, sample, beam$"),
    (dict(min_new_tokens=9), r"^DecodeConfig\.min_new_tokens must be an integer in \[0, max_new_tokens=8\], got 9$"),
    (dict(temperature=0.0), r"^DecodeConfig\.temperature must be a finite number > 0, got 0\.0$"),
    (dict(repetition_penalty=-1.0), r"^DecodeConfig\.repetition_penalty must be a finite number > 0, got -1\.0$"),
    (dict(length_penalty=float("nan")), r"^DecodeConfig\.length_penalty must be a finite number, got nan$"),
    (dict(early_stopping="always"), r"^DecodeConfig\.early_stopping='always' is not one of False, True, never$"),
    (dict(early_stopping=1), r"^DecodeConfig\.early_stopping=1 is not one of False, True, never$"),
])
def test_bad_config_is_refused_before_compiling(change, match):
  lm, params = markov_lm(5, 16), {"w": markov_w(5, 16)}
  cfg = dataclasses.replace(decode.DecodeConfig(method="beam", max_new_tokens=8, num_beams=2), **change)
  ids = np.ones((3, 4), np.int32)
  with counting_compiles() as compiles, pytest.raises(ConfigError, match=match) as e:
    decode.decode_corpus(lm, params, ids, np.ones_like(ids), cfg, batch_size=3)
  assert "\n" not in str(e.value) and not compiles


def test_validate_bounds_and_accepted_types():
  """validate's boundaries, checked directly: the last accepted value of each bound passes and NumPy scalars
  count as numbers (configs built from arrays); a prompt plus its new tokens may fill the cache exactly."""
  ok = decode.DecodeConfig(method="sample", max_new_tokens=np.int64(4), min_new_tokens=4, num_beams=np.int32(1),
                           temperature=np.float32(1e-3), top_k=0, top_p=1.0, repetition_penalty=np.float64(0.5),
                           length_penalty=-3, early_stopping="never")
  ok.validate(prompt_len=12, cache_len=16)
  with pytest.raises(ConfigError, match=r"^prompt length 13 \+ DecodeConfig.max_new_tokens=4 exceeds"):
    ok.validate(prompt_len=13, cache_len=16)
  for change in (dict(top_p=1e-6), dict(min_new_tokens=0), dict(early_stopping=True), dict(early_stopping=False)):
    dataclasses.replace(ok, **change).validate()


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
