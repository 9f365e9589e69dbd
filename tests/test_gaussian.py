"""The single-Gaussian recursion against closed-form theory."""
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import linalg

from collapse_jax import gaussian, loop
from tests.helpers import load_config


def test_fit_moments_match_numpy_and_ignore_masked_rows():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(50, 3)).astype(np.float32)
  junk = np.full((14, 3), 1e3, np.float32)
  w = np.r_[np.ones(50), np.zeros(14)].astype(np.float32)
  for unbiased in (False, True):
    mu, cov = gaussian.fit_moments(jnp.asarray(np.r_[x, junk]), jnp.asarray(w), unbiased)
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cov, np.cov(x.T, ddof=1 if unbiased else 0), rtol=1e-4, atol=1e-6)


def test_w2_closed_form():
  # 1-D: W2 = sqrt((mu - mu0)^2 + (sigma - sigma0)^2).
  w2 = gaussian.w2_to_isotropic(jnp.array([0.3]), jnp.array([[0.25]]), 0.0, 1.0)
  np.testing.assert_allclose(w2, np.sqrt(0.3**2 + 0.5**2), rtol=1e-6)
  # d-D against the general formula with scipy's matrix square root.
  rng = np.random.default_rng(1)
  a = rng.normal(size=(3, 3))
  cov = a @ a.T + 0.1 * np.eye(3)
  mu = rng.normal(size=3)
  s0 = 1.7
  ref = np.sum((mu - 0.2) ** 2) + np.trace(cov) + 3 * s0**2 - 2 * np.trace(linalg.sqrtm(s0**2 * np.eye(3) @ cov).real)
  got = gaussian.w2_to_isotropic(jnp.asarray(mu, jnp.float32), jnp.asarray(cov, jnp.float32), 0.2, s0)
  np.testing.assert_allclose(got, np.sqrt(ref), rtol=1e-5)


@pytest.mark.slow
def test_mle_variance_decays_as_theory(tmp_path):
  """Mean over 100,000 chains of sigma_hat^2_n / sigma^2 after n = 100 MLE refits on M = 100 samples is
  (1 - 1/M)^n = 0.366; the ratio is near log-normal with a standard error of about 0.8% at this chain count.
  Generation g is the (g+1)-th fit, so n refits is generation index n-1."""
  cfg = load_config("gaussian", "100", generations=100, chains=100_000, checkpoint_every=100, plots=False)
  hist = loop.run(cfg, str(tmp_path / "replace"))
  ratio = hist["metrics"]["var_ratio"][:, 0]  # column 0 is the mean over chains
  theory = (1 - 1 / 100) ** np.arange(1, 101)
  assert abs(ratio[99] / theory[99] - 1) < 0.03, (ratio[99], theory[99])
  np.testing.assert_allclose(ratio, theory, rtol=0.03)
  assert hist["metrics"]["w2"][99, 0] > 3 * hist["metrics"]["w2"][0, 0]  # drifting away from the original


def test_accumulate_keeps_variance_far_above_replace(tmp_path):
  n, out = 100, {}
  # Accumulate's spread across chains is small, so fewer chains suffice (its pool makes each chain 100x dearer).
  for regime, chains in (("replace", 1000), ("accumulate", 200)):
    cfg = load_config("gaussian", "100", generations=n, chains=chains, checkpoint_every=n, plots=False,
                      regime__name=regime)
    out[regime] = loop.run(cfg, str(tmp_path / regime))["metrics"]["var_ratio"][-1, 0]
  # Accumulating n+1 sets of M samples: the variance estimate stays near 1 (it is bounded below, not a product).
  assert out["accumulate"] > 0.85, out
  assert out["replace"] < 0.45, out
  assert out["accumulate"] > 2 * out["replace"], out
