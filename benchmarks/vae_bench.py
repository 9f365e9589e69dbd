"""VAE training throughput: our jitted `VAEFamily.fit` against a PyTorch implementation of the same model and loss.

  python benchmarks/vae_bench.py [--steps 16] [--rounds 5] [--batch 256] [--devices 0] [--torch-device auto]

Both sides train the paper's 647,081-parameter VAE (summed BCE + KL, Adam lr 1e-3 with coupled L2 1e-5) on the
same random images for the same number of batch-256 steps. JAX: one compile stage (the first call of `fit`, one
epoch over steps*batch images), then timed calls ending in block_until_ready; what is timed is the whole of
`fit` (shuffle, lax.scan over batches, fresh init), i.e. the code a generation runs. PyTorch (optional: skipped
with a message when not importable; on CUDA when available, else on the cores JAX uses): a warm-up call, then
the same steps with shuffled batches, a fresh model per call too. Method (quiet machine, alternating rounds,
medians and spread, the speed-up as the median of per-round ratios, machine/versions/commit in every row):
benchmarks/common.py.
"""
import argparse
import os
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from collapse_jax import config as config_lib, registry, sharding  # noqa: E402
from collapse_jax.family import Generation  # noqa: E402
from collapse_jax.families.vae import model as vae_model  # noqa: E402


def jax_runner(x_NxHxWxC: np.ndarray, batch: int, devices: int):
  cfg = config_lib.load("vae", vae__batch_size=batch, vae__epochs=1)
  _, fam = registry.build(cfg, sharding.make_mesh(devices or None))  # load_data is not called: own images
  mesh = fam.mesh
  x = jax.device_put(jnp.asarray(x_NxHxWxC), sharding.leading(mesh) if len(x_NxHxWxC) % mesh.devices.size == 0
                     else sharding.replicated(mesh))
  w = jnp.ones((x.shape[0],), jnp.float32)
  prev = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fam.init_model, jax.random.PRNGKey(0), {}))
  gen = Generation(jnp.int32(0), x, w, prev, prev, {}, {})  # fit at generation 0 reads the buffer only
  fit = jax.jit(fam.fit)
  calls = iter(range(1 << 30))

  def run():
    model = fit(gen, jax.random.PRNGKey(next(calls)))
    jax.block_until_ready(model)
    return float(model["train_loss"])

  return run, f"jax {jax.__version__} ({mesh.devices.size} x {jax.devices()[0].platform})"


def torch_runner(x_NxHxWxC: np.ndarray, batch: int, device: str, args):
  try:
    torch = common.pin_torch(args)
    from torch import nn
    from torch.nn import functional as F
  except ImportError as e:
    return None, f"torch not importable ({e}); PyTorch peer skipped"

  class TorchVAE(nn.Module):
    def __init__(self):
      super().__init__()
      self.enc = nn.Sequential(nn.Conv2d(1, 64, 4, 2, 1), nn.ReLU(), nn.Conv2d(64, 128, 4, 2, 1), nn.ReLU(),
                               nn.Flatten())
      self.fc_mu, self.fc_logvar = nn.Linear(128 * 49, 20), nn.Linear(128 * 49, 20)
      self.fc_dec = nn.Linear(20, 128 * 49)
      self.dec = nn.Sequential(nn.ConvTranspose2d(128, 64, 4, 2, 1), nn.ReLU(), nn.ConvTranspose2d(64, 1, 4, 2, 1),
                               nn.Sigmoid())

    def forward(self, x):
      h = self.enc(x)
      mu, logvar = self.fc_mu(h), self.fc_logvar(h)
      z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
      return self.dec(F.relu(self.fc_dec(z)).view(-1, 128, 7, 7)), mu, logvar

  if device == "auto":
    device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.manual_seed(0)
  n_params = sum(p.numel() for p in TorchVAE().parameters())
  assert n_params == 647_081, n_params
  data = torch.from_numpy(np.ascontiguousarray(x_NxHxWxC.transpose(0, 3, 1, 2))).to(device)

  def run():
    # A fresh model and optimiser per call, as `fit` starts each generation from scratch.
    m = TorchVAE().to(device)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3, weight_decay=1e-5)
    total = torch.zeros((), device=device)
    for idx in torch.randperm(len(data), device=device).split(batch):
      xb = data[idx]
      recon, mu, logvar = m(xb)
      loss = F.binary_cross_entropy(recon, xb, reduction="sum") - 0.5 * torch.sum(1 + logvar - mu**2 - logvar.exp())
      opt.zero_grad()
      loss.backward()
      opt.step()
      total += loss.detach()
    return total.item() / len(data)  # .item() waits for the device, like block_until_ready

  where = f"{torch.get_num_threads()} threads" if device == "cpu" else device
  return run, f"torch {torch.__version__} ({where})"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=16, help="batches per timed call")
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--devices", type=int, default=0, help="JAX devices to shard batches over (0: all)")
  p.add_argument("--torch-device", default="auto", help="cpu, cuda, or auto (cuda when available)")
  p.add_argument("--no-torch", action="store_true")
  common.add_args(p)
  args = p.parse_args(argv)
  common.check_rounds(args)
  n = args.steps * args.batch
  x = np.random.default_rng(0).uniform(size=(n,) + vae_model.IMAGE_HxWxC).astype(np.float32)

  t0 = time.perf_counter()
  run_jax, jax_desc = jax_runner(x, args.batch, args.devices)
  run_jax()  # compile stage
  compile_s = time.perf_counter() - t0
  fns = {"jax": run_jax}
  run_torch, torch_desc = (None, "PyTorch peer off (--no-torch)") if args.no_torch else \
      torch_runner(x, args.batch, args.torch_device, args)
  if run_torch is None:
    print(torch_desc)
  else:
    run_torch()  # warm-up (allocator, thread pool)
    fns["torch"] = run_torch
  state = common.wait_quiet(args, "vae_train")
  times = common.alternate(fns, args.rounds)
  rows = []
  for name, desc in (("jax", jax_desc), ("torch", torch_desc)):
    if name in fns:
      st = common.summary(times[name])
      rows.append({"impl": name, "desc": desc, "batch": args.batch, "steps": args.steps, **st,
                   "images_per_s": n / st["median_s"], "compile_s": compile_s if name == "jax" else None})
  if len(rows) == 2:
    rows[0].update(common.ratio(times["jax"], times["torch"]))
  return common.report(f"vae_train (batch {args.batch} x {args.steps} steps, float32)", rows,
                       ["impl", "images_per_s", "median_s", "spread", "compile_s", "ratio", "desc"], state)


if __name__ == "__main__":
  main()
