"""Beam search in collapse_jax/families/lm/decode.py == exhaustive search of HF's beam objective on a tiny fake
model (every hypothesis enumerated and scored in float64)."""
import itertools
import math

import numpy as np
import pytest

from collapse_jax.families.lm import decode
from tests.decode_fakes import markov_lm, markov_w


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
