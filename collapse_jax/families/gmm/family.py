"""The paper's GMM recursion as a family: EM from a k-means++ start on each generation's data (em.py).

Metrics per chain: the closed-form L2 distance to generation 0's GMM (the paper's metric) and to the true blob,
the smallest and largest component standard deviation sqrt(tr(cov_k)/D) (label-switching invariant), the whole
mixture's standard deviation, the mean log-likelihood of held-out real data, and EM's iteration count.
"""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from collapse_jax import family, fields, paths
from collapse_jax.errors import ConfigError
from collapse_jax.families.gmm import em


def _isotropic(dim: int, mean: float, std: float) -> em.GMM:
  return em.GMM(weights=jnp.ones((1,)), means=jnp.full((1, dim), mean), covs=(std**2) * jnp.eye(dim)[None])


@dataclasses.dataclass(frozen=True)
class Config:
  components: int = fields.integer(lo=1)
  dim: int = fields.integer(lo=1)
  max_iter: int = fields.integer(lo=1)
  kmeans_iter: int = fields.integer(lo=1)
  heldout: int = fields.integer(lo=1)
  tol: float = fields.number(lo=0.0)
  reg_covar: float = fields.number(lo=0.0)
  true_mean: float = fields.number()
  true_std: float = fields.number(lo=0.0, lo_open=True)


class GMMFamily(family.Family):
  name = "gmm"
  Config = Config
  metric_names = ("l2_to_gen0", "mixture_std", "comp_std_min", "comp_std_max", "heldout_loglik", "l2_to_true",
                  "em_iters")
  headline = ("mixture_std", "l2_to_gen0", "heldout_loglik")
  titles = {"l2_to_gen0": "L2 distance to generation 0's density", "mixture_std": "mixture's standard deviation",
            "comp_std_min": "smallest component std", "comp_std_max": "largest component std",
            "heldout_loglik": "log-likelihood of held-out real data", "l2_to_true": "L2 distance to the true density",
            "em_iters": "EM iterations"}
  groups = (("L2 distance between densities", ("l2_to_gen0", "l2_to_true")),
            ("standard deviations", ("mixture_std", "comp_std_min", "comp_std_max")))

  @classmethod
  def check(cls, run, c) -> None:
    for path, n in run.data_per_generation():
      if c.components > n:
        raise ConfigError(f"config.gmm.components={c.components} exceeds config.{path}={n}, the data per generation")

  def __init__(self, run, c, mesh, abstract: bool = False):
    super().__init__(run, c, mesh, abstract)
    self.k, self.dim = c.components, c.dim
    self.tol, self.max_iter, self.reg_covar = c.tol, c.max_iter, c.reg_covar
    self.kmeans_iter, self.n_heldout = c.kmeans_iter, c.heldout
    self.mu0, self.sigma0 = c.true_mean, c.true_std
    self.n_real = run.n_real_or_samples

  def load_data(self):
    return family.Data(self.n_real, {})  # drawn per chain from the true blob (init_chain)

  def _real(self, key, n):
    return self.mu0 + self.sigma0 * jax.random.normal(key, (n, self.dim))

  def init_chain(self, key, shared):
    k_train, k_heldout = jax.random.split(key)
    return self._real(k_train, self.n_real), {"heldout": self._real(k_heldout, self.n_heldout)}

  def init_model(self, key, shared):
    k, d = self.k, self.dim
    return {"gmm": em.GMM(weights=jnp.zeros((k,)), means=jnp.zeros((k, d)), covs=jnp.zeros((k, d, d))),
            "n_iter": jnp.zeros((), jnp.int32), "converged": jnp.zeros((), jnp.bool_)}

  def fit(self, gen, key):
    x, w = gen.x, gen.w
    init = em.kmeans_init(x, w, self.k, key, max_iter=self.kmeans_iter, reg_covar=self.reg_covar)
    gmm, n_iter, converged, _ = em.fit(x, w, init, self.tol, self.max_iter, self.reg_covar)
    return {"gmm": gmm, "n_iter": jnp.asarray(n_iter, jnp.int32), "converged": jnp.asarray(converged)}

  def sample(self, model, n, key, gen):
    return em.sample(model["gmm"], n, key), {}

  def evaluate(self, model, gen):
    model0, aux = gen.model0, gen.aux
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
