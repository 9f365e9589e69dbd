"""The single-Gaussian family against closed-form theory, numpy and scipy; its config fields are refused or honoured."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import linalg

from collapse_jax import loop, registry
from collapse_jax.family import Generation
from collapse_jax.families.gaussian import family as gaussian
from collapse_jax.metrics import read_jsonl
from tests.helpers import load_config, refused_before_compilation


def _family(**gauss):
  return registry.build(load_config("gaussian", "100", **{f"gaussian__{k}": v for k, v in gauss.items()}))[1]


def test_fit_moments_match_numpy_and_ignore_masked_rows():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(50, 3)).astype(np.float32)
  junk = np.full((14, 3), 1e3, np.float32)
  w = np.r_[np.ones(50), np.zeros(14)].astype(np.float32)
  for unbiased in (False, True):
    mu, cov = gaussian.fit_moments(jnp.asarray(np.r_[x, junk]), jnp.asarray(w), unbiased)
    # float32 vs float64 numpy, 50 rows of O(1): gamma(50) ~ 3e-6 of sum|x| / n for the mean, a few times that
    # for the centred squares, relative to entries that may be near 0 (hence atol); junk leaking would be O(1e3).
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cov, np.cov(x.T, ddof=1 if unbiased else 0), rtol=1e-4, atol=1e-6)


def test_w2_closed_form():
  # 1-D: W2 = sqrt((mu - mu0)^2 + (sigma - sigma0)^2).
  w2 = gaussian.w2_to_isotropic(jnp.array([0.3]), jnp.array([[0.25]]), 0.0, 1.0)
  np.testing.assert_allclose(w2, np.sqrt(0.3**2 + 0.5**2), rtol=1e-6)  # float32, a handful of ops: ~8 u = 5e-7
  # d-D against the general formula with scipy's matrix square root.
  rng = np.random.default_rng(1)
  a = rng.normal(size=(3, 3))
  cov = a @ a.T + 0.1 * np.eye(3)
  mu = rng.normal(size=3)
  s0 = 1.7
  ref = np.sum((mu - 0.2) ** 2) + np.trace(cov) + 3 * s0**2 - 2 * np.trace(linalg.sqrtm(s0**2 * np.eye(3) @ cov).real)
  got = gaussian.w2_to_isotropic(jnp.asarray(mu, jnp.float32), jnp.asarray(cov, jnp.float32), 0.2, s0)
  # float32 3x3 matrix square root (eigh / Newton) vs scipy's float64: ~gamma(9) * cond(cov) relative before the
  # cancellation in tr + tr - 2 tr(sqrt); cov = aa^T + 0.1 I is mildly conditioned here, 1e-5 is ~20x gamma(9).
  np.testing.assert_allclose(got, np.sqrt(ref), rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# The family object outside the loop: each config field reaches the arithmetic.


@pytest.mark.parametrize("estimator,ddof", [("mle", 0), ("unbiased", 1)])
def test_family_fit_honours_estimator_and_weights(estimator, ddof):
  fam = _family(dim=3, estimator=estimator)
  rng = np.random.default_rng(2)
  x = rng.normal(size=(40, 3)) * [1.0, 2.0, 0.5] + [1.0, -1.0, 3.0]
  buf = np.r_[x, np.full((9, 3), 1e3)].astype(np.float32)  # padding rows a fit must not see
  w = np.r_[np.ones(40), np.zeros(9)].astype(np.float32)
  gen = Generation(jnp.int32(0), jnp.asarray(buf), jnp.asarray(w), None, None, {}, {})
  model = jax.jit(fam.fit)(gen, jax.random.key(0))
  # float32 vs float64, 40 rows with |x| <= ~6: gamma(40) * max|x| ~ 1.4e-5 worst case for the mean, the random
  # walk ~ sqrt(40) u * 3 ~ 1e-6; the cov's centred squares likewise, its rtol 1e-4 covers the mean's shift.
  np.testing.assert_allclose(model["mean"], x.mean(0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(model["cov"], np.cov(x.T, ddof=ddof), rtol=1e-4, atol=1e-5)


def test_family_evaluate_metrics_against_numpy_and_scipy():
  # Non-unit std and d > 1, so sigma vs sigma^2 and a missing /d both show; sqrt(tr(cov)/d) < s0 here, so the
  # absolute value in std_abs_err matters.
  mu0, s0, d = 0.5, 2.5, 3
  fam = _family(dim=d, true_mean=mu0, true_std=s0)
  rng = np.random.default_rng(3)
  a = rng.normal(size=(d, d))
  cov = a @ a.T + 0.1 * np.eye(d)  # anisotropic: tr(sqrt(cov)) != sqrt(tr(cov))
  mu = rng.normal(size=d)
  model = {"mean": jnp.asarray(mu, jnp.float32), "cov": jnp.asarray(cov, jnp.float32)}
  got = jax.jit(fam.evaluate)(model, Generation(jnp.int32(0), None, None, None, model, {}, {}))
  cov0 = s0**2 * np.eye(d)
  root0 = linalg.sqrtm(cov0).real
  w2_sq = np.sum((mu - mu0) ** 2) + np.trace(cov + cov0) - 2 * np.trace(linalg.sqrtm(root0 @ cov @ root0).real)
  want = {
      "var_ratio": np.trace(cov) / np.trace(cov0),
      "std_abs_err": abs(np.sqrt(np.trace(cov) / d) - s0),
      "mean_abs_err": np.linalg.norm(mu - mu0),
      "cov_frob_err": np.linalg.norm(cov - cov0, "fro"),
      "w2": np.sqrt(w2_sq),
  }
  assert set(got) == set(want) == set(fam.metric_names)
  for k, v in want.items():
    # float32 on O(1) values: a few tens of roundings (3x3 sqrtm, norms) ~ gamma(32) ~ 2e-6, before the w2
    # cancellation (w2^2 ~ O(1) from terms ~ O(10)): 10x that, hence 2e-5.
    np.testing.assert_allclose(float(got[k]), v, rtol=2e-5, err_msg=k)


def test_family_init_chain_draws_n_real_rows_of_the_true_gaussian():
  n, d, mu0, s0 = 20_000, 3, -2.0, 0.5
  cfg = load_config("gaussian", "100", n_real=n, gaussian__dim=d, gaussian__true_mean=mu0, gaussian__true_std=s0)
  _, fam = registry.build(cfg)
  x, aux = jax.jit(fam.init_chain)(jax.random.key(4), fam.load_data().shared)
  x = np.asarray(x, np.float64)
  assert x.shape == (n, d) and aux == {}
  # 5 standard errors of the sample mean (s0/sqrt(n)) and of the sample variance (s0^2 sqrt(2/n)).
  np.testing.assert_array_less(np.abs(x.mean(0) - mu0), 5 * s0 / np.sqrt(n))
  np.testing.assert_array_less(np.abs(x.var(0) - s0**2), 5 * s0**2 * np.sqrt(2 / n))


# ---------------------------------------------------------------------------------------------------------
# Theory through the loop: exact moments of products of independent scaled chi-squares.


def _chi2_product_moments(ns, unbiased):
  """E[Y_g^r] for r = 0..4 and every g, [G, 5]: Y_g = X_0 ... X_g with independent X_i = chi2(n_i - 1) / c_i,
  c_i = n_i - 1 (unbiased) or n_i (MLE). In 1-D, sigma_hat^2_g / sigma^2 is exactly Y_g: generation i fits n_i
  draws of N(mu_{i-1}, sigma^2_{i-1}), and n_i sigma_hat^2_i (MLE) / sigma^2_{i-1} ~ chi2(n_i - 1) (Cochran)."""
  out, m = [], np.ones(5)
  for n in ns:
    k, c = n - 1, (n - 1 if unbiased else n)
    m = m * np.array([np.prod([k + 2.0 * j for j in range(r)]) / c**r for r in range(5)])
    out.append(m)
  return np.array(out)


def _walk_moments(ns, m_Gx5, s0):
  """(E[D_g^2], Var[D_g^2]) of D_g = mu_hat_g - mu0 (1-D). D_g = sum_i sigma_{i-1} z_i / sqrt(n_i) with
  z_i ~ N(0, 1) independent of every sigma (a normal sample's mean is independent of its variance), so given
  V_g = sum_i sigma^2_{i-1} / n_i, D_g ~ N(0, V_g): E[D^2] = E[V], E[D^4] = 3 E[V^2]."""
  p1 = np.r_[1.0, m_Gx5[:, 1]]  # E[P_{i-1}], P_{i-1} = sigma^2_{i-1} / s0^2 = Y_{i-1}, P_{-1} = 1
  p2 = np.r_[1.0, m_Gx5[:, 2]]
  ev, evv = [], []
  for g in range(len(ns)):
    ev.append(s0**2 * sum(p1[i] / ns[i] for i in range(g + 1)))
    # E[P_{i-1} P_{j-1}] = E[P_{i-1}^2] prod_{i<=l<j} E[X_l] for i <= j.
    e2 = sum((1 if i == j else 2) * p2[i] * p1[j] / p1[i] / (ns[i] * ns[j])
             for i in range(g + 1) for j in range(i, g + 1))
    evv.append(s0**4 * e2)
  ev, evv = np.array(ev), np.array(evv)
  return ev, 3 * evv - ev**2


# (estimator, M, n_real, chains, generations). Power against the bugs each case is there for, in standard errors
# of the checked statistic at the 5-SE threshold below (computed with these same formulas):
#  - mle M=100: a 1% bias per refit (e.g. dividing by M+1, or a 0.99 shrink) moves the chain-mean variance ratio
#    by 4.4 SE at generation 0 and 16 SE at generation 19 (4,000 chains x 20 generations, 8M draws).
#  - mle M=4: training on one sample fewer than M from generation 1 on (a 1e-4 effect per refit at M = 100,
#    which no affordable chain count resolves) lowers the mean by 11% per refit here: 19-26 SE at 40,000 chains.
#  - unbiased M=4: the mean stays exactly 1 (the estimator's exact expectation); one sample fewer raises the
#    variance across chains by 16 SE at generation 1 (40,000 chains).
# n_real != M, so generation 0 must fit n_real real data and later generations M synthetic ones.
_THEORY = [("mle", 100, 100, 4000, 20), ("mle", 4, 6, 40_000, 4), ("unbiased", 4, 6, 40_000, 4)]


@pytest.mark.parametrize("estimator,m,n_real,chains,gens", _THEORY, ids=["mle100", "mle4", "unbiased4"])
def test_variance_and_mean_walk_follow_exact_theory(tmp_path, estimator, m, n_real, chains, gens):
  mu0, s0 = 3.0, 2.0  # not the standard normal: the family must draw, sample and normalise with both
  cfg = load_config("gaussian", "100", samples__n=m, n_real=n_real, generations=gens, chains=chains,
                    chain_batch=chains, checkpoint_every=gens, plots=False, seed=7, gaussian__estimator=estimator,
                    gaussian__true_mean=mu0, gaussian__true_std=s0)
  wd = str(tmp_path / "run")
  hist = loop.run(cfg, wd)
  ns = [n_real] + [m] * (gens - 1)
  assert [r["train_samples"] for r in read_jsonl(os.path.join(wd, "metrics.jsonl"))] == ns
  mom = _chi2_product_moments(ns, estimator == "unbiased")
  mean, var = mom[:, 1], mom[:, 2] - mom[:, 1] ** 2
  mu4 = mom[:, 4] - 4 * mom[:, 3] * mom[:, 1] + 6 * mom[:, 2] * mom[:, 1] ** 2 - 3 * mom[:, 1] ** 4
  if estimator == "unbiased":
    np.testing.assert_allclose(mean, 1.0, rtol=1e-12)  # float64 closed form vs product of <= 20 factors: ~20 eps64
  else:
    np.testing.assert_allclose(mean[-1], ((n_real - 1) / n_real) * ((m - 1) / m) ** (gens - 1), rtol=1e-12)
  vr = hist["metrics"]["var_ratio"].astype(np.float64)  # columns: mean, std (ddof 0) over chains, quantiles
  # 5 standard errors per generation: a false alarm has odds of about 1e-6 per check; the bugs above sit at
  # 11-26 SE. The chain variance's SE is sqrt((mu4 - var^2) / C) (CLT for the sample variance).
  z_mean = (vr[:, 0] - mean) / np.sqrt(var / chains)
  z_var = (vr[:, 1] ** 2 - var * (chains - 1) / chains) / np.sqrt((mu4 - var**2) / chains)
  assert np.all(np.abs(z_mean) < 5), z_mean
  assert np.all(np.abs(z_var) < 5), z_var
  # The mean's random walk: mean over chains of (mu_hat - mu0)^2 is mean^2 + std^2 of mean_abs_err.
  ev, vv = _walk_moments(ns, mom, s0)
  me = hist["metrics"]["mean_abs_err"].astype(np.float64)
  z_walk = (me[:, 0] ** 2 + me[:, 1] ** 2 - ev) / np.sqrt(vv / chains)
  assert np.all(np.abs(z_walk) < 5), z_walk


def test_accumulate_keeps_variance_far_above_replace(tmp_path):
  n, out = 100, {}
  # Accumulate's spread across chains is small, so fewer chains suffice (its pool makes each chain 100x dearer).
  for regime, chains in (("replace", 1000), ("accumulate", 200)):
    cfg = load_config("gaussian", "100", generations=n, chains=chains, checkpoint_every=n, plots=False,
                      regime__name=regime)
    out[regime] = loop.run(cfg, str(tmp_path / regime))["metrics"]["var_ratio"][-1, 0]
  # Accumulating n+1 sets of M samples: the variance estimate stays near 1 (it is bounded below, not a product).
  # Fixed seed (threefry: the same draws on every machine). Accumulate shrinks by ~1/((g+1)M) per generation,
  # prod ~ exp(-H_100 / 100) ~ 0.95, far above 0.85 at 200 chains. Replace: E = 0.99^100 = 0.366 with a chain
  # s.d. of 0.925 (chi2 products), SE 0.029 over 1000 chains: 0.45 is only 2.9 SE, judged at risk were the seed
  # or chain count changed (not widened: 5 SE = 0.51 would break the 2x check below).
  assert out["accumulate"] > 0.85, out
  assert out["replace"] < 0.45, out
  assert out["accumulate"] > 2 * out["replace"], out


# ---------------------------------------------------------------------------------------------------------
# Bad input: refused before anything is compiled, with the field named.


_BAD = [
    ("dim=0", dict(gaussian__dim=0), r"config\.gaussian\.dim must be a positive integer"),
    ("dim=-2", dict(gaussian__dim=-2), r"config\.gaussian\.dim must be a positive integer"),
    ("dim=True", dict(gaussian__dim=True), r"config\.gaussian\.dim must be a positive integer"),
    ("true_std=0", dict(gaussian__true_std=0.0), r"config\.gaussian\.true_std must be"),
    ("true_std=-1", dict(gaussian__true_std=-1.0), r"config\.gaussian\.true_std must be"),
    ("true_std=inf", dict(gaussian__true_std=float("inf")), r"config\.gaussian\.true_std must be"),
    ("true_mean=nan", dict(gaussian__true_mean=float("nan")), r"config\.gaussian\.true_mean must be"),
    ("estimator=median", dict(gaussian__estimator="median"), r"config\.gaussian\.estimator='median'"),
    ("unbiased,n=1", dict(gaussian__estimator="unbiased", samples__n=1),
     r"config\.samples\.n must be >= 2 for the unbiased"),
    ("unbiased,n_real=1", dict(gaussian__estimator="unbiased", n_real=1),
     r"config\.n_real must be >= 2 for the unbiased"),
]


@pytest.mark.parametrize("overrides,match", [b[1:] for b in _BAD], ids=[b[0] for b in _BAD])
def test_bad_config_refused_before_compilation(tmp_path, monkeypatch, overrides, match):
  cfg = load_config("gaussian", "100", generations=2, chains=2, checkpoint_every=2, plots=False, **overrides)
  refused_before_compilation(tmp_path, monkeypatch, cfg, match)


def test_missing_section_refused_before_compilation(tmp_path, monkeypatch):
  cfg = load_config("gaussian", "100", plots=False)
  del cfg["gaussian"]
  refused_before_compilation(tmp_path, monkeypatch, cfg, r"config\.gaussian is missing")
  # Another family's section in its place is not taken for it: refused by its name.
  cfg = load_config("gmm", "quick", family="gaussian", plots=False)
  refused_before_compilation(tmp_path, monkeypatch, cfg, r"unknown config field gmm")


def test_smallest_valid_settings_are_accepted():
  for overrides in (dict(gaussian__dim=1, gaussian__estimator="unbiased", samples__n=2, n_real=2),
                    dict(gaussian__true_std=1e-3, gaussian__true_mean=-5.0, samples__n=1)):
    registry.build(load_config("gaussian", "100", **overrides))


def test_expected_var_ratio_and_theory_figure(tmp_path):
  # Closed forms: (1 - 1/M)^(g+1) for a fixed M; a product over the generations' own sizes otherwise; 1 unbiased.
  # float64 products of <= 5 factors vs closed forms: a few eps64, default rtol 1e-7 is far above.
  np.testing.assert_allclose(gaussian.expected_var_ratio([100] * 5, False), [(0.99) ** (g + 1) for g in range(5)])
  np.testing.assert_allclose(gaussian.expected_var_ratio([4, 2, 5], False), [3 / 4, 3 / 8, 3 / 10])
  assert gaussian.expected_var_ratio([4, 2, 5], True) == [1.0, 1.0, 1.0]
  wd = tmp_path / "run"
  loop.run(load_config("gaussian", "100", chains=16, generations=4, checkpoint_every=4, plots=True), str(wd))
  assert (wd / "plots" / "gaussian_var_ratio.png").stat().st_size > 0
  # Accumulating regimes have no such closed form: no theory figure.
  wd2 = tmp_path / "acc"
  loop.run(load_config("gaussian", "100", chains=16, generations=4, checkpoint_every=4, plots=True,
                       regime__name="accumulate"), str(wd2))
  assert not (wd2 / "plots" / "gaussian_var_ratio.png").exists()
