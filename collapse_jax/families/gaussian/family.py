"""The paper's single-Gaussian recursion: fit a d-dimensional Gaussian, sample M points, refit, repeat.

With MLE refits the expected variance shrinks by (1 - 1/M) per generation, E[sigma_hat^2_n] = (1 - 1/M)^n sigma^2,
and the estimate collapses to a point while the mean random-walks away (the Wasserstein-2 distance grows).
Metrics per chain: |mu - mu_hat| (Euclidean), |sigma - sigma_hat| with sigma_hat = sqrt(tr(Sigma_hat)/d) (exactly
the 1-D quantity), ||Sigma_hat - Sigma||_F, var_ratio = tr(Sigma_hat)/tr(Sigma), and W2 to the original.
"""
import dataclasses

import jax
import jax.numpy as jnp

from collapse_jax import family, fields
from collapse_jax.errors import ConfigError

ESTIMATORS = ("mle", "unbiased")


def fit_moments(x_NxD, w_N, unbiased: bool):
  n = w_N.sum()
  mu_D = (w_N @ x_NxD) / n
  dev_NxD = (x_NxD - mu_D) * w_N[:, None]
  cov_DxD = dev_NxD.T @ dev_NxD / (n - 1.0 if unbiased else n)
  return mu_D, cov_DxD


def psd_sqrt(cov_DxD):
  if cov_DxD.shape == (1, 1):  # the paper's 1-D case: skip the batched LAPACK call, a large share of run time
    return jnp.sqrt(jnp.maximum(cov_DxD, 0.0))
  # eigh, not cholesky: collapsed covariances become (numerically) singular and cholesky would return NaN.
  lam_D, v_DxD = jnp.linalg.eigh(cov_DxD)
  return (v_DxD * jnp.sqrt(jnp.maximum(lam_D, 0.0))) @ v_DxD.T


def w2_to_isotropic(mu_D, cov_DxD, mu0: float, sigma0: float):
  """Closed-form W2 between N(mu, Sigma) and N(mu0 1, sigma0^2 I): the sqrt term reduces to sigma0 Sigma^{1/2}."""
  d = mu_D.shape[0]
  sq = jnp.sum((mu_D - mu0) ** 2) + jnp.trace(cov_DxD) + d * sigma0**2 - 2 * sigma0 * jnp.trace(psd_sqrt(cov_DxD))
  return jnp.sqrt(jnp.maximum(sq, 0.0))


@dataclasses.dataclass(frozen=True)
class Config:
  dim: int = fields.integer(lo=1)
  estimator: str = fields.choice(ESTIMATORS)
  true_mean: float = fields.number()
  true_std: float = fields.number(lo=0.0, lo_open=True)


class GaussianFamily(family.Family):
  name = "gaussian"
  Config = Config
  metric_names = ("var_ratio", "std_abs_err", "mean_abs_err", "w2", "cov_frob_err")
  headline = ("var_ratio", "w2")
  titles = {"var_ratio": "fitted variance / true variance", "std_abs_err": "|fitted std - true std|",
            "mean_abs_err": "|fitted mean - true mean|", "w2": "Wasserstein-2 distance to the truth",
            "cov_frob_err": "covariance error (Frobenius)"}
  groups = (("absolute errors", ("std_abs_err", "mean_abs_err")),)

  @classmethod
  def check(cls, run, c) -> None:
    for path, n in run.data_per_generation():
      if c.estimator == "unbiased" and n < 2:
        raise ConfigError(f"config.{path} must be >= 2 for the unbiased estimator, got {n}")

  def __init__(self, run, c, mesh, abstract: bool = False):
    super().__init__(run, c, mesh, abstract)
    self.dim, self.mu0, self.sigma0 = c.dim, c.true_mean, c.true_std
    self.unbiased = c.estimator == "unbiased"
    self.n_real = run.n_real_or_samples
    counts = run.sample_counts()
    # The theory curve holds for the paper's recursion only: each generation fits the previous one's samples.
    self.fit_sizes = [self.n_real] + counts[1:] if run.regime.name == "replace" else None

  def load_data(self):
    return family.Data(self.n_real, {})  # drawn per chain from the true Gaussian (init_chain)

  def init_chain(self, key, shared):
    x_RxD = self.mu0 + self.sigma0 * jax.random.normal(key, (self.n_real, self.dim))
    return x_RxD, {}

  def init_model(self, key, shared):
    return {"mean": jnp.zeros((self.dim,)), "cov": jnp.zeros((self.dim, self.dim))}

  def fit(self, gen, key):
    mu_D, cov_DxD = fit_moments(gen.x, gen.w, self.unbiased)
    return {"mean": mu_D, "cov": cov_DxD}

  def sample(self, model, n, key, gen):
    z_NxD = jax.random.normal(key, (n, self.dim))
    return model["mean"] + z_NxD @ psd_sqrt(model["cov"]), {}

  def evaluate(self, model, gen):
    mu, cov, d = model["mean"], model["cov"], self.dim
    return {
        "var_ratio": jnp.trace(cov) / (d * self.sigma0**2),
        "std_abs_err": jnp.abs(jnp.sqrt(jnp.trace(cov) / d) - self.sigma0),
        "mean_abs_err": jnp.linalg.norm(mu - self.mu0),
        "w2": w2_to_isotropic(mu, cov, self.mu0, self.sigma0),
        "cov_frob_err": jnp.linalg.norm(cov - self.sigma0**2 * jnp.eye(d)),
    }

  def plot(self, workdir, metrics, arrays, snapshots):
    """var_ratio against generation with the theory curve E[sigma_hat^2_g] / sigma^2 (the paper's figure)."""
    if self.fit_sizes is None or "var_ratio" not in metrics:
      return
    from collapse_jax import plots
    label = "theory: 1 (unbiased)" if self.unbiased else "theory: prod (1 - 1/M_i)"
    plots.metric_bands(workdir, self.name, {"var_ratio": metrics["var_ratio"]}, ("var_ratio",), self.run.chains,
                       overlays={"var_ratio": (label, expected_var_ratio(self.fit_sizes, self.unbiased))},
                       filename="gaussian_var_ratio.png")


def expected_var_ratio(fit_sizes, unbiased: bool) -> list[float]:
  """E[tr(Sigma_hat_g)] / tr(Sigma) after generations 0..g, generation i fitting fit_sizes[i] points.

  Each MLE refit on M points scales the expected variance by (M - 1) / M (a scaled chi-square with M - 1
  degrees of freedom, independent of the earlier fits given their variance), so the expectation is the product;
  the unbiased estimator keeps it at 1 (while the variance itself still collapses almost surely)."""
  out, r = [], 1.0
  for m in fit_sizes:
    r *= 1.0 if unbiased else (m - 1) / m
    out.append(r)
  return out
