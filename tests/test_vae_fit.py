"""The VAE family's one generation (tests/test_vae.py has the model, config and loop): fit step by step against
hand Adam on ragged buffers, fresh-samples mode, evaluate's metrics against hand computations, masked rows,
chunk-invariant sampling, and a fit sharded over 8 devices against the float32 bounds of one.

Compiles are the cost here (tens of seconds each on 2 CPU cores), so each distinct program is compiled once per
module (fixtures) and reused; training runs are a few small batches of the paper-size model.
"""
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from collapse_jax import progress, registry, sharding
from collapse_jax.family import Generation
from collapse_jax.families.vae import model as vae_model
from collapse_jax.families.vae.family import HIST_BINS, HIST_RANGE
from tests import vae_checks as vc
from tests.helpers import U32, gamma, load_config


def _build(*args, devices: int = 1, **overrides):
  """The quick config's VAE family (with variants and overrides) on a mesh of `devices`, and its shared arrays."""
  _, fam = registry.build(load_config("vae", ",".join(("quick",) + args), **overrides), sharding.make_mesh(devices))
  return fam, jax.device_put(fam.load_data().shared)


def _gen(shared, x=None, w=None, g=0, prev=None, aux=None, model0=None):
  """The Generation the loop hands fit / evaluate (None in the fields the call does not read)."""
  return Generation(jnp.int32(g), x, w, prev, model0, aux, shared)


def _zeros_model(fam, shared):
  shapes = jax.eval_shape(fam.init_model, jax.random.PRNGKey(0), shared)
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


# Off-default hyperparameters, so that a family ignoring any of them (e.g. Adam's default lr, beta = 1, weight
# decay 1e-5) leaves the hand computations below; wd = 1 makes the L2 term comparable to the gradients.
_HYPER = dict(vae__epochs=2, vae__beta=0.5, vae__lr=3e-3, vae__weight_decay=1.0)


@pytest.fixture(scope="module")
def fresh():
  """The quick config (fresh samples per batch) with _HYPER, its jitted fit and evaluate, and generation 0."""
  fam, shared = _build(**_HYPER)
  steps = vc.record_steps(fam)  # one compilation for all: the recording adds a host callback per step
  x, aux = fam.init_chain(jax.random.PRNGKey(0), shared)
  w = jnp.ones((x.shape[0],), jnp.float32)
  fit_jit, evaluate_jit = jax.jit(fam.fit), jax.jit(fam.evaluate)

  def fit(x, w, key, prev, g):
    return fit_jit(_gen(shared, x, w, g, prev, aux), key)

  def evaluate(model, model0):
    return evaluate_jit(model, _gen(shared, aux=aux, model0=model0))

  # Zeros placed like fit's outputs, so that every fit call of this module shares one compilation.
  zeros = jax.device_put(_zeros_model(fam, shared), jax.devices()[0])
  model0 = fit(x, w, jax.random.PRNGKey(1), zeros, 0)
  return dict(c=fam.c, fam=fam, shared=shared, x=x, w=w, aux=aux, fit=fit, fit_jit=fit_jit, evaluate=evaluate,
              model0=model0, steps=steps)


def test_training_improves_test_elbo(fresh):
  f = fresh
  untrained = f["fam"].init_model(jax.random.PRNGKey(1), f["shared"])
  before = f["evaluate"](untrained, untrained)
  after = f["evaluate"](f["model0"], f["model0"])
  assert float(after["test_elbo"]) > float(before["test_elbo"]) + 50, (before["test_elbo"], after["test_elbo"])
  assert np.isfinite(float(after["train_loss"]))
  assert set(f["fam"].metric_names) <= set(after)
  hist = np.asarray(after["latent_hist"])
  assert hist.shape == (HIST_BINS,)
  # A density over the bins: it integrates to the share of latent means inside the plotted range.
  # 1e-5 ~ 2 gamma_80: the float32 sum of 80 densities; 0.9: the share in range is a property of the model.
  assert 0.9 < hist.sum() * 2 * HIST_RANGE / HIST_BINS <= 1 + 1e-5


def test_fresh_samples_ignore_x_after_generation_0_and_compile_once(fresh):
  f = fresh
  fit, x, w, m0 = f["fit"], f["x"], f["w"], f["model0"]
  other = jnp.flip(x, axis=0) * 0.5
  k = jax.random.PRNGKey(7)
  g1 = fit(x, w, k, m0, 1)
  # No g, key, data or previous model may add a compilation.
  compiled = f["fit_jit"]._cache_size()
  g1_other = fit(other, w, k, m0, 1)
  g0_other = fit(other, w, jax.random.PRNGKey(1), m0, 0)
  g2 = fit(x, w, jax.random.PRNGKey(8), g1, 2)
  assert f["fit_jit"]._cache_size() == compiled == 1
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g1_other)):
    np.testing.assert_array_equal(a, b)
  # At generation 0 the buffer is the training data: other data, another model (the same key as model0's).
  assert float(g0_other["train_loss"]) != float(m0["train_loss"])
  assert np.isfinite(float(g2["train_loss"]))


@pytest.mark.parametrize("g,n_valid", [(0, 40), (1, 8)])
def test_fit_matches_hand_adam_on_a_ragged_buffer(fresh, g, n_valid):
  f = fresh
  x = np.asarray(f["x"])
  valid = np.zeros(len(x), bool)
  valid[np.random.default_rng(g).choice(len(x), n_valid, replace=False)] = True
  x = np.where(valid[:, None, None, None], x, 0.77).astype(np.float32)  # junk where w = 0
  key = jax.random.PRNGKey(5)
  lines, sink = [], progress.SINK
  progress.SINK = lines.append
  try:
    with progress.every(0):
      f["steps"].clear()
      got = f["fit"](jnp.asarray(x), jnp.asarray(valid, jnp.float32), key, f["model0"], g)
      jax.block_until_ready(got)
      jax.effects_barrier()  # every step's record is on the host
  finally:
    progress.SINK = sink
  want_loss = vc.check_fit_steps(f["c"], f["fam"], f["steps"], got, x, valid, key, f["model0"]["params"], g)
  # Loss per image: a sum of B x 784 positive BCE terms and B x 20 positive KL terms, fed by the forward's
  # contractions (the widest 6272): two float32 orders differ by <= 2 gamma_(B*804+6272) of it.
  n = f["c"].batch_size * 804 + 6272
  np.testing.assert_allclose(got["train_loss"], want_loss, rtol=2 * gamma(n))
  # One progress line per step taken (every line with interval 0), none for the skipped steps.
  E, steps = f["c"].epochs, math.ceil(n_valid / f["c"].batch_size)
  counters = [tuple(map(int, m.groups())) for m in
              (re.match(r"\[vae train\] epoch (\d+)/(\d+) step (\d+)/(\d+) ", ln) for ln in lines) if m]
  assert counters == [(e, E, s, steps) for e in range(1, E + 1) for s in range(1, steps + 1)], lines


def test_evaluate_metrics_match_hand_computation(fresh):
  f = fresh
  fam, aux, test_x = f["fam"], f["aux"], np.asarray(f["shared"]["test_x"])
  # The current model: generation 0 with an informative posterior (training this short leaves it at the prior,
  # mu ~ 0 and logvar ~ 0, where a wrong sigma = exp(logvar / 2) would not show).
  params = jax.tree.map(np.asarray, f["model0"]["params"])
  params["fc_mu"] = jax.tree.map(lambda a: 50 * a, params["fc_mu"])
  params["fc_logvar"]["bias"] = params["fc_logvar"]["bias"] - 3.0
  sharded = jax.tree.leaves(f["model0"])[0].sharding
  model = {"params": jax.device_put(params, sharded), "train_loss": f["model0"]["train_loss"]}
  # The generation-0 model differs from the current one, and its encoder's means (fc_mu scaled up) reach past
  # the histogram's range, so the density's normalisation by all N x L means (not those in range) shows.
  params0 = jax.tree.map(np.asarray, fam.init_model(jax.random.PRNGKey(11), {})["params"])
  params0["fc_mu"] = jax.tree.map(lambda a: 160 * a, params0["fc_mu"])
  params0 = jax.device_put(params0, sharded)
  got = f["evaluate"](model, {"params": params0, "train_loss": model["train_loss"]})
  k_sample, k_elbo = jax.random.split(aux["eval_key"])
  current, gen0 = nnx.merge(fam.graphdef, model["params"]), nnx.merge(fam.graphdef, params0)
  x_gen = vc.sigmoid(current.decode_logits(jax.random.normal(k_sample, (fam.latent_eval_n, vae_model.LATENT))))
  mu0 = np.asarray(gen0.encode(jnp.asarray(x_gen, jnp.float32))[0], np.float64)
  mu_current = np.asarray(current.encode(jnp.asarray(x_gen, jnp.float32))[0], np.float64)
  assert abs(mu_current.std() - mu0.std()) > 0.5 * mu0.std() and np.mean(np.abs(mu0) > HIST_RANGE) > 0.05
  # 1e-4: a float32 mean/std over 64 x 20 means (gamma_1280 = 7.6e-5), of means computed by the compiled vs the
  # eager encoder (6272-term sums, cancelling): headroom over the measured error, not a bound.
  np.testing.assert_allclose(got["latent_std"], mu0.std(), rtol=1e-4)
  np.testing.assert_allclose(got["latent_mean"], mu0.mean(), atol=1e-4 * mu0.std())
  width = 2 * HIST_RANGE / HIST_BINS
  counts, _ = np.histogram(mu0.ravel(), HIST_BINS, (-HIST_RANGE, HIST_RANGE))
  got_counts = np.asarray(got["latent_hist"], np.float64) * mu0.size * width
  # counts / (N width) * (N width): a few roundings of counts <= 1280, <= 1280 x 4u = 3e-4 off an integer.
  np.testing.assert_allclose(got_counts, np.round(got_counts), atol=1e-3)
  # At most one mean on the other side of a bin edge: the compiled and eager encoders round differently.
  assert np.abs(got_counts - counts).sum() <= 2 + 1e-3, (got_counts, counts)
  # Test ELBO per image: one z = mu + sigma * eps per test image, Bernoulli log-likelihood and closed-form KL.
  mu, logvar = (np.asarray(a, np.float64) for a in current.encode(jnp.asarray(test_x)))
  z = mu + np.exp(0.5 * logvar) * np.asarray(jax.random.normal(k_elbo, mu.shape))
  logits = np.asarray(current.decode_logits(jnp.asarray(z, jnp.float32)), np.float64).reshape(len(z), -1)
  x = test_x.reshape(len(z), -1)
  recon = np.mean(np.sum(np.logaddexp(0, logits) - x * logits, axis=1))
  kl = np.mean(0.5 * np.sum(mu**2 + np.exp(logvar) - logvar - 1, axis=1))
  # 1e-4: means of 64 sums of 784 positive terms, float32 vs float64 (worst case 2 gamma_(64*784) = 6e-3, the
  # sums being pairwise in practice): headroom over the measured error, not a bound.
  np.testing.assert_allclose(got["test_recon"], recon, rtol=1e-4)
  np.testing.assert_allclose(got["test_kl"], kl, rtol=1e-4)
  np.testing.assert_allclose(got["test_elbo"], -(recon + kl), rtol=1e-4)
  assert float(got["train_loss"]) == float(model["train_loss"])


def test_dataset_mode_masks_invalid_rows_and_sample_is_chunk_invariant():
  fam, shared = _build("dataset", vae__epochs=1, vae__batch_size=16)
  x, _ = fam.init_chain(jax.random.PRNGKey(0), shared)
  n = x.shape[0]
  # Rows past the valid count hold junk; with w = 0 they must not touch training.
  junk = jnp.concatenate([x, jnp.full((20,) + x.shape[1:], 0.77)])
  w = jnp.concatenate([jnp.ones((n,)), jnp.zeros((20,))])
  x_pad = jnp.concatenate([x, jnp.zeros((20,) + x.shape[1:])])
  fit = jax.jit(fam.fit)
  zeros = _zeros_model(fam, shared)
  a = fit(_gen(shared, junk, w, 1, zeros), jax.random.PRNGKey(3))
  b = fit(_gen(shared, x_pad, w, 1, zeros), jax.random.PRNGKey(3))
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(u, v)
  s, sample_metrics = fam.sample(a, 100, jax.random.PRNGKey(4), _gen(shared))
  assert s.shape == (100, 28, 28, 1) and s.dtype == jnp.float32 and sample_metrics == {}
  fam.eval_batch = 32  # another chunking of the same draw
  # The same decode at another batch size (another loop order of its <= 1024-term sums), then a sigmoid whose
  # slope is <= 1/4: headroom over the measured error, not a bound.
  np.testing.assert_allclose(fam.sample(a, 100, jax.random.PRNGKey(4), _gen(shared))[0], s, rtol=1e-5, atol=1e-6)


def test_sharded_fit_equals_unsharded():
  assert len(jax.devices()) == 8, "conftest sets 8 simulated CPU devices"
  # One step (32 valid rows of 64, one epoch), so that both fits take it from the same state, the init: after it,
  # the two sum in other float32 orders and Adam turns a near-zero gradient's rounding into a step of +-lr, so
  # their trajectories part. (Recording every step, as the hand-Adam test does, deadlocks the 8-device program:
  # a host callback with the parameters blocks its collectives.)
  fam, shared = _build(vae__epochs=1)
  c, key = fam.c, jax.random.PRNGKey(2)
  valid = np.zeros(64, bool)
  valid[np.random.default_rng(0).choice(64, c.batch_size, replace=False)] = True
  x = np.asarray(fam.init_chain(jax.random.PRNGKey(0), shared)[0])
  k_init, k_train = jax.random.split(key)
  init = fam.init_model(k_init, {})["params"]
  x_b, eps_b = vc.batch(c, fam, x, valid, k_train, 0, 0, 0, None)
  value, want, taus = vc.grad_bound(vc.hand_loss_grad(fam.graphdef, c.beta), init, x_b, eps_b)
  lr, wd = float(np.float32(c.lr)), float(np.float32(c.weight_decay))
  a1, b1, a2, b2 = (float(np.float32(z)) for z in (1 - 0.9, 0.9, 1 - 0.999, 0.999))

  def update(d):  # Adam's first step from zero moments, d = g + wd p: monotone decreasing in d
    return -lr * (a1 * d / (1 - b1)) / (np.sqrt(a2 * d * d / (1 - b2)) + 1e-8)

  for n_dev in (1, 8):
    fam, shared = _build(vae__epochs=1, devices=n_dev)
    gen = _gen(shared, jnp.asarray(x), jnp.asarray(valid, jnp.float32), 0, _zeros_model(fam, shared))
    got = jax.jit(fam.fit)(gen, key)
    # The step's loss: B x 784 positive BCE terms and B x 20 positive KL terms, fed by the forward's contractions
    # (the widest 6272): two float32 orders differ by <= 2 gamma_(B*804+6272) of it.
    np.testing.assert_allclose(float(got["train_loss"]), value / c.batch_size,
                               rtol=2 * gamma(c.batch_size * 804 + 6272))
    for (path, a), p, w, tau in zip(jax.tree_util.tree_leaves_with_path(got["params"]), jax.tree.leaves(init),
                                    want, taus):
      # The update the rule maps the gradient interval [g - tau, g + tau] to (d's own rounding added: <= u |g| +
      # 2u |wd p|); then <= 8 roundings of the update (8u of it) and the add to p (2u of p and the update).
      p = np.asarray(p, np.float64)
      dd = tau + U32 * (np.abs(w) + 2 * wd * np.abs(p))
      lo, hi = p + update(w + wd * p + dd), p + update(w + wd * p - dd)
      slack = 10 * U32 * lr + 2 * U32 * np.abs(p)
      vc.inside_tol(f"params{jax.tree_util.keystr(path)} on {n_dev} devices", a, (lo + hi) / 2, (hi - lo) / 2 + slack)
