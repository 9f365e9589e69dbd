"""The paper's GMM recursion as a family: EM from a k-means++ start on each generation's data (em.py).

Metrics per chain: the closed-form L2 distance to generation 0's GMM (the paper's metric) and to the true blob,
the smallest and largest component standard deviation sqrt(tr(cov_k)/D) (label-switching invariant), the whole
mixture's standard deviation, the mean log-likelihood of held-out real data, and EM's iteration count.
"""
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from collapse_jax import em, paths
from collapse_jax import config as config_lib
from collapse_jax.config import ConfigError


def _isotropic(dim: int, mean: float, std: float) -> em.GMM:
  return em.GMM(weights=jnp.ones((1,)), means=jnp.full((1, dim), mean), covs=(std**2) * jnp.eye(dim)[None])


class GMMFamily:
  name = "gmm"
  vmap_chains = True
  datum_dtype = jnp.float32
  metric_names = ("l2_to_gen0", "mixture_std", "comp_std_min", "comp_std_max", "heldout_loglik", "l2_to_true",
                  "em_iters")

  @staticmethod
  def validate(cfg) -> None:
    if "gmm" not in cfg:
      raise ConfigError("config.gmm is missing (use configs/gmm.py)")
    c = cfg.gmm
    for f in ("components", "dim", "max_iter", "kmeans_iter", "heldout"):
      v = c[f]
      if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(f"config.gmm.{f} must be a positive integer, got {v!r}")
    for f in ("tol", "reg_covar"):
      if not (isinstance(c[f], (int, float)) and math.isfinite(c[f]) and c[f] >= 0):
        raise ConfigError(f"config.gmm.{f} must be a finite non-negative number, got {c[f]!r}")
    config_lib.check_truth("gmm", c)
    for path, n in config_lib.data_per_generation(cfg):
      if c.components > n:
        raise ConfigError(f"config.gmm.components={c.components} exceeds config.{path}={n}, the data per generation")

  def __init__(self, cfg, mesh):
    c = cfg.gmm
    self.k, self.dim = c.components, c.dim
    self.tol, self.max_iter, self.reg_covar = float(c.tol), c.max_iter, float(c.reg_covar)
    self.kmeans_iter, self.n_heldout = c.kmeans_iter, c.heldout
    self.mu0, self.sigma0 = float(c.true_mean), float(c.true_std)
    self.datum_shape = (self.dim,)
    self.n_real = cfg.n_real or cfg.samples.n

  def shared(self):
    return {}

  def _real(self, key, n):
    return self.mu0 + self.sigma0 * jax.random.normal(key, (n, self.dim))

  def init_chain(self, key, shared):
    k_train, k_heldout = jax.random.split(key)
    return self._real(k_train, self.n_real), {"heldout": self._real(k_heldout, self.n_heldout)}

  def init_model(self, key, shared):
    k, d = self.k, self.dim
    return {"gmm": em.GMM(weights=jnp.zeros((k,)), means=jnp.zeros((k, d)), covs=jnp.zeros((k, d, d))),
            "n_iter": jnp.zeros((), jnp.int32), "converged": jnp.zeros((), jnp.bool_)}

  def fit(self, x, w, key, prev_model, g, shared):
    init = em.kmeans_init(x, w, self.k, key, max_iter=self.kmeans_iter, reg_covar=self.reg_covar)
    gmm, n_iter, converged, _ = em.fit(x, w, init, self.tol, self.max_iter, self.reg_covar)
    return {"gmm": gmm, "n_iter": jnp.asarray(n_iter, jnp.int32), "converged": jnp.asarray(converged)}

  def sample(self, model, n, key, shared, train=None):
    return em.sample(model["gmm"], n, key)

  def evaluate(self, model, model0, aux, shared, train=None):
    gmm = model["gmm"]
    comp_std_K = jnp.sqrt(jnp.trace(gmm.covs, axis1=-2, axis2=-1) / self.dim)
    _, cov_DxD = em.mixture_moments(gmm)
    return {
        "l2_to_gen0": em.l2_distance(model0["gmm"], gmm),
        "l2_to_true": em.l2_distance(_isotropic(self.dim, self.mu0, self.sigma0), gmm),
        "mixture_std": jnp.sqrt(jnp.trace(cov_DxD) / self.dim),
        "comp_std_min": comp_std_K.min(),
        "comp_std_max": comp_std_K.max(),
        "heldout_loglik": em.log_prob(gmm, aux["heldout"]).mean(),
        "em_iters": model["n_iter"].astype(jnp.float32),
    }

  def plot(self, workdir, metrics, arrays, snapshots):
    """Scatter snapshots of chain 0's samples, like the paper's GMM figure."""
    import matplotlib.pyplot as plt  # plots.py set the Agg backend when the loop imported it
    if not snapshots or self.dim < 2:
      return
    gens = sorted(snapshots)
    fig, axes = plt.subplots(1, len(gens), figsize=(2.6 * len(gens), 2.8), squeeze=False)
    for ax, g in zip(axes[0], gens):
      pts = np.asarray(snapshots[g])
      ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.5)
      ax.set_title(f"generation {g}", fontsize=9)
      ax.set_xlim(self.mu0 - 4 * self.sigma0, self.mu0 + 4 * self.sigma0)
      ax.set_ylim(self.mu0 - 4 * self.sigma0, self.mu0 + 4 * self.sigma0)
      ax.set_aspect("equal")
      ax.tick_params(labelsize=7)
    fig.tight_layout()
    paths.savefig(fig, os.path.join(workdir, "plots", "gmm_snapshots.png"), dpi=110)
    plt.close(fig)
