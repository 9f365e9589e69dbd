"""Gaussian-mixture math in pure JAX: EM as scikit-learn runs it, k-means init, sampling, distances.

Everything here is traced inside `jax.jit` + `lax.scan` + `jax.vmap` over many independent chains, so it is
pure jnp with static shapes; loops over data-dependent counts are `lax.while_loop`s, which vmap batches by
running until every chain is done and freezing the finished ones.

Data come as a fixed-capacity buffer `x_NxD` with weights `w_N` (1 marks a valid row, 0 a padding row). Padding
rows are replaced by zeros before any arithmetic, so whatever they hold (huge values, inf, NaN) cannot leak into
the results through `0 * inf`.

Formulas follow sklearn.mixture.GaussianMixture(covariance_type='full') exactly, so that a fit here and a fit
there from the same start agree to rounding. Dtype follows the input (float32 by default, float64 under x64).

Internally data are held feature-major (`x_DxN`) so that every per-point array is [..., N] with the points on
the minor axis: reductions over points are then contiguous on CPU and coalesced on GPU, with or without a
leading vmapped chain axis. Sums are elementwise products + reductions rather than dots, so that GPU default
matmul precision (TF32) cannot creep into float32 statistics.
"""
import math

import jax
import jax.numpy as jnp
from flax import struct

# Up to this dimension Cholesky factors and their inverses are written out entry by entry: for the tiny
# matrices of a low-dimensional mixture, elementwise code fuses with its neighbours, while LAPACK/cuSolver
# custom calls would each be a separate kernel inside the EM loop.
_UNROLL_MAX_D = 6
_HI = jax.lax.Precision.HIGHEST


@struct.dataclass
class GMM:
  weights: jax.Array  # [K]
  means: jax.Array  # [K, D]
  covs: jax.Array  # [K, D, D]


def _cholesky(a_BxDxD):
  """Lower Cholesky factor over any leading batch dims; NaN where not positive definite (like jnp.linalg)."""
  d = a_BxDxD.shape[-1]
  if d > _UNROLL_MAX_D:
    return jnp.linalg.cholesky(a_BxDxD)
  l = [[jnp.zeros_like(a_BxDxD[..., 0, 0])] * d for _ in range(d)]
  for j in range(d):
    s = a_BxDxD[..., j, j]
    for k in range(j):
      s = s - l[j][k] * l[j][k]
    l[j][j] = jnp.sqrt(s)
    for i in range(j + 1, d):
      s = a_BxDxD[..., i, j]
      for k in range(j):
        s = s - l[i][k] * l[j][k]
      l[i][j] = s / l[j][j]
  return jnp.stack([jnp.stack(row, axis=-1) for row in l], axis=-2)


def _prec_chol(cov_BxDxD):
  """(P, log|cov|^(1/2)) with P = L^-1 lower triangular, so cov^-1 = P^T P (sklearn's precisions_cholesky_
  transposed)."""
  l_BxDxD = _cholesky(cov_BxDxD)
  d = l_BxDxD.shape[-1]
  diag_BxD = jnp.diagonal(l_BxDxD, axis1=-2, axis2=-1)
  half_log_det_B = jnp.sum(jnp.log(diag_BxD), axis=-1)
  if d > _UNROLL_MAX_D:
    eye = jnp.broadcast_to(jnp.eye(d, dtype=l_BxDxD.dtype), l_BxDxD.shape)
    return jax.scipy.linalg.solve_triangular(l_BxDxD, eye, lower=True), half_log_det_B
  # Forward substitution on the identity, column by column.
  p = [[jnp.zeros_like(diag_BxD[..., 0])] * d for _ in range(d)]
  for j in range(d):
    p[j][j] = 1 / l_BxDxD[..., j, j]
    for i in range(j + 1, d):
      s = l_BxDxD[..., i, j] * p[j][j]
      for k in range(j + 1, i):
        s = s + l_BxDxD[..., i, k] * p[k][j]
      p[i][j] = -s / l_BxDxD[..., i, i]
  return jnp.stack([jnp.stack(row, axis=-1) for row in p], axis=-2), half_log_det_B


def _log_normal(diff_BxDxN, p_BxDxD, half_log_det_B):
  """log N(diff; 0, cov) for cov^-1 = P^T P; leading dims of the arguments broadcast against each other."""
  d = diff_BxDxN.shape[-2]
  if d > _UNROLL_MAX_D:
    y = jnp.einsum('...ij,...jn->...in', p_BxDxD, diff_BxDxN, precision=_HI)
    maha = jnp.sum(y * y, axis=-2)
  else:
    maha = 0
    for i in range(d):
      y = p_BxDxD[..., i, 0, None] * diff_BxDxN[..., 0, :]
      for j in range(1, i + 1):
        y = y + p_BxDxD[..., i, j, None] * diff_BxDxN[..., j, :]
      maha = maha + y * y
  return -0.5 * (d * math.log(2 * math.pi) + maha) - half_log_det_B[..., None]


def _log_joint(gmm, x_DxN):
  """log(weight_k) + log N(x_n; mean_k, cov_k), [K, N]."""
  p_KxDxD, hld_K = _prec_chol(gmm.covs)
  diff_KxDxN = x_DxN[None] - gmm.means[:, :, None]
  return jnp.log(gmm.weights)[:, None] + _log_normal(diff_KxDxN, p_KxDxD, hld_K)


def _normalise(a_KxN):
  """(responsibilities, log p(x)) with one exp per entry. The max and sum over the few components are written
  as elementwise chains: XLA would otherwise emit separate reduction kernels over a size-K axis."""
  k = a_KxN.shape[0]
  m_N = a_KxN[0]
  for j in range(1, k):
    m_N = jnp.maximum(m_N, a_KxN[j])
  e_KxN = jnp.exp(a_KxN - m_N)
  s_N = e_KxN[0]
  for j in range(1, k):
    s_N = s_N + e_KxN[j]
  return e_KxN / s_N, m_N + jnp.log(s_N)


def _clean(x_NxD, w_N):
  """Feature-major data with padding rows zeroed, and float weights with padding exactly 0."""
  valid_N = w_N > 0
  x_NxD = jnp.where(valid_N[:, None], x_NxD, jnp.zeros((), x_NxD.dtype))
  return x_NxD.T, jnp.where(valid_N, w_N, 0).astype(x_NxD.dtype)


def _sym_from_upper(u_KxT, d):
  """[K, D, D] symmetric matrices from their upper triangles, stored row-major as [K, D(D+1)/2]."""
  rows = [[None] * d for _ in range(d)]
  t = 0
  for i in range(d):
    for j in range(i, d):
      rows[i][j] = rows[j][i] = u_KxT[:, t]
      t += 1
  return jnp.stack([jnp.stack(row, axis=-1) for row in rows], axis=-2)


def _m_step(x_DxN, r_KxN, reg_covar):
  """sklearn's _estimate_gaussian_parameters('full') then weights /= sum; r already carries w (0 on padding).

  Two passes over the data, as sklearn's formula needs the new means before the centred covariance. Each pass
  is one stacked reduction ([count, first moments], then the D(D+1)/2 distinct covariance entries): separate
  small reductions, or a [K, D, D, N] product, are several times slower on CPU."""
  dtype = x_DxN.dtype
  d = x_DxN.shape[0]
  first_KxMxN = jnp.concatenate([r_KxN[:, None, :], r_KxN[:, None, :] * x_DxN[None]], axis=1)
  first_KxM = jnp.sum(first_KxMxN, axis=-1)
  nk_K = first_KxM[:, 0] + 10 * jnp.finfo(dtype).eps
  means_KxD = first_KxM[:, 1:] / nk_K[:, None]
  diff_KxDxN = x_DxN[None] - means_KxD[:, :, None]
  rdiff_KxDxN = r_KxN[:, None, :] * diff_KxDxN
  if d > _UNROLL_MAX_D:
    covs_KxDxD = jnp.einsum('kin,kjn->kij', rdiff_KxDxN, diff_KxDxN, precision=_HI) / nk_K[:, None, None]
  else:
    upper = [rdiff_KxDxN[:, i] * diff_KxDxN[:, j] for i in range(d) for j in range(i, d)]
    covs_KxDxD = _sym_from_upper(jnp.sum(jnp.stack(upper, axis=1), axis=-1) / nk_K[:, None], d)
  covs_KxDxD = covs_KxDxD + jnp.asarray(reg_covar, dtype) * jnp.eye(d, dtype=dtype)
  return GMM(weights=nk_K / jnp.sum(nk_K), means=means_KxD, covs=covs_KxDxD)


def log_prob(gmm, x_NxD):
  """Log density of the mixture at each row, [N]."""
  return _normalise(_log_joint(gmm, x_NxD.T))[1]


def e_step(gmm, x_NxD, w_N):
  """(log responsibilities [N, K], weighted mean over valid rows of log p(x)). Rows with w=0 get finite but
  meaningless responsibilities and do not enter the mean."""
  x_DxN, w_N = _clean(x_NxD, w_N)
  a_KxN = _log_joint(gmm, x_DxN)
  lse_N = _normalise(a_KxN)[1]
  return (a_KxN - lse_N).T, jnp.sum(w_N * lse_N) / jnp.sum(w_N)


def m_step(x_NxD, w_N, resp_NxK, reg_covar):
  """sklearn's M-step ('full' covariances) with sample weights w multiplying the responsibilities."""
  x_DxN, w_N = _clean(x_NxD, w_N)
  r_KxN = jnp.where(w_N > 0, resp_NxK.T * w_N, jnp.zeros((), x_DxN.dtype))
  return _m_step(x_DxN, r_KxN, reg_covar)


def fit(x_NxD, w_N, init, tol, max_iter, reg_covar):
  """EM from `init` exactly as sklearn's fit loop: each iteration runs the E-step on the current parameters,
  then the M-step, and records the E-step's mean log-likelihood as the lower bound; it stops once the bound
  moves by less than `tol` or after `max_iter` iterations (tol=0 therefore runs all of them).

  Returns (gmm, n_iter, converged, lower_bound). `max_iter` may be a Python int or a traced scalar.
  """
  x_DxN, w_N = _clean(x_NxD, w_N)
  dtype = x_DxN.dtype
  inv_n = 1 / jnp.sum(w_N)
  tol = jnp.asarray(tol, dtype)

  def cond(carry):
    _, n_iter, _, converged = carry
    return jnp.logical_and(n_iter < max_iter, jnp.logical_not(converged))

  def body(carry):
    gmm, n_iter, prev_lb, _ = carry
    r_KxN, lse_N = _normalise(_log_joint(gmm, x_DxN))
    # Materialise the E-step once: otherwise XLA re-fuses it into each of the M-step's reductions and
    # evaluates the densities several times per iteration (about 2x slower on CPU).
    r_KxN, lse_N = jax.lax.optimization_barrier((r_KxN * w_N, lse_N))
    lb = jnp.sum(w_N * lse_N) * inv_n
    # With prev_lb = -inf the first change is inf, never below tol, as in sklearn.
    return _m_step(x_DxN, r_KxN, reg_covar), n_iter + 1, lb, jnp.abs(lb - prev_lb) < tol

  init = jax.tree.map(lambda a: jnp.asarray(a, dtype), init)
  carry = (init, jnp.zeros((), jnp.int32), jnp.asarray(-jnp.inf, dtype), jnp.zeros((), bool))
  gmm, n_iter, lb, converged = jax.lax.while_loop(cond, body, carry)
  return gmm, n_iter, converged, lb


# ----------------------------------------------------------------------------------------------------------
# k-means initialisation (sklearn KMeans(n_init=1, init='k-means++', algorithm='lloyd')).


def _sq_dist(c_MxD, x_DxN):
  # Direct differences rather than sklearn's |a|^2 - 2ab + |b|^2: same distances, no cancellation. Summed
  # feature by feature, which XLA fuses, rather than a reduction over a short axis, which it does not.
  if x_DxN.shape[0] > _UNROLL_MAX_D:
    return jnp.sum(jnp.square(x_DxN[None] - c_MxD[:, :, None]), axis=1)
  d2_MxN = 0
  for d in range(x_DxN.shape[0]):
    d2_MxN = d2_MxN + jnp.square(x_DxN[d] - c_MxD[:, d, None])
  return d2_MxN


def _inverse_cdf(cum_N, u_T, valid_N, fallback):
  """Index of the row whose mass interval [cum[i-1], cum[i]) holds u. Rows of zero mass (padding, or points
  already chosen) have empty intervals and cannot be drawn; a u that rounding pushed to the total, or a total
  of zero, falls back to `fallback`."""
  idx_T = jnp.sum(cum_N <= u_T[:, None], axis=1)
  idx_T = jnp.minimum(idx_T, cum_N.shape[0] - 1)
  ok_T = jnp.logical_and(valid_N[idx_T], u_T < cum_N[-1])
  return jnp.where(ok_T, idx_T, fallback)


def _kmeans_plusplus(x_DxN, w_N, k, key):
  """Greedy k-means++ seeding as sklearn's _kmeans_plusplus: 2 + floor(log k) candidates per new centre,
  keeping the one that most reduces the potential. Draws go through inverse CDFs of cumulative masses, so
  trailing padding rows change neither the draws nor the choice."""
  valid_N = w_N > 0
  dtype = x_DxN.dtype
  n_trials = 2 + int(math.log(k))
  # All uniforms in one draw (row 0 seeds the first centre): each separate threefry call adds compile time.
  u_KxT = jax.random.uniform(key, (k, n_trials), dtype)
  cum_w = jnp.cumsum(w_N)
  first = _inverse_cdf(cum_w, u_KxT[0, :1] * cum_w[-1], valid_N, jnp.argmax(valid_N))[0]
  centres = [x_DxN[:, first]]
  closest_N = _sq_dist(centres[0][None], x_DxN)[0]
  pot = jnp.sum(w_N * closest_N)
  for c in range(1, k):
    u_T = u_KxT[c] * pot
    cand_T = _inverse_cdf(jnp.cumsum(w_N * closest_N), u_T, valid_N, first)
    dist_TxN = jnp.minimum(closest_N, _sq_dist(x_DxN[:, cand_T].T, x_DxN))
    pots_T = jnp.sum(dist_TxN * w_N, axis=1)
    best = jnp.argmin(pots_T)
    pot, closest_N = pots_T[best], dist_TxN[best]
    centres.append(x_DxN[:, cand_T[best]])
  return jnp.stack(centres)


def _one_hot(labels_N, k, dtype):
  # One compare per cluster: XLA:CPU compiles `labels == iota[:, None]` into code about 10x slower than this.
  return jnp.stack([labels_N == j for j in range(k)]).astype(dtype)


def _assign(x_DxN, centres_KxD):
  """(nearest centre, squared distance to it) per point; ties go to the lower index, as with argmin."""
  d2_KxN = _sq_dist(centres_KxD, x_DxN)
  # A running elementwise minimum over the few centres: XLA's CPU argmin (a variadic reduce) costs more than
  # the whole rest of a Lloyd iteration.
  labels_N, best_N = jnp.zeros(d2_KxN.shape[1:], jnp.int32), d2_KxN[0]
  for j in range(1, d2_KxN.shape[0]):
    closer_N = d2_KxN[j] < best_N
    labels_N, best_N = jnp.where(closer_N, j, labels_N), jnp.where(closer_N, d2_KxN[j], best_N)
  return labels_N, best_N


def _relocate_empty(x_DxN, w_N, onehot_KxN, dmin_N, sums_KxD, wk_K):
  """sklearn's _relocate_empty_clusters_dense: the j-th empty cluster takes the j-th farthest point from its
  centre, which leaves its old cluster. Needs k >= 2 (one cluster is never empty).

  Points are picked by masks (distance == max) and masked sums rather than argmax and gathers, which vmapped
  on CPU cost several times a whole Lloyd iteration. Exact ties are averaged: the same point when they are
  duplicates; a measure-zero event otherwise."""
  k, d = sums_KxD.shape
  valid_N = w_N > 0
  dist_N = jnp.where(valid_N, dmin_N, -1)
  picks = []
  for _ in range(k - 1):  # at most k-1 clusters can be empty
    mask_N = jnp.logical_and(dist_N == jnp.max(dist_N), valid_N)
    m = mask_N.astype(x_DxN.dtype)
    feats_MxN = jnp.concatenate([m[None], (m * w_N)[None], m * x_DxN, m * onehot_KxN])
    picks.append(jnp.sum(feats_MxN, axis=1))
    dist_N = jnp.where(mask_N, -2, dist_N)
  # Row j describes the j-th farthest point: [count, weight, x (D), old cluster (K)], sums over its ties.
  picks_PxM = jnp.stack(picks)[jnp.clip(jnp.cumsum(wk_K == 0) - 1, 0, k - 2)]
  count_K = picks_PxM[:, 0]
  moved_K = jnp.logical_and(wk_K == 0, count_K > 0)
  per_K = jnp.where(moved_K, 1 / jnp.where(count_K > 0, count_K, 1), 0)
  wf_K = picks_PxM[:, 1] * per_K
  xw_KxD = picks_PxM[:, 2:2 + d] * (per_K * wf_K)[:, None]
  from_KxK = picks_PxM[:, 2 + d:] * per_K[:, None]  # [moved to, moved from]
  sums_KxD = sums_KxD - jnp.sum(from_KxK[:, :, None] * xw_KxD[:, None, :], axis=0)
  wk_K = wk_K - jnp.sum(from_KxK * wf_K[:, None], axis=0)
  return jnp.where(moved_K[:, None], xw_KxD, sums_KxD), jnp.where(moved_K, wf_K, wk_K)


def _lloyd_update(x_DxN, w_N, labels_N, dmin_N, centres_KxD):
  """New centres from hard labels; a cluster that stays empty keeps its centre."""
  k = centres_KxD.shape[0]
  onehot_KxN = _one_hot(labels_N, k, x_DxN.dtype)
  oh_KxN = onehot_KxN * w_N
  first_KxM = jnp.sum(jnp.concatenate([oh_KxN[:, None, :], oh_KxN[:, None, :] * x_DxN[None]], axis=1), axis=-1)
  wk_K, sums_KxD = first_KxM[:, 0], first_KxM[:, 1:]
  if k > 1:
    sums_KxD, wk_K = jax.lax.cond(jnp.any(wk_K == 0), _relocate_empty, lambda *a: a[-2:],
                                  x_DxN, w_N, onehot_KxN, dmin_N, sums_KxD, wk_K)
  return jnp.where(wk_K[:, None] > 0, sums_KxD / jnp.where(wk_K > 0, wk_K, 1)[:, None], centres_KxD)


def _lloyd(x_DxN, w_N, centres_KxD, max_iter, tol):
  """sklearn's _kmeans_single_lloyd: iterate until the labels stop changing or the squared centre shift is
  <= tol * mean per-feature variance. Returns (centres, labels of the final centres, iterations)."""
  dtype = x_DxN.dtype
  valid_N = w_N > 0
  n = jnp.sum(w_N)
  mean_D = jnp.sum(w_N * x_DxN, axis=1) / n
  var_D = jnp.sum(w_N * jnp.square(x_DxN - mean_D[:, None]), axis=1) / n
  tol = jnp.mean(var_D) * jnp.asarray(tol, dtype)

  def cond(carry):
    _, _, i, done = carry
    return jnp.logical_and(i < max_iter, jnp.logical_not(done))

  def body(carry):
    centres, labels_old, i, _ = carry
    labels, dmin = _assign(x_DxN, centres)
    new = _lloyd_update(x_DxN, w_N, labels, dmin, centres)
    strict = jnp.all(jnp.logical_or(labels == labels_old, jnp.logical_not(valid_N)))
    shift = jnp.sum(jnp.square(new - centres))
    return new, labels, i + 1, jnp.logical_or(strict, shift <= tol)

  carry = (centres_KxD, jnp.full(w_N.shape, -1, jnp.int32), jnp.zeros((), jnp.int32), jnp.zeros((), bool))
  centres_KxD, _, n_iter, _ = jax.lax.while_loop(cond, body, carry)
  # sklearn relabels with the final centres when it stopped on tol (under strict convergence this is a no-op).
  return centres_KxD, _assign(x_DxN, centres_KxD)[0], n_iter


def kmeans_init(x_NxD, w_N, k, key, max_iter=300, tol=1e-4, reg_covar=1e-6):
  """GaussianMixture(init_params='kmeans')'s start: KMeans(n_init=1) with k-means++ seeds and Lloyd
  iterations, then the M-step on one-hot responsibilities of its labels. `k` is static; `reg_covar` is the
  mixture's (sklearn passes its own)."""
  x_DxN, w_N = _clean(x_NxD, w_N)
  _, labels_N, _ = _lloyd(x_DxN, w_N, _kmeans_plusplus(x_DxN, w_N, k, key), max_iter, tol)
  r_KxN = _one_hot(labels_N, k, x_DxN.dtype) * w_N
  return _m_step(x_DxN, r_KxN, reg_covar)


# ----------------------------------------------------------------------------------------------------------
# Sampling and measurements.


def sample(gmm, n, key):
  """n draws (n static): a component from categorical(weights), then mean + L z."""
  k_comp, k_z = jax.random.split(key)
  d = gmm.means.shape[-1]
  comp_n = jax.random.categorical(k_comp, jnp.log(gmm.weights), shape=(n,))
  z_nxD = jax.random.normal(k_z, (n, d), gmm.means.dtype)
  l_nxDxD = _cholesky(gmm.covs)[comp_n]
  return gmm.means[comp_n] + jnp.sum(l_nxDxD * z_nxD[:, None, :], axis=-1)


def _overlap(p, q):
  """∫ p q dx = sum_ij a_i b_j N(mu_i; nu_j, S_i + T_j)."""
  p_PxQxDxD, hld_PxQ = _prec_chol(p.covs[:, None] + q.covs[None])
  diff_PxQxDx1 = (p.means[:, None] - q.means[None])[..., None]
  dens_PxQ = jnp.exp(_log_normal(diff_PxQxDx1, p_PxQxDxD, hld_PxQ)[..., 0])
  return jnp.sum(p.weights[:, None] * q.weights[None, :] * dens_PxQ)


def l2_distance(p, q):
  """sqrt(∫ (p - q)^2 dx) in closed form. It is a difference of overlaps, so for nearly equal mixtures it
  bottoms out near sqrt(eps * ∫p^2) rather than 0 (about 1e-4 in float32); l2_distance(p, p) is exactly 0."""
  sq = _overlap(p, p) - 2 * _overlap(p, q) + _overlap(q, q)
  return jnp.sqrt(jnp.maximum(sq, 0))


def mixture_moments(gmm):
  """(mean [D], covariance [D, D]) of the whole mixture."""
  mean_D = jnp.sum(gmm.weights[:, None] * gmm.means, axis=0)
  dm_KxD = gmm.means - mean_D
  within_KxDxD = gmm.covs + dm_KxD[:, :, None] * dm_KxD[:, None, :]
  return mean_D, jnp.sum(gmm.weights[:, None, None] * within_KxDxD, axis=0)
