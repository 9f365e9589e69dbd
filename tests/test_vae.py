"""The VAE family: the paper's model and loss, its config, figures, and the whole loop (one generation's fit,
evaluate and sample against hand computations: tests/test_vae_fit.py).

Compiles are the cost here (tens of seconds each on 2 CPU cores), so each distinct program is compiled once per
module (fixtures) and reused; training runs are a few small batches of the paper-size model.
"""
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from collapse_jax import config as config_lib, loop, registry, sharding
from collapse_jax import metrics as metrics_lib
from collapse_jax.errors import ConfigError
from collapse_jax.families.vae import model as vae_model
from collapse_jax.families.vae.family import HIST_BINS, VAEFamily
from tests.helpers import load_config, sigkill_then_resume


def _cfg(*args, **overrides):
  return load_config("vae", ",".join(("quick",) + args), **overrides)


def _parse(cfg):
  """The VAE's config checks as registry.build runs them, without building anything or reading data."""
  return VAEFamily.parse(config_lib.parse(cfg), cfg.get("vae"))


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
    _parse(load_config("vae", arg) if arg else load_config("vae"))
  assert set(range(5)) <= set(load_config("vae").snapshot_generations)
  with pytest.raises(ConfigError, match=r"^unknown config variant 'bogus' \(known: digits, mnist, "):
    load_config("vae", "bogus")


@pytest.mark.parametrize("field,value,match", [
    ("vae__batch_size", 0, r"config\.vae\.batch_size must be a positive integer, got 0"),
    ("vae__eval_batch", -8, r"config\.vae\.eval_batch must be a positive integer"),
    ("vae__epochs", 0, r"config\.vae\.epochs must be a positive integer"),
    ("vae__latent_eval_n", 2.0, r"config\.vae\.latent_eval_n must be a positive integer"),
    ("vae__limit", -1, r"config\.vae\.limit must be a non-negative integer"),
    ("vae__limit", True, r"config\.vae\.limit must be a non-negative integer"),
    ("vae__data", "cifar", r"config\.vae\.data='cifar' is not one of digits, idx, tfds"),
    ("vae__data_dir", 3, r"config\.vae\.data_dir must be a string"),
    ("vae__train_split", "validation", r"config\.vae\.train_split must be train or test"),
    ("vae__test_split", "tests[:10]", r"config\.vae\.test_split must be train or test"),
    ("vae__lr", 0.0, r"config\.vae\.lr must be a finite number > 0"),
    ("vae__weight_decay", -1e-5, r"config\.vae\.weight_decay must be a finite number >= 0"),
    ("vae__beta", -0.5, r"config\.vae\.beta must be a finite number >= 0"),
    ("vae__beta", "1", r"config\.vae\.beta must be a finite number >= 0"),
    ("vae__fresh_samples", 1, r"config\.vae\.fresh_samples must be True or False"),
    ("regime__name", "accumulate", r"config\.vae\.fresh_samples=True .* must be 'replace'"),
])
def test_bad_vae_config_is_refused(field, value, match):
  # Through a plain dict: a config file may hold any type, which ConfigDict overrides would refuse first.
  d = _cfg().to_dict()
  section, leaf = field.split("__")
  d[section][leaf] = value
  with pytest.raises(ConfigError, match=match):
    _parse(ml_collections.ConfigDict(d))


def test_missing_vae_section_is_refused():
  with pytest.raises(ConfigError, match=r"config\.vae is missing"):
    _parse(load_config("gaussian"))


def test_n_real_must_match_the_training_data(tmp_path):
  # The quick config reads 64 training images; a run sized for 10 must stop before writing or compiling.
  wd = tmp_path / "run"
  with pytest.raises(ConfigError) as err:
    loop.run(_cfg(n_real=10), str(wd))
  msg = str(err.value)
  assert msg.startswith("config.n_real=10 but") and "gives 64 training images" in msg and "\n" not in msg, msg
  assert not (wd / "config.json").exists()
  assert loop.Experiment(_cfg(n_real=64)).data.n_real == 64


@pytest.mark.parametrize("field", ["batch_size", "eval_batch"])
def test_batches_must_divide_over_devices(field):
  with pytest.raises(ConfigError, match=rf"config\.vae\.{field}=30 must be a multiple of the 8 devices"):
    registry.build(_cfg(**{f"vae__{field}": 30}), sharding.make_mesh(8))


def test_plot_writes_grids_and_density(tmp_path):
  _, fam = registry.build(_cfg(), sharding.make_mesh(1))
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

  def spy(self):
    fn = orig(self)
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
  assert all(np.isfinite(r["test_elbo"]) and r["latent_std"] > 0 for r in rows)
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
