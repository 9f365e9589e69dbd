"""Sampling in collapse_jax/families/lm/decode.py (the warpers of warp.py): sampler distributions by chi-square
against a fake model of known logits, with the test's power against each plausible bug computed, not assumed."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from collapse_jax.families.lm import decode
from tests.decode_fakes import const_lm

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
