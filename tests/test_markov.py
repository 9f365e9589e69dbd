"""collapse_jax.families.lm.markov against numpy/scipy brute force, closed forms and exact sampling statistics."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from scipy import special, stats

from collapse_jax.errors import ConfigError
from collapse_jax.families.lm import markov

# Jitted once per module: one compiled program per metric costs far less than op-by-op dispatch.
_sample = jax.jit(markov.sample_blocks, static_argnums=(1, 2))
_loglik = jax.jit(markov.true_loglik)
_logprobs = jax.jit(markov.token_logprobs)
_kl = jax.jit(markov.kl_source_model)
_kl_text = jax.jit(markov.kl_on_text)
_tail = jax.jit(markov.tail_coverage, static_argnums=2)
_entropy = jax.jit(markov.entropy_rate)

# Small sources, built once: V=48 is small enough to enumerate everything, V=600 shows the Zipf tail.
_SMALL = dict(vocab=48, branching=5, zipf_exponent=1.0, seed=3)


@pytest.fixture(scope="module")
def small():
  return markov.make_source(**_SMALL)


@pytest.fixture(scope="module")
def blocks(small):
  # One sample shape for the whole module, so sample_blocks compiles once.
  return np.asarray(_sample(small, 2048, 96, jax.random.PRNGKey(0)))


def _np(source):
  return (np.asarray(source.pi_V, np.float64), np.asarray(source.P_VxV, np.float64),
          np.asarray(source.succ_VxB), source.offset)


def test_rows_are_distributions_with_exactly_branching_successors(small):
  pi, P, succ, _ = _np(small)
  v, b = 48, 5
  np.testing.assert_allclose(P.sum(1), 1, atol=1e-6)  # float64 rows rounded to float32: 5 u + gamma(4) ~ 5e-7
  assert ((P > 0).sum(1) == b).all()
  np.testing.assert_array_equal(np.sort(np.nonzero(P)[1].reshape(v, b), axis=1), succ)
  # The self-loop and the rank neighbours are always in the support: they make it irreducible.
  assert (np.diag(P) > 0).all() and (np.diag(P, 1) > 0).all() and (np.diag(P, -1) > 0).all()
  # float32 log p (|log p| <= ~10): u |log p| + u ~ 7e-7 relative after exp, and P's own rounding u; 1e-5 is 10x.
  np.testing.assert_allclose(np.exp(np.asarray(small.logp_VxB)), P[np.arange(v)[:, None], succ], rtol=1e-5)


def test_stationary_matches_eig_and_power_iteration(small):
  pi, P, _, _ = _np(small)
  w, vl = scipy.linalg.eig(P, left=True, right=False)
  left = np.real(vl[:, np.argmin(np.abs(w - 1))])
  # pi: the float64 stationary of the float64 P, rounded to float32; eig sees the float32-rounded P, whose
  # relative perturbation u moves pi by ~u / (spectral gap): 1e-6 on masses <= 0.22 is ~1e3 ulps of slack.
  np.testing.assert_allclose(pi, left / left.sum(), atol=1e-6)
  # The lazy chain (P + I) / 2 has the same stationary law and is aperiodic, so its powers converge to it:
  # 2^60 steps by repeated squaring leave every row equal to pi (rows renormalised: P's float32 row sums are
  # 1 +- 1e-7, which 2^60 products would blow up).
  lazy = 0.5 * (P + np.eye(48))
  for _ in range(60):
    lazy = lazy @ lazy
    lazy /= lazy.sum(1, keepdims=True)
  # The gap to eig's vector is set by P's float32 row sums (1 +- 3e-8, the same on every machine): 2.2e-9 here,
  # under the default rtol 1e-7 (the active bound; atol adds 1e-10); float64 BLAS order adds ~V eps64 / gap ~ 3e-14.
  np.testing.assert_allclose(lazy, np.broadcast_to(left / left.sum(), lazy.shape), atol=1e-10)
  np.testing.assert_allclose(pi, lazy[0], atol=1e-6)  # as against eig above
  # The float64 solver on the same matrix (rows renormalised in float64, so that pi (P - I) = 0 is consistent).
  P64 = P / P.sum(1, keepdims=True)
  # float64 on any BLAS/LAPACK: the LU solve's residual <= gamma_3V |L||U||pi| (Higham 9.4; <= 1.09 * gamma_144
  # = 1.7e-14 for this matrix) plus the product's gamma_V * max pi = 1.2e-15. Was 1e-15, below that worst case
  # (typical: 6e-17 here); any non-stationary pi is off by >> 1e-10.
  np.testing.assert_allclose(markov.stationary(P64) @ P64, markov.stationary(P64), atol=2e-14)
  # float64 eigenvector vs solve: ~eps64 / (spectral gap) ~ 1e-14; 1e-8 is loose on purpose (eig's sign/scale).
  np.testing.assert_allclose(markov.stationary(P64), left / left.sum(), atol=1e-8)


@pytest.mark.parametrize("s", [0.8, 1.2])
def test_stationary_is_zipf(s):
  # Sinkhorn reaches the Zipf marginals to 1e-10 here, so pi is the target up to float32 rounding and the
  # log-log rank-frequency fit has slope -s to far better than the 1e-3 asked. The tail exists and is reached:
  # the rarest token keeps its full target mass V^-s / H.
  source = markov.make_source(vocab=600, branching=12, zipf_exponent=s, seed=1)
  pi = np.asarray(source.pi_V, np.float64)
  np.testing.assert_allclose(pi, markov.zipf_target(600, s), rtol=1e-4)  # 1e-10 + u32 (6e-8) << 1e-4
  ranks = np.arange(1, 601)
  slope = np.polyfit(np.log(ranks), np.log(np.sort(pi)[::-1]), 1)[0]
  assert abs(slope + s) < 1e-3, slope  # a relative error d in pi moves a least-squares slope by <~ d: 1e-4


def test_sampled_transitions_and_first_tokens_match_the_source(small, blocks):
  pi, P, _, off = _np(small)
  x = blocks - off
  assert blocks.dtype == np.int32 and blocks.shape == (2048, 96) and x.min() >= 0 and x.max() < 48
  counts = np.zeros((48, 48))
  np.add.at(counts, (x[:, :-1].ravel(), x[:, 1:].ravel()), 1)
  assert counts[P == 0].sum() == 0
  # Given N_i visits to i, the N_i successors are i.i.d. draws from P_i (strong Markov property), so the
  # row-wise Pearson statistics add up to a chi-square with sum_i (b - 1) degrees of freedom (every
  # expected count here is >= 5 except in a few rare rows, which the cut below leaves out).
  stat, dof = 0.0, 0
  for i in range(48):
    n = counts[i].sum()
    if n * P[i][P[i] > 0].min() >= 5:
      e = n * P[i][P[i] > 0]
      stat += np.sum((counts[i][P[i] > 0] - e) ** 2 / e)
      dof += (P[i] > 0).sum() - 1
  assert dof > 100 and stats.chi2.sf(stat, dof) > 1e-4, (stat, dof)  # statistical: false alarm 1e-4 (fixed key)
  # First tokens of independent blocks: i.i.d. from pi.
  first = np.bincount(x[:, 0], minlength=48)
  keep = 2048 * pi >= 5
  e = 2048 * pi[keep]
  assert stats.chi2.sf(np.sum((first[keep] - e) ** 2 / e) + 0.0, keep.sum() - 1) > 1e-4  # false alarm 1e-4


def test_true_loglik_matches_brute_force(small, blocks):
  pi, P, _, off = _np(small)
  ids = blocks[:64, :12].copy()
  # <pad> (model id 1) between tokens 1 and 1: clipped to language token 0 it would pass for the possible
  # transitions 1 -> 0 -> 1 (rank neighbours), so the test sees whether out-of-language ids are refused.
  ids[3, 4:7] = (1 + off, 1, 1 + off)
  i, j = np.argwhere(P == 0)[0]
  ids[7, 2:4] = (i + off, j + off)  # an off-support bigram
  mask = np.ones(ids.shape, bool)
  mask[10, 6:] = False
  total, n_ok, n_all = 0.0, 0, 0
  for r in range(ids.shape[0]):
    x = ids[r] - off
    for t in range(ids.shape[1]):
      if not mask[r, t]:
        continue
      n_all += 1
      ok = 0 <= x[t] < 48 and (t == 0 or 0 <= x[t - 1] < 48)
      p = (pi[x[t]] if t == 0 else P[x[t - 1], x[t]]) if ok else 0.0
      if p > 0:
        total, n_ok = total + math.log(p), n_ok + 1
  out = _loglik(small, jnp.asarray(ids), jnp.asarray(mask))
  assert n_all - n_ok >= 3  # at least: the pad, the token after it, the off-support transition
  # float32 sum of ~700 log-probabilities of one sign: gamma(700) ~ 4e-5 worst case, ~sqrt(700) u ~ 2e-6 as a
  # random walk (the sum may be pairwise, gamma(log2 700) ~ 6e-7). rtol 1e-5 judged at risk on a sequential sum.
  np.testing.assert_allclose(float(out["loglik"]), total / n_ok, rtol=1e-5)
  # A count ratio: integers exact in float32 below 2^24, one rounding in the division.
  np.testing.assert_allclose(float(out["impossible"]), (n_all - n_ok) / n_all, rtol=1e-6)


def _model_logq(P, off, rng, eps):
  """A model's full log-softmax over W = off + V + 3 ids: the truth mixed with noise over every id."""
  v = P.shape[0]
  q = np.zeros((P.shape[0], off + v + 3))
  q[:, off:off + v] = P
  noise = rng.dirichlet(np.ones(q.shape[1]), size=v)
  return np.log((1 - eps) * q + eps * noise)


def test_kl_source_model_is_zero_for_the_truth_and_exact_for_a_perturbation(small):
  pi, P, _, off = _np(small)
  rng = np.random.default_rng(0)
  with np.errstate(divide="ignore"):
    # q = P rounded to float32: KL ~ sum pi P (u)^2 plus the float32 sum's rounding ~ gamma(240) * |terms| ~ 1e-7.
    assert abs(float(_kl(small, jnp.asarray(_model_logq(P, off, rng, 0.0))))) < 1e-6
  logq = _model_logq(P, off, rng, 0.3)
  # rel_entr does not renormalise q over the language ids: mass a model puts on specials is lost, as it should.
  want = sum(pi[i] * special.rel_entr(P[i], np.exp(logq[i, off:off + 48])).sum() for i in range(48))
  # float32 KL of 240 terms p (log p - log q) vs float64: cancellation of O(log V) terms into KL ~ O(0.1):
  # gamma(240) * sum|terms| / KL ~ 1.4e-5 * 3 / 0.3 ~ 1.4e-4 worst case; see the measured ratio in the report.
  np.testing.assert_allclose(float(_kl(small, jnp.asarray(logq, jnp.float32))), want, rtol=1e-4)


def test_kl_on_text_matches_per_position_brute_force(small, blocks):
  _, P, _, off = _np(small)
  rng = np.random.default_rng(1)
  ids = blocks[:4, :6]
  logq = np.stack([_model_logq(P, off, rng, 0.5)[ids[n] - off] for n in range(4)])  # [N, L, W]
  want = np.mean([special.rel_entr(P[ids[n, t] - off], np.exp(logq[n, t, off:off + 48])).sum()
                  for n in range(4) for t in range(6)])
  got = _kl_text(small, jnp.asarray(ids), jnp.asarray(logq, jnp.float32))
  np.testing.assert_allclose(float(got), want, rtol=1e-4)  # as above, 24 positions of 48 terms each


def test_entropy_rate_closed_form_and_long_sample(small, blocks):
  pi, P, _, _ = _np(small)
  with np.errstate(divide="ignore", invalid="ignore"):
    want = -np.nansum(pi[:, None] * P * np.log(P))
  h = float(_entropy(small))
  np.testing.assert_allclose(h, want, rtol=1e-5)  # float32, 240 terms of one sign: ~sqrt(240) u ~ 1e-6, gamma 1.4e-5
  # -log p per transition averages to H over stationary text. Blocks are independent, so the spread of the
  # 2048 block means gives the standard error honestly despite the dependence inside a block: 5 of them.
  per_block = -np.asarray(_logprobs(small, jnp.asarray(blocks)))[:, 1:].mean(1)
  se = per_block.std(ddof=1) / math.sqrt(per_block.size)
  assert abs(per_block.mean() - h) < 5 * se, (per_block.mean(), h, se)


def test_tail_coverage_of_known_sets(small):
  pi, P, succ, off = _np(small)
  tail = np.argsort(pi)[:math.ceil(0.25 * 48)]
  # Blocks of two tokens: the bigrams are exactly these pairs (one off-support, one with a <pad>).
  pairs = [(0, succ[0, 1]), (47, succ[47, 0]), (tail[0], succ[tail[0], 2]), (0, succ[0, 1])]
  i, j = np.argwhere(P == 0)[0]
  ids = np.array(pairs + [(i, j)]) + off
  ids = np.concatenate([ids, [[tail[1] + off, 1]]])
  tokens = {t for p in pairs + [(i, j)] for t in p} | {tail[1]}
  bigrams = set(pairs)
  out = _tail(small, jnp.asarray(ids), 0.25)
  bigram_mass = pi[:, None] * P
  flat = np.sort((pi[:, None] * np.take_along_axis(P, succ, 1)).ravel())
  cut = flat[math.ceil(0.25 * flat.size) - 1]  # the bigram tail: masses up to this (no ties in practice)
  tail_bigrams = [(a, c) for a, c in bigrams if bigram_mass[a, c] <= cut]
  # float32 sums of <= 48 masses of one sign: gamma(48) ~ 3e-6 < 1e-5.
  np.testing.assert_allclose(float(out["token_mass"]), sum(pi[t] for t in tokens), rtol=1e-5)
  np.testing.assert_allclose(float(out["tail_token_mass"]), sum(pi[t] for t in tokens if t in tail), rtol=1e-5)
  np.testing.assert_allclose(float(out["tail_token_frac"]),
                             sum(pi[t] for t in tokens if t in tail) / pi[tail].sum(), rtol=1e-5)
  np.testing.assert_allclose(float(out["bigram_mass"]), sum(bigram_mass[p] for p in bigrams), rtol=1e-5)
  assert tail_bigrams  # the test covers a present tail bigram
  np.testing.assert_allclose(float(out["tail_bigram_mass"]), sum(bigram_mass[p] for p in tail_bigrams), rtol=1e-5)


def test_tail_coverage_full_and_empty(small, blocks):
  out = _tail(small, jnp.asarray(blocks), 0.5)
  np.testing.assert_allclose(float(out["token_mass"]), 1, rtol=1e-5)  # 196,608 tokens see all 48; gamma(48) < 1e-5
  np.testing.assert_allclose(float(out["tail_token_frac"]), 1, rtol=1e-5)
  # Fixed key, 194,560 transitions: expected present share of the tail bigrams 0.97 by count, 0.9998 by mass
  # (sum m e^{-mn}); expected missing bigram mass 1.5e-5: both thresholds have wide slack.
  assert float(out["tail_bigram_frac"]) > 0.9 and float(out["bigram_mass"]) > 0.99
  none = _tail(small, jnp.asarray(blocks), 0.5, jnp.zeros(blocks.shape, bool))
  assert all(float(a) == 0 for a in none.values())


def test_deterministic_from_the_seed():
  a, b, c = (markov.make_source(40, 4, 1.1, s) for s in (7, 7, 8))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert not np.array_equal(np.asarray(a.P_VxV), np.asarray(c.P_VxV))


def test_offset_maps_language_ids(small):
  src0 = markov.make_source(**_SMALL, specials=0)
  np.testing.assert_array_equal(np.asarray(src0.P_VxV), np.asarray(small.P_VxV))
  assert small.vocab_total == 52 and src0.vocab_total == 48
  x = _sample(src0, 2048, 96, jax.random.PRNGKey(4))
  np.testing.assert_array_equal(np.asarray(_sample(small, 2048, 96, jax.random.PRNGKey(4))), x + 4)


@pytest.mark.parametrize("field,kwargs", [
    ("vocab", dict(vocab=2)),
    ("branching", dict(branching=2)),
    ("branching", dict(vocab=10, branching=11)),
    ("zipf_exponent", dict(zipf_exponent=0.0)),
    ("zipf_exponent", dict(zipf_exponent=float("nan"))),
    ("seed", dict(seed=-1)),
    ("seed", dict(seed=1.5)),
    ("concentration", dict(concentration=-1.0)),
    ("specials", dict(specials=-1)),
])
def test_bad_parameters_name_the_field(field, kwargs):
  with pytest.raises(ConfigError, match=rf"config\.lm\.markov\.{field} "):
    markov.make_source(**dict(dict(vocab=20, branching=4, zipf_exponent=1.0, seed=0), **kwargs))


def test_bad_call_arguments_name_them(small):
  with pytest.raises(ConfigError, match="tail_fraction"):
    markov.tail_coverage(small, jnp.zeros((1, 2), jnp.int32), 0.0)
  with pytest.raises(ConfigError, match="block_len"):
    markov.sample_blocks(small, 2, 0, jax.random.PRNGKey(0))
  with pytest.raises(ConfigError, match="vocab \\+ specials"):
    markov.kl_source_model(small, jnp.zeros((48, 48)))
