"""The VAE family: the paper's model and loss, one compiled generation, fresh-samples mode, sharding, the loop.

Compiles are the cost here (tens of seconds each on 2 CPU cores), so each distinct program is compiled once per
module (fixtures) and reused; training runs are a few small batches of the paper-size model.
"""
import math
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from collapse_jax import config as config_lib, loop, progress, sharding
from collapse_jax import metrics as metrics_lib
from collapse_jax.errors import ConfigError
from collapse_jax.families.vae import model as vae_model
from collapse_jax.families.vae.family import HIST_BINS, HIST_RANGE, VAEFamily
from tests import vae_checks as vc
from tests.helpers import U32, gamma, load_config, sigkill_then_resume


def _cfg(*args, **overrides):
  return load_config("vae", ",".join(("quick",) + args), **overrides)


def _zeros_model(fam, shared):
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fam.init_model, jax.random.PRNGKey(0), shared))


# --- the model ----------------------------------------------------------------------------------------------------


def test_param_count_and_shapes():
  model = vae_model.VAE(nnx.Rngs(0))
  assert vae_model.count_params(nnx.state(model, nnx.Param)) == 647_081
  x = jnp.full((3, 28, 28, 1), 0.5)
  logits, mu, logvar = model(x, jnp.zeros((3, 20)))
  assert logits.shape == (3, 28, 28, 1) and mu.shape == logvar.shape == (3, 20)
  y = model.decode(jnp.ones((5, 20)))
  assert y.shape == (5, 28, 28, 1) and float(y.min()) >= 0 and float(y.max()) <= 1


def flax_kernel(layer, k=None):
  """Our kernel (or a kernel-shaped gradient) in nnx.Conv / nnx.ConvTranspose's [r, s, in, out] layout."""
  k = layer.kernel[...] if k is None else k
  if isinstance(layer, vae_model.DownConv):  # held as [out, r, s, in]
    return jnp.transpose(k, (1, 2, 3, 0))
  return jnp.transpose(k, (1, 2, 0, 3))[::-1, ::-1]  # [in, r, s, out], PyTorch's taps: Flax's flipped


# (8, 6): more im2col columns (16 x 6) than input channels, as in the 128 -> 64 layer; (32, 1): fewer, as in
# the decoder's last layer.
@pytest.mark.parametrize("impl", ["matmul", "xla"])
@pytest.mark.parametrize("n_in,n_out", [(8, 6), (32, 1)])
def test_conv_layers_match_flax_values_and_gradients(impl, n_in, n_out):
  x14 = jax.random.uniform(jax.random.key(0), (2, 14, 14, n_in))
  x7 = jax.random.uniform(jax.random.key(1), (2, 7, 7, n_in))
  down = vae_model.DownConv(n_in, n_out, nnx.Rngs(0), impl)
  ref = nnx.Conv(n_in, n_out, (4, 4), strides=2, padding=((1, 1), (1, 1)), rngs=nnx.Rngs(1))
  up = vae_model.UpConv(n_in, n_out, nnx.Rngs(0), impl)
  # PyTorch's ConvTranspose2d(padding=1) for k=4, s=2 is Flax padding ((2, 2), (2, 2)): 7 -> 14 exactly.
  ref_t = nnx.ConvTranspose(n_in, n_out, (4, 4), strides=2, padding=((2, 2), (2, 2)), rngs=nnx.Rngs(1))
  for ours, theirs, x, shape in ((down, ref, x14, (2, 7, 7, n_out)), (up, ref_t, x7, (2, 14, 14, n_out))):
    theirs.kernel[...], theirs.bias[...] = flax_kernel(ours), ours.bias[...]
    assert ours(x).shape == shape
    # Tolerances here (1e-5, kernel/bias gradients atol 1e-4, which sum over B x H x W positions) are headroom over
    # the measured error, not a bound: two orders of K <= 512 products differ by <= 2 gamma_K sum|terms| ~ 1e-3.
    np.testing.assert_allclose(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    # The matmul forms have hand-written adjoints (_im2col / _col2im, UpConv's VJP); check both inputs'.
    dy = jax.random.normal(jax.random.key(2), shape)
    grad = nnx.grad(lambda layer, x: jnp.sum(layer(x) * dy), argnums=(0, 1))
    (g_ours, gx_ours), (g_theirs, gx_theirs) = grad(ours, x), grad(theirs, x)
    np.testing.assert_allclose(gx_ours, gx_theirs, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(flax_kernel(ours, g_ours["kernel"][...]), g_theirs["kernel"][...], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(g_ours["bias"][...], g_theirs["bias"][...], rtol=1e-5, atol=1e-4)


def test_loss_matches_hand_computation():
  model = vae_model.VAE(nnx.Rngs(3))
  x = jax.random.uniform(jax.random.key(0), (2, 28, 28, 1))
  eps = jax.random.normal(jax.random.key(1), (2, 20))
  bce, kl = vae_model.per_example_loss(model, x, eps)
  mu, logvar = map(np.asarray, model.encode(x))
  z = mu + np.exp(0.5 * logvar) * np.asarray(eps)
  p = np.asarray(model.decode(jnp.asarray(z)), np.float64)
  xn = np.asarray(x, np.float64)
  want_bce = -np.sum(xn * np.log(p) + (1 - xn) * np.log(1 - p), axis=(1, 2, 3))
  want_kl = 0.5 * np.sum(mu**2 + np.exp(logvar) - logvar - 1, axis=1)
  # BCE: 784 positive terms summed in float32: <= gamma_784 = 4.7e-5 of it, about half of 1e-4.
  np.testing.assert_allclose(bce, want_bce, rtol=1e-4)
  # KL: 20 terms mu^2 + e^lv - lv - 1 that cancel near the prior: atol 1e-6 is headroom (measured), not a bound.
  np.testing.assert_allclose(kl, want_kl, rtol=1e-4, atol=1e-6)


# --- config -------------------------------------------------------------------------------------------------------


def test_configs_validate():
  for arg in (None, "quick", "mnist", "mnist_idx", "t10k", "dataset", "real_fraction", "accumulate",
              "mnist,real_fraction"):
    cfg = load_config("vae", arg) if arg else load_config("vae")
    config_lib.validate(cfg)
    VAEFamily.validate(cfg)
  assert set(range(5)) <= set(load_config("vae").snapshot_generations)
  with pytest.raises(ValueError, match="configs/vae.py:ARG"):
    load_config("vae", "bogus")


@pytest.mark.parametrize("field,value,match", [
    ("vae__batch_size", 0, r"config\.vae\.batch_size must be a positive integer, got 0"),
    ("vae__eval_batch", -8, r"config\.vae\.eval_batch must be a positive integer"),
    ("vae__epochs", 0, r"config\.vae\.epochs must be a positive integer"),
    ("vae__latent_eval_n", 2.0, r"config\.vae\.latent_eval_n must be a positive integer"),
    ("vae__limit", -1, r"config\.vae\.limit must be a non-negative integer"),
    ("vae__limit", True, r"config\.vae\.limit must be a non-negative integer"),
    ("vae__data", "cifar", r"config\.vae\.data must be one of digits, idx, tfds"),
    ("vae__data_dir", 3, r"config\.vae\.data_dir must be a string"),
    ("vae__train_split", "validation", r"config\.vae\.train_split must be train or test"),
    ("vae__test_split", "tests[:10]", r"config\.vae\.test_split must be train or test"),
    ("vae__lr", 0.0, r"config\.vae\.lr must be > 0"),
    ("vae__weight_decay", -1e-5, r"config\.vae\.weight_decay must be >= 0"),
    ("vae__beta", -0.5, r"config\.vae\.beta must be >= 0"),
    ("vae__beta", "1", r"config\.vae\.beta must be >= 0"),
    ("vae__fresh_samples", 1, r"config\.vae\.fresh_samples must be True or False"),
    ("regime__name", "accumulate", r"config\.vae\.fresh_samples=True .* must be 'replace'"),
])
def test_bad_vae_config_is_refused(field, value, match):
  # Through a plain dict: a config file may hold any type, which ConfigDict overrides would refuse first.
  d = _cfg().to_dict()
  section, leaf = field.split("__")
  d[section][leaf] = value
  with pytest.raises(ConfigError, match=match):
    VAEFamily.validate(ml_collections.ConfigDict(d))


def test_missing_vae_section_is_refused():
  with pytest.raises(ConfigError, match=r"config\.vae is missing"):
    VAEFamily.validate(load_config("gaussian"))


def test_n_real_must_match_the_training_data(tmp_path):
  # The quick config reads 64 training images; a run sized for 10 must stop before writing or compiling.
  wd = tmp_path / "run"
  with pytest.raises(ConfigError) as err:
    loop.run(_cfg(n_real=10), str(wd))
  msg = str(err.value)
  assert msg.startswith("config.n_real=10 but") and "gives 64 training images" in msg and "\n" not in msg, msg
  assert not (wd / "config.json").exists()
  assert loop.Experiment(_cfg(n_real=64)).family.n_real == 64


@pytest.mark.parametrize("field", ["batch_size", "eval_batch"])
def test_batches_must_divide_over_devices(field):
  with pytest.raises(ConfigError, match=rf"config\.vae\.{field}=30 must be a multiple of the 8 devices"):
    VAEFamily(_cfg(**{f"vae__{field}": 30}), sharding.make_mesh(8))


# --- one generation -----------------------------------------------------------------------------------------------


# Off-default hyperparameters, so that a family ignoring any of them (e.g. Adam's default lr, beta = 1, weight
# decay 1e-5) leaves the hand computations below; wd = 1 makes the L2 term comparable to the gradients.
_HYPER = dict(vae__epochs=2, vae__beta=0.5, vae__lr=3e-3, vae__weight_decay=1.0)


@pytest.fixture(scope="module")
def fresh():
  """The quick config (fresh samples per batch) with _HYPER, its jitted fit and evaluate, and generation 0."""
  cfg = _cfg(**_HYPER)
  fam = VAEFamily(cfg, sharding.make_mesh(1))
  steps = vc.record_steps(fam)  # one compilation for all: the recording adds a host callback per step
  shared = jax.device_put(fam.shared())
  x, aux = fam.init_chain(jax.random.PRNGKey(0), shared)
  w = jnp.ones((x.shape[0],), jnp.float32)
  fit, evaluate = jax.jit(fam.fit), jax.jit(fam.evaluate)
  # Zeros placed like fit's outputs, so that every fit call of this module shares one compilation.
  zeros = jax.device_put(_zeros_model(fam, shared), jax.devices()[0])
  model0 = fit(x, w, jax.random.PRNGKey(1), zeros, jnp.int32(0), shared)
  return dict(cfg=cfg, fam=fam, shared=shared, x=x, w=w, aux=aux, fit=fit, evaluate=evaluate, model0=model0,
              steps=steps)


def test_training_improves_test_elbo(fresh):
  f = fresh
  untrained = f["fam"].init_model(jax.random.PRNGKey(1), f["shared"])
  before = f["evaluate"](untrained, untrained, f["aux"], f["shared"])
  after = f["evaluate"](f["model0"], f["model0"], f["aux"], f["shared"])
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
  g1 = fit(x, w, k, m0, jnp.int32(1), f["shared"])
  # No g, key, data or previous model may add a compilation.
  compiled = fit._cache_size()
  g1_other = fit(other, w, k, m0, jnp.int32(1), f["shared"])
  g0_other = fit(other, w, jax.random.PRNGKey(1), m0, jnp.int32(0), f["shared"])
  g2 = fit(x, w, jax.random.PRNGKey(8), g1, jnp.int32(2), f["shared"])
  assert fit._cache_size() == compiled == 1
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
      got = f["fit"](jnp.asarray(x), jnp.asarray(valid, jnp.float32), key, f["model0"], jnp.int32(g), f["shared"])
      jax.block_until_ready(got)
      jax.effects_barrier()  # every step's record is on the host
  finally:
    progress.SINK = sink
  want_loss = vc.check_fit_steps(f["cfg"].vae, f["fam"], f["steps"], got, x, valid, key, f["model0"]["params"], g)
  # Loss per image: a sum of B x 784 positive BCE terms and B x 20 positive KL terms, fed by the forward's
  # contractions (the widest 6272): two float32 orders differ by <= 2 gamma_(B*804+6272) of it.
  n = f["cfg"].vae.batch_size * 804 + 6272
  np.testing.assert_allclose(got["train_loss"], want_loss, rtol=2 * gamma(n))
  # One progress line per step taken (every line with interval 0), none for the skipped steps.
  E, steps = f["cfg"].vae.epochs, math.ceil(n_valid / f["cfg"].vae.batch_size)
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
  got = f["evaluate"](model, {"params": params0, "train_loss": model["train_loss"]}, aux, f["shared"])
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
  fam = VAEFamily(_cfg("dataset", vae__epochs=1, vae__batch_size=16), sharding.make_mesh(1))
  shared = fam.shared()
  x, _ = fam.init_chain(jax.random.PRNGKey(0), shared)
  n = x.shape[0]
  # Rows past the valid count hold junk; with w = 0 they must not touch training.
  junk = jnp.concatenate([x, jnp.full((20,) + x.shape[1:], 0.77)])
  w = jnp.concatenate([jnp.ones((n,)), jnp.zeros((20,))])
  x_pad = jnp.concatenate([x, jnp.zeros((20,) + x.shape[1:])])
  fit = jax.jit(fam.fit)
  zeros = _zeros_model(fam, shared)
  a = fit(junk, w, jax.random.PRNGKey(3), zeros, jnp.int32(1), shared)
  b = fit(x_pad, w, jax.random.PRNGKey(3), zeros, jnp.int32(1), shared)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(u, v)
  s = fam.sample(a, 100, jax.random.PRNGKey(4), shared)
  assert s.shape == (100, 28, 28, 1) and s.dtype == jnp.float32
  fam.eval_batch = 32  # another chunking of the same draw
  # The same decode at another batch size (another loop order of its <= 1024-term sums), then a sigmoid whose
  # slope is <= 1/4: headroom over the measured error, not a bound.
  np.testing.assert_allclose(fam.sample(a, 100, jax.random.PRNGKey(4), shared), s, rtol=1e-5, atol=1e-6)


def test_sharded_fit_equals_unsharded():
  assert len(jax.devices()) == 8, "conftest sets 8 simulated CPU devices"
  # One step (32 valid rows of 64, one epoch), so that both fits take it from the same state, the init: after it,
  # the two sum in other float32 orders and Adam turns a near-zero gradient's rounding into a step of +-lr, so
  # their trajectories part. (Recording every step, as the hand-Adam test does, deadlocks the 8-device program:
  # a host callback with the parameters blocks its collectives.)
  cfg = _cfg(vae__epochs=1)
  c, key = cfg.vae, jax.random.PRNGKey(2)
  valid = np.zeros(64, bool)
  valid[np.random.default_rng(0).choice(64, c.batch_size, replace=False)] = True
  fam = VAEFamily(cfg, sharding.make_mesh(1))
  x = np.asarray(fam.init_chain(jax.random.PRNGKey(0), fam.shared())[0])
  k_init, k_train = jax.random.split(key)
  init = fam.init_model(k_init, {})["params"]
  x_b, eps_b = vc.batch(c, fam, x, valid, k_train, 0, 0, 0, None)
  value, want, taus = vc.grad_bound(vc.hand_loss_grad(fam.graphdef, c.beta), init, x_b, eps_b)
  lr, wd = float(np.float32(c.lr)), float(np.float32(c.weight_decay))
  a1, b1, a2, b2 = (float(np.float32(z)) for z in (1 - 0.9, 0.9, 1 - 0.999, 0.999))

  def update(d):  # Adam's first step from zero moments, d = g + wd p: monotone decreasing in d
    return -lr * (a1 * d / (1 - b1)) / (np.sqrt(a2 * d * d / (1 - b2)) + 1e-8)

  for n_dev in (1, 8):
    fam = VAEFamily(cfg, sharding.make_mesh(n_dev))
    shared = fam.shared()
    got = jax.jit(fam.fit)(jnp.asarray(x), jnp.asarray(valid, jnp.float32), key, _zeros_model(fam, shared),
                           jnp.int32(0), shared)
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


def test_plot_writes_grids_and_density(tmp_path):
  fam = VAEFamily(_cfg(), sharding.make_mesh(1))
  hist = np.stack([np.exp(-np.linspace(-4, 4, HIST_BINS) ** 2 / s) for s in (1.0, 0.5)]).astype(np.float32)
  metrics = {"latent_std": {"mean": np.array([0.7, 0.5])}}
  snaps = {0: np.random.default_rng(0).uniform(size=(10, 28, 28, 1)), 1: np.zeros((10, 28, 28, 1))}
  fam.plot(str(tmp_path), metrics, {"latent_hist": hist}, snaps)
  for name in ("vae_samples_gen0000.png", "vae_samples_gen0001.png", "vae_latent_density.png"):
    assert os.path.getsize(tmp_path / "plots" / name) > 0


# --- through the loop ---------------------------------------------------------------------------------------------

_LOOP = dict(generations=3, num_devices=1)


@pytest.fixture(scope="module")
def loop_run(tmp_path_factory):
  """An uninterrupted 3-generation quick run, recording the loop's compiled chunk."""
  chunks = []
  orig = loop.Experiment.chunk_fn

  def spy(self, shardings):
    fn = orig(self, shardings)
    chunks.append(fn)
    return fn

  loop.Experiment.chunk_fn = spy
  try:
    wd = str(tmp_path_factory.mktemp("vae") / "full")
    hist = loop.run(_cfg(**_LOOP), wd)
  finally:
    loop.Experiment.chunk_fn = orig
  return wd, hist, chunks


def test_loop_end_to_end(loop_run):
  wd, hist, chunks = loop_run
  rows = metrics_lib.read_jsonl(os.path.join(wd, "metrics.jsonl"))
  assert [r["generation"] for r in rows] == [0, 1, 2]
  assert all(np.isfinite(r["test_elbo/mean"]) and r["latent_std/mean"] > 0 for r in rows)
  assert hist["arrays"]["latent_hist"].shape == (3, HIST_BINS)
  assert hist["snapshots"].shape == (3, 16, 28, 28, 1)
  for name in ["vae_metrics.png", "vae_latent_density.png"] + [f"vae_samples_gen{g:04d}.png" for g in range(3)]:
    assert os.path.exists(os.path.join(wd, "plots", name)), name
  # Three generations, three chunk calls, one compilation.
  assert {id(c) for c in chunks} == {id(chunks[0])} and chunks[0]._cache_size() == 1


def test_loop_interrupted_in_process_equals_uninterrupted(loop_run, tmp_path):
  full_wd, full, _ = loop_run
  wd = str(tmp_path / "cut")
  loop.run(_cfg(**_LOOP), wd, stop_after=1)
  assert len(metrics_lib.read_jsonl(os.path.join(wd, "metrics.jsonl"))) == 1
  resumed = loop.run(_cfg(**_LOOP), wd)
  for k in full["metrics"]:
    np.testing.assert_array_equal(full["metrics"][k], resumed["metrics"][k], err_msg=k)
  np.testing.assert_array_equal(full["snapshots"], resumed["snapshots"])
  assert (metrics_lib.read_jsonl(os.path.join(wd, "metrics.jsonl"))
          == metrics_lib.read_jsonl(os.path.join(full_wd, "metrics.jsonl")))


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path):
  args = ["--config=configs/vae.py:quick", "--config.generations=4", "--config.plots=False",
          "--config.checkpoint_min_seconds=0"]  # every chunk saved, so the kill finds two checkpoints in time
  # Two checkpoints: metrics.jsonl is written just after each checkpoint, so the first one alone may be
  # caught before any metrics file exists.
  ref, resumed, done = sigkill_then_resume(tmp_path, args, min_checkpoints=2, timeout=300)
  assert 0 < done < 4
  assert resumed == ref
