"""The paper's VAE recursion: a conv VAE per generation trained on the previous one's samples (MNIST or digits).

A fresh 647k-parameter convolutional VAE per generation, generation 0 trained on the real images, generation
g >= 1 on images decoded from N(0, I) by generation g-1 (fresh per batch, as in the paper), 30 epochs of batch
256 with Adam each.

Command (offline default: scikit-learn's 8x8 digits resized to 28x28 as a stand-in for MNIST, 1500 training
images; minutes on a CPU: its wall time is measured below):
  python -m collapse_jax.main --config=configs/vae.py --workdir=runs/vae
Real MNIST (the paper's setting; a GPU or TPU is advised: 60,000 images x 30 epochs per generation, about
25 minutes per generation on 2 CPU cores):
  python -m collapse_jax.main --config=configs/vae.py:mnist --workdir=runs/vae_mnist            # tfds
  python -m collapse_jax.main --config=configs/vae.py:mnist_idx --config.vae.data_dir=DIR --workdir=...  # IDX
Variants (comma separated, e.g. configs/vae.py:mnist,real_fraction):
  digits         the offline stand-in (the default)
  mnist          real MNIST through tfds (60,000 training images)
  mnist_idx      real MNIST from IDX files in config.vae.data_dir
  t10k           only the t10k IDX file in config.vae.data_dir: train on images 0..7999, test on 8000..9999
  dataset        no fresh samples: generation g trains on a fixed set of samples.n images from generation g-1
  real_fraction  like dataset, with 10% of each training set drawn from the real data
  accumulate     like dataset, training on the real data plus all generations' samples so far
  quick          a tiny run for tests and smoke checks (64 images, 1 epoch, 2 generations)
Any field can be overridden with --config.FIELD=VALUE; when changing the data size (vae.limit, vae.data), set
samples.n to the new training-set size too, so that each generation hands on as many images as it saw.
Expected result: the generation-0 encoder's latent means of generated images narrow generation by generation
(the paper: std 0.674 -> 0.433 over generations 1-5 on MNIST) and the test-set ELBO on real images falls;
plots/vae_latent_density.png shows the density over generations, plots/vae_samples_gen*.png the samples.
Measured (python -m benchmarks.results --only vae; commit d8d0b1c, 2026-12-07):
Machine: Intel(R) Xeon(R) Processor (avx512), 2 cores, jax 0.10.2, jaxlib 0.10.2.
Wall time 151.6 s, 5 generations (`--config=vae`; start-up and compilation included; others' load 0.0 cores).

| generation | 0 | 1 | 2 | 3 | 4 |
|---|---|---|---|---|---|
| std of samples in generation 0's latent space [latent_std] | 0.3826 | 0.2456 | 0.2381 | 0.2369 | 0.2364 |
| real test ELBO [test_elbo] | -173.4 | -203.4 | -284.2 | -442.3 | -318.5 |
(end of measured block vae)
Measured (python -m benchmarks.results --only vae_real_fraction; commit d8d0b1c, 2026-12-07):
Machine: Intel(R) Xeon(R) Processor (avx512), 2 cores, jax 0.10.2, jaxlib 0.10.2.
Wall time 143.6 s, 5 generations (`--config=vae:real_fraction`; start-up and compilation included; others' load 0.0 cores).

| generation | 0 | 1 | 2 | 3 | 4 |
|---|---|---|---|---|---|
| std of samples in generation 0's latent space [latent_std] | 0.3826 | 0.2557 | 0.2467 | 0.2407 | 0.245 |
| real test ELBO [test_elbo] | -173.4 | -195 | -201.8 | -206.4 | -201.3 |
(end of measured block vae_real_fraction)
The replace run's latent std falls at every generation, mostly in the first (the digits stand-in gives a weak
generation-0 model), its real test ELBO falls far below generation 0's and by generation 4 the samples are
near-black; with real_fraction the std narrows about as much but the ELBO stays roughly level after generation 1.
t10k (real MNIST, 8,000 training images; not in benchmarks.results, as it reads ../shared/data and takes ~20
minutes a run; hand-run at commit f27c348, 2026-11-27, jax 0.10.2, 2 CPU cores, 4 minutes per generation):
latent std 0.863, 0.795, 0.728, 0.652, 0.579 and test ELBO -111, -117, -126, -134, -144 over generations 0-4;
with real_fraction, std 0.632 and ELBO -125 at generation 4.
"""
from collapse_jax.config import base_config, variants

VARIANTS = ("digits", "mnist", "mnist_idx", "t10k", "dataset", "real_fraction", "accumulate", "quick")

_MNIST_TRAIN = 60000
_DIGITS_TRAIN = 1500  # collapse_jax.families.vae.data.DIGITS_TRAIN, kept literal so loading a config imports no data code


def get_config(arg: str | None = None):
  c = base_config()
  c.family = "vae"
  c.seed = 0
  c.generations = 5
  c.chains = 1                     # one chain whose batches are split over the devices
  c.checkpoint_every = 1           # one compiled generation, reused; an Orbax checkpoint after each
  c.regime.name = "replace"
  c.samples.n = _DIGITS_TRAIN      # each generation hands on as many images as generation 0 trained on
  c.snapshot_size = 64
  c.vae = dict(
      data="digits",               # digits | idx | tfds
      data_dir="",                 # idx: directory of the IDX files; tfds: its data_dir ("" = tfds default)
      limit=0,                     # first `limit` images of each split (0: all)
      train_split="train",         # tfds-style, sliceable: "test[:8000]" when only MNIST's t10k file is at hand
      test_split="test",           # held-out real images for the test ELBO, e.g. "test[8000:]"
      batch_size=256,
      epochs=30,
      lr=1e-3,
      weight_decay=1e-5,           # PyTorch Adam's coupled L2
      beta=1.0,                    # weight of the KL term
      fresh_samples=True,          # g >= 1: every batch decoded afresh from N(0, I) by generation g-1
      latent_eval_n=10000,         # generated images encoded by the generation-0 encoder per generation
      eval_batch=1024,             # rows per chunk when sampling / evaluating (a multiple of the device count)
  )
  # Applied in VARIANTS order whatever the argument's: a data source, then the regime, then quick's sizes.
  flags, _ = variants(arg, VARIANTS)
  if "mnist" in flags:
    c.vae.data, c.samples.n = "tfds", _MNIST_TRAIN
  if "mnist_idx" in flags:
    c.vae.data, c.samples.n = "idx", _MNIST_TRAIN
  if "t10k" in flags:
    # Only MNIST's 10,000-image test file (as on the offline development machines): train on its first
    # 8,000 images, measure the test ELBO on the other 2,000.
    c.vae.data, c.samples.n = "idx", 8000
    c.vae.train_split, c.vae.test_split = "test[:8000]", "test[8000:]"
  if flags & {"dataset", "real_fraction", "accumulate"}:
    c.vae.fresh_samples = False
  for regime in ("real_fraction", "accumulate"):
    if regime in flags:
      c.regime.name = regime
  if "quick" in flags:
    c.generations = 2
    c.samples.n = 64
    c.snapshot_size = 16
    c.vae.update(limit=64, batch_size=32, epochs=1, latent_eval_n=64, eval_batch=64)
  # Every generation (a VAE run is tens of generations at most; the loop ignores those past config.generations),
  # so that overriding --config.generations keeps a grid per generation.
  c.snapshot_generations = tuple(range(100))
  return c
