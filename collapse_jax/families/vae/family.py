"""The paper's VAE recursion on MNIST: train a fresh VAE each generation on images decoded by the previous one.

Generation 0 trains on real MNIST (or an offline stand-in). Generation g >= 1 trains either on images decoded
from z ~ N(0, I) by generation g-1, drawn afresh for every batch (config vae.fresh_samples=True, the paper's
way; the loop's buffer then only sets how many images make an epoch), or on the fixed synthetic training set
the loop's regime builds (replace, real_fraction, accumulate, accumulate_subsample). Images handed on are
decoder means, as in the paper.

Training (one `fit`): a fresh model from the generation's key; Adam (lr 1e-3) with PyTorch's coupled L2 weight
decay (1e-5); the loss summed over the batch, as the reference PyTorch code does. Batches come from the valid
rows of (x, w) in each epoch's ops.valid_first order (uniform keys, invalid rows pushed last, so the first
n_valid entries are a uniform permutation of the valid rows); an epoch is ceil(n_valid / batch) steps (PyTorch's
DataLoader with drop_last=False), the last batch masked where it runs past n_valid. The buffer capacity N is
static, n_valid is not, so the epoch is an ops.ragged_scan of ceil(N / batch) steps that skips those past the
valid count. Batches are sharded over the mesh's 'data' axis; parameters are replicated. Each step taken
reports to collapse_jax.progress (epoch, step, loss per image, images/s).

Metrics (evaluate): `latent_mean`, `latent_std` of the generation-0 encoder's latent means of N images decoded
by this generation (the paper's Fig.: std 0.674 -> 0.433 over generations 1-5), their histogram `latent_hist`
(a per-generation array for the density plot), and test-set ELBO per image on real data (`test_elbo`, with its
`test_recon` and `test_kl` parts), plus the training loss per image over the last epoch.
"""
import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from collapse_jax import family, fields, ops, paths, progress, sharding
from collapse_jax.errors import ConfigError
from collapse_jax.families.vae import model as vae_model

DATA_SOURCES = ("digits", "idx", "tfds")
# Latent-mean histogram for the density plot: fixed bins so generations are comparable.
HIST_BINS = 80
HIST_RANGE = 4.0


def hist_centers() -> np.ndarray:
  edges = np.linspace(-HIST_RANGE, HIST_RANGE, HIST_BINS + 1)
  return 0.5 * (edges[1:] + edges[:-1])


@dataclasses.dataclass(frozen=True)
class Config:
  data: str = fields.choice(DATA_SOURCES)
  data_dir: str = fields.text()
  limit: int = fields.integer(lo=0, why="0: all")
  train_split: str = fields.text()
  test_split: str = fields.text()
  batch_size: int = fields.integer(lo=1)
  epochs: int = fields.integer(lo=1)
  latent_eval_n: int = fields.integer(lo=1)
  eval_batch: int = fields.integer(lo=1)
  lr: float = fields.number(lo=0.0, lo_open=True)
  weight_decay: float = fields.number(lo=0.0)
  beta: float = fields.number(lo=0.0)
  fresh_samples: bool = fields.boolean()

  def __post_init__(self):
    from collapse_jax.families.vae import data as mnist  # light: it imports tfds only when reading through it
    for field in ("train_split", "test_split"):
      if mnist.parse_split(getattr(self, field))[0] not in mnist.SPLITS:
        raise fields.bad(f"vae.{field}", "train or test, optionally sliced like test[:8000]", getattr(self, field))


class VAEFamily(family.Family):
  name = "vae"
  Config = Config
  vmap_chains = False
  metric_names = ("latent_std", "latent_mean", "test_elbo", "test_recon", "test_kl", "train_loss")
  headline = ("latent_std", "test_elbo")
  titles = {"latent_std": "std of samples in generation 0's latent space",
            "latent_mean": "mean of samples in generation 0's latent space", "test_elbo": "real test ELBO",
            "test_recon": "real test reconstruction loss", "test_kl": "real test KL term",
            "train_loss": "training loss (last epoch)"}
  groups = (("generation 0's latent view of the samples", ("latent_std", "latent_mean")),
            ("real test loss terms", ("test_recon", "test_kl")))

  @classmethod
  def check(cls, run, c) -> None:
    if c.fresh_samples and run.regime.name != "replace":
      raise ConfigError(f"config.vae.fresh_samples=True draws every batch from the previous model, so "
                        f"config.regime.name must be 'replace', got {run.regime.name!r}")

  def __init__(self, run, c, mesh, abstract: bool = False):
    super().__init__(run, c, mesh, abstract)
    n_dev = mesh.devices.size
    for field in ("batch_size", "eval_batch"):
      if getattr(c, field) % n_dev:
        raise ConfigError(f"config.vae.{field}={getattr(c, field)} must be a multiple of the {n_dev} devices it is "
                          "split over")
    self.batch, self.epochs, self.eval_batch = c.batch_size, c.epochs, c.eval_batch
    self.beta, self.fresh, self.latent_eval_n = c.beta, c.fresh_samples, c.latent_eval_n
    self.tx = optax.chain(optax.add_decayed_weights(c.weight_decay), optax.adam(c.lr))
    self.graphdef = nnx.graphdef(nnx.eval_shape(lambda: vae_model.VAE(nnx.Rngs(0))))
    self._batch_sharding = NamedSharding(mesh, P(sharding.AXIS))
    self._replicated = sharding.replicated(mesh)

  # --- host side -----------------------------------------------------------------------------------------
  def load_data(self):
    """Train and test images (uint8 on disk, float in [0, 1] here); n_real is the training set's size."""
    from collapse_jax.families.vae import data as mnist  # only VAE runs need the image loaders
    c = self.c
    train = mnist.load(c.data, c.train_split, c.data_dir, c.limit)
    test = mnist.load(c.data, c.test_split, c.data_dir, c.limit)
    if self.run.n_real and self.run.n_real != train.shape[0]:
      raise ConfigError(f"config.n_real={self.run.n_real} but config.vae.data={c.data!r} gives {train.shape[0]} "
                        f"training images; leave config.n_real at 0 and size the data with config.vae.limit")
    return family.Data(int(train.shape[0]), {"train_x": mnist.as_float(train), "test_x": mnist.as_float(test)})

  def init_chain(self, key, shared):
    # The evaluation key is fixed per chain so every generation is measured on the same z and test-set noise:
    # differences between generations are then the models', not the Monte Carlo draw's.
    eval_key = jax.random.key_data(key) if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    return shared["train_x"], {"eval_key": eval_key}

  # --- model plumbing ------------------------------------------------------------------------------------
  def _module(self, params) -> vae_model.VAE:
    return nnx.merge(self.graphdef, params)

  def _batch(self, a):
    return jax.lax.with_sharding_constraint(a, self._batch_sharding)

  def init_model(self, key, shared):
    module = vae_model.VAE(nnx.Rngs(key))
    params = nnx.to_pure_dict(nnx.state(module, nnx.Param))
    params = jax.lax.with_sharding_constraint(params, self._replicated)
    return {"params": params, "train_loss": jnp.zeros((), jnp.float32)}

  def _decode(self, params, z_BxL):
    return self._module(params).decode(z_BxL)

  # --- one generation ------------------------------------------------------------------------------------
  def fit(self, gen, key):
    x, w, g, prev_model = gen.x, gen.w, gen.g, gen.prev
    B, N = self.batch, x.shape[0]
    steps_cap = math.ceil(N / B)  # static: the scan length of an epoch
    n_valid = jnp.sum(w > 0).astype(jnp.int32)
    steps = (n_valid + B - 1) // B
    k_init, k_train = jax.random.split(key)
    params = self.init_model(k_init, gen.shared)["params"]
    opt = self.tx.init(params)
    use_fresh = (jnp.asarray(g) > 0) if self.fresh else None

    def loss_fn(params, x_BxHxWxC, w_B, eps_BxL):
      bce_B, kl_B = vae_model.per_example_loss(self._module(params), x_BxHxWxC, eps_BxL)
      return jnp.sum(w_B * (bce_B + self.beta * kl_B))

    def epoch(carry, xs):
      k_epoch, e = xs
      k_perm, k_steps = jax.random.split(k_epoch)
      order = jnp.pad(ops.valid_first(k_perm, w > 0), (0, steps_cap * B - N))

      def train_step(carry, s):
        k_data, k_loss = jax.random.split(jax.random.fold_in(k_steps, s))
        w_B = self._batch((s * B + jnp.arange(B) < n_valid).astype(jnp.float32))

        def read(_):
          return x[jax.lax.dynamic_slice_in_dim(order, s * B, B)]

        def fresh(_):
          z_BxL = jax.random.normal(k_data, (B, vae_model.LATENT))
          return self._decode(prev_model["params"], self._batch(z_BxL))

        x_B = jax.lax.cond(use_fresh, fresh, read, None) if self.fresh else read(None)
        eps_BxL = self._batch(jax.random.normal(k_loss, (B, vae_model.LATENT)))
        params, opt = carry
        loss, grads = jax.value_and_grad(loss_fn)(params, self._batch(x_B), w_B, eps_BxL)
        updates, opt = self.tx.update(grads, opt, params)
        images = jnp.sum(w_B)
        progress.report("vae train", s, steps, epoch=e, epochs=self.epochs, tag=k_train,
                        shows={"loss/img": loss / jnp.maximum(images, 1.0)}, amounts={"img": images})
        return (optax.apply_updates(params, updates), opt), loss

      # Steps past this buffer's valid count are skipped whole (no read, no decode, no update).
      carry, loss_S = ops.ragged_scan(train_step, carry, steps_cap, steps)
      return carry, jnp.sum(loss_S)

    k_epochs = jax.random.split(k_train, self.epochs)
    (params, _), loss_E = jax.lax.scan(epoch, (params, opt), (k_epochs, jnp.arange(self.epochs)))
    return {"params": params, "train_loss": loss_E[-1] / jnp.maximum(n_valid, 1)}

  def _map_rows(self, fn, *xs):
    """fn over row chunks of arrays sharing their leading size n, each chunk split over the mesh (ops.chunked_map:
    results do not depend on the chunk size or the number of devices)."""
    chunk = ops.chunk_size(xs[0].shape[0], self.eval_batch, self.mesh.devices.size)
    return ops.chunked_map(fn, xs, chunk, constrain=self._batch)

  def _images(self, model, n, key):
    z_NxL = jax.random.normal(key, (n, vae_model.LATENT))
    return self._map_rows(lambda z_BxL: self._decode(model["params"], z_BxL), z_NxL)

  def sample(self, model, n, key, gen):
    return self._images(model, n, key), {}

  def evaluate(self, model, gen):
    k_sample, k_elbo = jax.random.split(gen.aux["eval_key"])
    # Latent means of this generation's images under the generation-0 encoder (a fixed yardstick).
    x_gen = self._images(model, self.latent_eval_n, k_sample)
    encoder0 = self._module(gen.model0["params"])
    mu_NxL = self._map_rows(lambda xb: encoder0.encode(xb)[0], x_gen)
    counts, _ = jnp.histogram(mu_NxL.ravel(), bins=HIST_BINS, range=(-HIST_RANGE, HIST_RANGE))
    density = counts / (mu_NxL.size * (2 * HIST_RANGE / HIST_BINS))
    # Test-set ELBO per image, one reparameterised z per image.
    test_x = gen.shared["test_x"]
    eps_TxL = jax.random.normal(k_elbo, (test_x.shape[0], vae_model.LATENT))
    module = self._module(model["params"])
    bce_T, kl_T = self._map_rows(lambda xb, eb: vae_model.per_example_loss(module, xb, eb), test_x, eps_TxL)
    recon, kl = bce_T.mean(), kl_T.mean()
    return {
        "latent_std": jnp.std(mu_NxL), "latent_mean": jnp.mean(mu_NxL),
        "test_elbo": -(recon + kl), "test_recon": recon, "test_kl": kl,
        "train_loss": model["train_loss"], "latent_hist": density.astype(jnp.float32),
    }

  # --- figures -------------------------------------------------------------------------------------------
  def plot(self, workdir, metrics, arrays, snapshots):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = os.path.join(workdir, "plots")
    paths.makedirs(out)
    for g, x_KxHxWxC in sorted(snapshots.items()):
      k = x_KxHxWxC.shape[0]
      if not k:
        continue
      cols = math.ceil(math.sqrt(k))
      rows = math.ceil(k / cols)
      grid = np.ones((rows * 29 + 1, cols * 29 + 1), np.float32)  # 1-pixel white gutters
      for i in range(k):
        r, c = divmod(i, cols)
        grid[1 + 29 * r:29 * (r + 1), 1 + 29 * c:29 * (c + 1)] = x_KxHxWxC[i, :, :, 0]
      grid = np.kron(np.clip(grid, 0, 1), np.ones((3, 3), np.float32))  # 3x: 28-pixel digits are too small to read
      paths.imsave(os.path.join(out, f"vae_samples_gen{g:04d}.png"), grid, cmap="gray", vmin=0, vmax=1)
    hist = arrays.get("latent_hist")
    if hist is None or not len(hist):
      return
    fig, ax = plt.subplots(figsize=(6, 4))
    centers = hist_centers()
    colors = plt.cm.viridis(np.linspace(0, 1, len(hist)))
    std = metrics.get("latent_std", {}).get("mean")
    for g, (h, col) in enumerate(zip(hist, colors)):
      label = f"gen {g}" + (f" (std {std[g]:.3f})" if std is not None else "")
      ax.plot(centers, h, color=col, label=label)
    ax.set_xlabel("latent mean (generation-0 encoder)")
    ax.set_ylabel("density")
    ax.set_title("VAE: latent means of generated images over generations")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.savefig(fig, os.path.join(out, "vae_latent_density.png"), dpi=110)
    plt.close(fig)
