"""The GMM family: each config field and metric against scikit-learn / scipy, bad input refused before compiling,
and through the generation loop: paper-style metrics, sharding invariance, scatter snapshots."""
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture
from sklearn.mixture._gaussian_mixture import _estimate_gaussian_parameters

from collapse_jax import loop, registry
from collapse_jax.family import Generation
from collapse_jax.families.gmm import em
from tests.helpers import chain_stats_close, load_config, refused_before_compilation


def _quick(**kw):
  base = dict(generations=8, chains=12, checkpoint_every=4, plots=False, snapshot_generations=(0, 7))
  base.update(kw)
  return load_config("gmm", "quick", **base)


def test_sharded_equals_unsharded_float64(tmp_path):
  """1 device vs 8: 12 chains padded to 16 and split over the mesh give the same metrics and samples.

  Checked in float64. In float32 the single-device and the multi-device (SPMD) compilations of the same
  per-chain program differ in the last bit of a few log-densities, and EM's stopping rule (|change| < tol)
  can turn that into one iteration more or less, which later generations amplify (a chaotic recursion); in
  float64 the same rounding is 1e-16 and the runs agree to 1e-9 over several generations.
  """
  with jax.enable_x64(True):
    one = loop.run(_quick(num_devices=1), str(tmp_path / "one"))
    eight = loop.run(_quick(num_devices=8), str(tmp_path / "eight"))
  # Stats reduced in float64 (12 chains: 2 gamma64(11) ~ 2e-15 between orders), then stored as float32: the two
  # round to the same or adjacent floats, 1 ulp = 2^-23 = 1.2e-7 relative < rtol 2e-7 (atol for exact zeros).
  # Snapshots float64: ~1e-16 per op amplified by 8 generations of EM; 1e-9 leaves ~1e7 for that.
  for k in one["metrics"]:
    np.testing.assert_allclose(one["metrics"][k], eight["metrics"][k], rtol=2e-7, atol=1e-9, err_msg=k)
  np.testing.assert_allclose(one["snapshots"], eight["snapshots"], rtol=1e-9, atol=1e-9)
  assert one["snapshots"].dtype == np.float64


def test_sharded_two_vs_eight_devices_bitwise_float32(tmp_path):
  """Across multi-device meshes the compiled per-device program is the same, so float32 agrees bit for bit."""
  two = loop.run(_quick(num_devices=2), str(tmp_path / "two"))
  eight = loop.run(_quick(num_devices=8), str(tmp_path / "eight"))
  for k in two["metrics"]:
    np.testing.assert_array_equal(two["metrics"][k][:, 2:], eight["metrics"][k][:, 2:], err_msg=k)  # quantiles
    # mean and std: the 12 chains' sums in another order, (2 gamma_11 + 2u) * rms (was rtol 1e-6 < 2 gamma_11).
    chain_stats_close(two["metrics"][k], eight["metrics"][k], 12, err_msg=k)


def test_generation_zero_metrics_against_theory(tmp_path):
  hist = loop.run(_quick(chains=32, generations=4, checkpoint_every=4), str(tmp_path / "r"))
  m = hist["metrics"]
  assert np.all(m["l2_to_gen0"][0] == 0)  # generation 0 compared with itself
  # A 2-component fit of 1000 draws from N(0, I) is close to N(0, I): held-out log-likelihood near the
  # negative entropy -(D/2)(1 + log 2 pi) = -2.8379, and a total spread near 1.
  # Statistical, fixed seed, mean over 32 chains: held-out SE sqrt(Var log p = D/2 = 1) / sqrt(1000 * 32) =
  # 0.0056, overfitting bias ~ -11 params / (2 * 1000) = -0.0055: 0.03 is ~4.4 SE. The std: SE 1 / sqrt(2 * 2000
  # * 32) = 0.003 per-chain spread averaged, 0.03 ~ 10 SE.
  assert m["heldout_loglik"][0, 0] == pytest.approx(-2.8379, abs=0.03)
  assert m["mixture_std"][0, 0] == pytest.approx(1.0, abs=0.03)
  assert m["em_iters"][0, 0] >= 2


def test_collapse_visible_and_accumulate_resists(tmp_path):
  out = {}
  for regime in ("replace", "accumulate"):
    cfg = _quick(chains=8, generations=30, checkpoint_every=30, regime__name=regime)
    out[regime] = loop.run(cfg, str(tmp_path / regime))["metrics"]
  rep, acc = out["replace"], out["accumulate"]
  # Replacing the data drifts away from generation 0 and loses held-out likelihood; accumulating does far less.
  # Fixed seed, 8 chains: effect-size thresholds (2x, 0.05 nats), not rounding bounds; not derived statistically.
  assert rep["l2_to_gen0"][-1, 0] > 2 * acc["l2_to_gen0"][-1, 0]
  assert rep["heldout_loglik"][-1, 0] < acc["heldout_loglik"][-1, 0] - 0.05
  assert rep["l2_to_gen0"][-1, 0] > rep["l2_to_gen0"][1, 0]


def test_plots_written(tmp_path):
  wd = str(tmp_path / "p")
  loop.run(_quick(chains=2, plots=True), wd)
  for f in ("gmm_metrics.png", "gmm_snapshots.png"):
    assert os.path.getsize(os.path.join(wd, "plots", f)) > 10_000


# ---------------------------------------------------------------------------------------------------------
# The family object outside the loop, against scikit-learn from the same k-means++ seeds.

# Every EM/k-means setting differs from both the config's and em.py's defaults, so a field dropped on its way to
# the arithmetic (or a default used instead) changes the result. On data set "tol" EM converges at tol=1e-4
# after 20 iterations (6 at 1e-3, 91 at 1e-5); on data set "cap" it would need 37, so max_iter=30 stops it.
# Lloyd needs 20 and 19 iterations from these seeds, so kmeans_iter=2 stops it early. heldout differs from the
# 300 training data, so a held-out set of the wrong size shows.
_GMM = dict(components=3, dim=2, tol=1e-4, max_iter=30, reg_covar=0.05, kmeans_iter=2, heldout=250,
            true_mean=0.5, true_std=1.5)
_DATA_SEEDS = {"tol": 4, "cap": 1}
_N = 300


def _gmm_family(**gmm):
  return registry.build(load_config("gmm", "quick", samples__n=_N,
                                    **{f"gmm__{k}": v for k, v in {**_GMM, **gmm}.items()}))[1]


def _draw(seed):
  rng = np.random.default_rng(seed)
  means = rng.normal(size=(3, 2)) * 1.2  # overlapping blobs: EM keeps moving for tens of iterations
  comp = rng.integers(0, 3, _N)
  return means[comp] + rng.normal(size=(_N, 2)) * rng.uniform(0.5, 1.5, size=(3, 2))[comp]


def _sklearn_pipeline(x, seeds, kmeans_iter, tol, max_iter, reg_covar):
  """GaussianMixture(init_params='kmeans')'s recipe with given k-means seeds: Lloyd (KMeans), the M-step on its
  hard labels, then EM."""
  k = len(seeds)
  km = KMeans(k, init=seeds, n_init=1, max_iter=kmeans_iter, tol=1e-4, algorithm="lloyd").fit(x)
  nk, means, covs = _estimate_gaussian_parameters(x, np.eye(k)[km.labels_], reg_covar, "full")
  gm = GaussianMixture(k, tol=tol, max_iter=max_iter, reg_covar=reg_covar, weights_init=nk / nk.sum(),
                       means_init=means, precisions_init=np.linalg.inv(covs))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", ConvergenceWarning)
    return gm.fit(x)


@pytest.fixture(scope="module")
def fitted():
  """The family's fit (one compilation, float64) and scikit-learn's on both data sets, plus evaluate's output
  for model = the "tol" fit, model0 = the "cap" fit, and the family's own held-out set."""
  out = {}
  with jax.enable_x64(True):
    fam = _gmm_family()

    @jax.jit  # one compilation for both data sets
    def fit_and_seeds(buf, w, key):
      # The start is k-means++ from the key fit is given (trailing padding changes no draw); everything after
      # the seeds is scikit-learn's.
      return fam.fit(Generation(0, buf, w, None, None, None, None), key), em._kmeans_plusplus(buf.T, w, 3, key)

    for name, seed in _DATA_SEEDS.items():
      x = _draw(seed)
      buf = np.r_[x, np.full((40, 2), 1e3)]  # trailing padding rows (w = 0) that EM must not see
      w = np.r_[np.ones(_N), np.zeros(40)]
      model, seeds = jax.tree.map(np.asarray, fit_and_seeds(jnp.asarray(buf), jnp.asarray(w), jax.random.key(seed)))
      g = _GMM
      sk = _sklearn_pipeline(x, seeds, g["kmeans_iter"], g["tol"], g["max_iter"], g["reg_covar"])
      sk_default_kmeans = _sklearn_pipeline(x, seeds, 300, g["tol"], g["max_iter"], g["reg_covar"])
      out[name] = dict(x=x, model=model, sk=sk, sk_default_kmeans=sk_default_kmeans)

    @jax.jit
    def evaluate(model, model0, key):
      aux = fam.init_chain(key, None)[1]
      return aux, fam.evaluate(model, Generation(0, None, None, None, model0, aux, None))

    aux, metrics = evaluate(out["tol"]["model"], out["cap"]["model"], jax.random.key(9))
    out["aux"], out["metrics"] = jax.tree.map(np.asarray, aux), jax.tree.map(float, metrics)
  out["family"] = fam
  return out


@pytest.mark.parametrize("data", list(_DATA_SEEDS))
def test_family_fit_matches_sklearn_with_configured_settings(fitted, data):
  """components, tol, max_iter, reg_covar and kmeans_iter all reach k-means and EM: the fit equals scikit-learn's
  run with the same settings from the same seeds, iteration for iteration (float64)."""
  r = fitted[data]
  gmm, sk = r["model"]["gmm"], r["sk"]
  assert gmm.means.shape == (3, 2) and gmm.means.dtype == np.float64
  assert int(r["model"]["n_iter"]) == sk.n_iter_
  assert bool(r["model"]["converged"]) == sk.converged_ == (data == "tol")
  assert sk.n_iter_ == {"tol": 20, "cap": 30}[data]  # the data set still exercises what its name says
  # float64, two programs, the same iterations: ~N eps64 ~ 1e-13 per iteration; 1e-9 leaves 1e4 for <= 30 of them.
  np.testing.assert_allclose(gmm.weights, sk.weights_, atol=1e-9, rtol=0)
  np.testing.assert_allclose(gmm.means, sk.means_, atol=1e-9, rtol=0)
  np.testing.assert_allclose(gmm.covs, sk.covariances_, atol=1e-9, rtol=0)
  # kmeans_iter matters here: a full Lloyd run would have started EM elsewhere.
  assert np.abs(r["sk_default_kmeans"].means_ - sk.means_).max() > 1e-3  # effect floor, >> the 1e-9 above


def _overlap(p, q):
  """Integral of the product of two mixtures, sum_ij a_i b_j N(m_i; n_j, S_i + T_j), with scipy's density."""
  return sum(a * b * stats.multivariate_normal(m, s + t).pdf(n)
             for a, m, s in zip(*p) for b, n, t in zip(*q))


def _l2(p, q):
  return np.sqrt(_overlap(p, p) - 2 * _overlap(p, q) + _overlap(q, q))


def test_family_evaluate_metrics_against_sklearn_and_scipy(fitted):
  got, fam = fitted["metrics"], fitted["family"]
  sk, sk0 = fitted["tol"]["sk"], fitted["cap"]["sk"]
  p = (sk.weights_, sk.means_, sk.covariances_)
  p0 = (sk0.weights_, sk0.means_, sk0.covariances_)
  truth = (np.ones(1), np.full((1, 2), _GMM["true_mean"]), _GMM["true_std"] ** 2 * np.eye(2)[None])
  heldout = fitted["aux"]["heldout"]
  assert heldout.shape == (_GMM["heldout"], 2)
  comp_std = np.sqrt(np.trace(sk.covariances_, axis1=1, axis2=2) / 2)
  mean = sk.weights_ @ sk.means_
  centred = sk.means_ - mean
  mix_cov = np.einsum("k,kij->ij", sk.weights_, sk.covariances_ + np.einsum("ki,kj->kij", centred, centred))
  want = {
      "l2_to_gen0": _l2(p, p0),
      "l2_to_true": _l2(p, truth),
      "comp_std_min": comp_std.min(),
      "comp_std_max": comp_std.max(),
      "mixture_std": np.sqrt(np.trace(mix_cov) / 2),
      "heldout_loglik": sk.score(heldout),
      "em_iters": sk.n_iter_,
  }
  assert set(got) == set(want) == set(fam.metric_names)
  assert comp_std.max() > 1.1 * comp_std.min()  # min and max differ on this fit
  for k, v in want.items():
    # float64 on both sides; the L2 distances are differences of O(0.1) overlaps, hence 1e-7 rather than 1e-12.
    np.testing.assert_allclose(got[k], v, rtol=1e-7, err_msg=k)


def test_family_init_chain_draws_configured_real_and_heldout_sets():
  n, d, mu0, s0 = 4000, 3, -2.0, 0.5
  cfg = load_config("gmm", "quick", n_real=n, gmm__dim=d, gmm__heldout=n, gmm__true_mean=mu0, gmm__true_std=s0)
  _, fam = registry.build(cfg)
  x, aux = jax.jit(fam.init_chain)(jax.random.key(10), fam.load_data().shared)
  x, h = np.asarray(x, np.float64), np.asarray(aux["heldout"], np.float64)
  assert x.shape == (n, d) and h.shape == (n, d)
  for a in (x, h):
    # 5 standard errors of the sample mean (s0/sqrt(n)) and of the sample variance (s0^2 sqrt(2/n)).
    np.testing.assert_array_less(np.abs(a.mean(0) - mu0), 5 * s0 / np.sqrt(n))
    np.testing.assert_array_less(np.abs(a.var(0) - s0**2), 5 * s0**2 * np.sqrt(2 / n))
  # Held-out data are fresh draws, not training rows (equal sizes, so one key for both would repeat them).
  assert not np.any(np.all(x[:, None] == h[None], axis=-1))


# ---------------------------------------------------------------------------------------------------------
# Bad input: refused before anything is compiled, with the field named.


_BAD = [(f, v, rf"config\.gmm\.{f} must be a positive integer")
        for f in ("components", "dim", "max_iter", "kmeans_iter", "heldout") for v in (0, -1)]
_BAD += [("components", True, r"config\.gmm\.components must be a positive integer"),
         ("tol", -1e-3, r"config\.gmm\.tol must be a finite number >= 0"),
         ("tol", float("nan"), r"config\.gmm\.tol must be a finite number >= 0"),
         ("reg_covar", -1e-6, r"config\.gmm\.reg_covar must be a finite number >= 0"),
         ("reg_covar", float("inf"), r"config\.gmm\.reg_covar must be a finite number >= 0"),
         ("true_std", 0.0, r"config\.gmm\.true_std must be a finite number > 0"),
         ("true_std", -1.0, r"config\.gmm\.true_std must be a finite number > 0"),
         ("true_std", float("inf"), r"config\.gmm\.true_std must be a finite number > 0"),
         ("true_mean", float("nan"), r"config\.gmm\.true_mean must be a finite number")]


@pytest.mark.parametrize("field,value,match", _BAD, ids=[f"{f}={v}" for f, v, _ in _BAD])
def test_bad_field_refused_before_compilation(tmp_path, monkeypatch, field, value, match):
  refused_before_compilation(tmp_path, monkeypatch, _quick(**{f"gmm__{field}": value}), match)


@pytest.mark.parametrize("overrides,match", [
    (dict(samples__n=4, gmm__components=5), r"config\.gmm\.components=5 exceeds config\.samples\.n=4"),
    (dict(n_real=3, gmm__components=4), r"config\.gmm\.components=4 exceeds config\.n_real=3"),
], ids=["samples", "n_real"])
def test_bad_combination_refused_before_compilation(tmp_path, monkeypatch, overrides, match):
  refused_before_compilation(tmp_path, monkeypatch, _quick(**overrides), match)


def test_missing_section_refused_before_compilation(tmp_path, monkeypatch):
  # Without a section at all: another family's section in its place is refused first, as an unknown field.
  cfg = _quick()
  del cfg["gmm"]
  refused_before_compilation(tmp_path, monkeypatch, cfg, r"config\.gmm is missing")


def test_boundary_settings_are_accepted():
  # tol = 0 (run max_iter iterations), reg_covar = 0, and as many components as data are all legitimate.
  registry.build(_quick(gmm__tol=0.0, gmm__reg_covar=0.0, gmm__components=4, samples__n=4, gmm__max_iter=1,
                        gmm__kmeans_iter=1, gmm__heldout=1))
