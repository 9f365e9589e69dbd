"""The paper's MNIST VAE as a Flax NNX module, and its loss.

Architecture (Shumailov et al. 2024, Methods, as in their PyTorch code):
  encoder  Conv(1->64, k4, s2, p1) -> ReLU -> Conv(64->128, k4, s2, p1) -> ReLU -> flatten
           -> Dense(6272 -> 20) mean, Dense(6272 -> 20) log-variance
  decoder  Dense(20 -> 128*7*7) -> ReLU -> ConvTranspose(128->64, k4, s2, p1) -> ReLU
           -> ConvTranspose(64->1, k4, s2, p1) -> sigmoid
647,081 parameters.

PyTorch's ConvTranspose2d(padding=p) pads the stride-dilated input by k-1-p per side, whereas Flax passes its
`padding` straight to `lax.conv_transpose`; PyTorch p=1 with k=4 is therefore Flax ((2, 2), (2, 2)), which maps
7 -> 14 -> 28 exactly. The 4x4 stride-2 layers are our own (DownConv, UpConv: same parameters and outputs as
nnx.Conv / nnx.ConvTranspose) because XLA's CPU convolutions are very slow inside loops; see _Conv4x4.
Initialisation follows PyTorch's defaults (weights and biases uniform in +-1/sqrt(fan_in), fan_in as PyTorch
computes it), so training dynamics match the reference code rather than Flax's lecun-normal/zero-bias ones.

The decoder returns logits; the loss uses them directly (a numerically stable form of PyTorch's
`binary_cross_entropy(sigmoid(logits), x, reduction='sum')`), and sampling applies the sigmoid.
"""
import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx

LATENT = 20
IMAGE_HxWxC = (28, 28, 1)
_K = (4, 4)
_FEAT_HxWxC = (7, 7, 128)
_DN = ("NHWC", "HWIO", "NHWC")


def _torch_uniform(fan_in: int):
  """PyTorch's default Conv/Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _linear(n_in: int, n_out: int, rngs: nnx.Rngs) -> nnx.Linear:
  init = _torch_uniform(n_in)
  return nnx.Linear(n_in, n_out, kernel_init=init, bias_init=init, rngs=rngs)


def _use_matmul(impl: str) -> bool:
  if impl not in ("auto", "matmul", "xla"):
    raise ValueError(f"conv impl must be auto, matmul or xla, got {impl!r}")
  return impl == "matmul" or (impl == "auto" and jax.default_backend() == "cpu")


class _Conv4x4(nnx.Module):
  """Shared parameters of the two 4x4 stride-2 layers: kernel [4, 4, in, out] (Flax's HWIO) and bias [out],
  named as Flax's Conv/ConvTranspose name them.

  Why not nnx.Conv / nnx.ConvTranspose: inside a loop body (the epochs scan), XLA's CPU backend lowers these
  convolutions' gradients to code that runs over 20x slower than the same op outside a loop (measured here;
  cf. jax-ml/jax#12868), and the transposed convolution's kernel gradient is slow even outside one. On CPU
  (impl "auto" or "matmul") DownConv is therefore im2col + one matmul and UpConv one matmul + col2im, which XLA
  runs at full speed anywhere; on GPU/TPU ("auto" or "xla") both are the native convolutions. Tests check
  every path against nnx.Conv / nnx.ConvTranspose.
  """

  def __init__(self, n_in: int, n_out: int, fan_in: int, rngs: nnx.Rngs, impl: str = "auto"):
    init = _torch_uniform(fan_in)
    self.kernel = nnx.Param(init(rngs.params(), _K + (n_in, n_out)))
    self.bias = nnx.Param(init(rngs.params(), (n_out,)))
    self.impl = impl


# im2col and col2im for 4x4 kernels at stride 2 with padding 1. In space-to-depth form the padded image is a
# grid of 2x2 blocks; kernel tap (r, s) = (2u + a, 2v + q) of output pixel (i, j) touches block (i + u, j + v)
# at phase (a, q), so both maps are four shifted slices / adds of the block grid. Columns are ordered
# (u, v, a, q, channel). The two maps are each other's adjoints, and each one's gradient is given as the
# other: autodiff would transpose every slice into a zero-padded copy of the whole array.


@jax.custom_vjp
def _im2col(x_BxHxWxC: jax.Array) -> jax.Array:
  """[b, 2h, 2w, c] -> [b, h, w, 16c]: the 4x4 stride-2 patches of the 1-padded image."""
  b, h2, w2, c = x_BxHxWxC.shape
  h, w = h2 // 2, w2 // 2
  d = jnp.pad(x_BxHxWxC, ((0, 0), (1, 1), (1, 1), (0, 0))).reshape(b, h + 1, 2, w + 1, 2, c)
  d = jnp.transpose(d, (0, 1, 3, 2, 4, 5)).reshape(b, h + 1, w + 1, 4 * c)
  return jnp.concatenate([d[:, u:u + h, v:v + w] for u in range(2) for v in range(2)], axis=-1)


@jax.custom_vjp
def _col2im(z_BxHxWx16C: jax.Array) -> jax.Array:
  """[b, h, w, 16c] -> [b, 2h, 2w, c]: each patch added back where _im2col took it from (border dropped)."""
  b, h, w, n = z_BxHxWx16C.shape
  c = n // 16
  z = z_BxHxWx16C.reshape(b, h, w, 2, 2, 4 * c)
  y = sum(jnp.pad(z[:, :, :, u, v], ((0, 0), (u, 1 - u), (v, 1 - v), (0, 0))) for u in range(2) for v in range(2))
  y = jnp.transpose(y.reshape(b, h + 1, w + 1, 2, 2, c), (0, 1, 3, 2, 4, 5)).reshape(b, 2 * h + 2, 2 * w + 2, c)
  return y[:, 1:-1, 1:-1]


_im2col.defvjp(lambda x: (_im2col(x), None), lambda _, g: (_col2im(g),))
_col2im.defvjp(lambda z: (_col2im(z), None), lambda _, g: (_im2col(g),))


def _kernel_rows(kernel_4x4xCxO: jax.Array) -> jax.Array:
  """[4, 4, c, o] -> [16c, o] with rows in _im2col's column order."""
  c, o = kernel_4x4xCxO.shape[2:]
  k = kernel_4x4xCxO.reshape(2, 2, 2, 2, c, o)  # [u, a, v, q, c, o]
  return jnp.transpose(k, (0, 2, 1, 3, 4, 5)).reshape(16 * c, o)


class DownConv(_Conv4x4):
  """Conv(k4, s2, p1): halves height and width, as nnx.Conv(n_in, n_out, (4, 4), 2, padding=((1, 1), (1, 1))).
  The matmul form is im2col + one matmul."""

  def __init__(self, n_in: int, n_out: int, rngs: nnx.Rngs, impl: str = "auto"):
    super().__init__(n_in, n_out, n_in * _K[0] * _K[1], rngs, impl)

  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    kernel = self.kernel[...]
    if not _use_matmul(self.impl):
      y = jax.lax.conv_general_dilated(x_BxHxWxC, kernel, (2, 2), ((1, 1), (1, 1)), dimension_numbers=_DN)
      return y + self.bias[...]
    return _im2col(x_BxHxWxC) @ _kernel_rows(kernel) + self.bias[...]


class UpConv(_Conv4x4):
  """ConvTranspose(k4, s2, PyTorch padding 1): doubles height and width, as
  nnx.ConvTranspose(n_in, n_out, (4, 4), strides=2, padding=((2, 2), (2, 2))).

  The matmul form is one matmul + col2im (as PyTorch computes it): every input pixel's 16 taps, added into
  the output where a DownConv would have read them. No zeros are multiplied, unlike the dilated-input form.
  """

  def __init__(self, n_in: int, n_out: int, rngs: nnx.Rngs, impl: str = "auto"):
    # PyTorch stores transposed-conv weights as (in, out, k, k) and takes fan_in from dim 1: n_out * k * k.
    super().__init__(n_in, n_out, n_out * _K[0] * _K[1], rngs, impl)

  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    kernel = self.kernel[...]
    if not _use_matmul(self.impl):
      y = jax.lax.conv_transpose(x_BxHxWxC, kernel, (2, 2), ((2, 2), (2, 2)), dimension_numbers=_DN)
      return y + self.bias[...]
    # lax.conv_transpose correlates with the kernel unflipped: output tap r of an input pixel is kernel row 3 - r.
    k_Cx16O = _kernel_rows(jnp.swapaxes(kernel[::-1, ::-1], 2, 3)).T
    return _col2im(x_BxHxWxC @ k_Cx16O) + self.bias[...]


class VAE(nnx.Module):
  """Convolutional VAE on 28x28x1 images in [0, 1]."""

  def __init__(self, rngs: nnx.Rngs, conv_impl: str = "auto"):
    self.enc1 = DownConv(1, 64, rngs, conv_impl)
    self.enc2 = DownConv(64, 128, rngs, conv_impl)
    n_feat = math.prod(_FEAT_HxWxC)
    self.fc_mu = _linear(n_feat, LATENT, rngs)
    self.fc_logvar = _linear(n_feat, LATENT, rngs)
    self.fc_dec = _linear(LATENT, n_feat, rngs)
    self.dec1 = UpConv(128, 64, rngs, conv_impl)
    self.dec2 = UpConv(64, 1, rngs, conv_impl)

  def encode(self, x_BxHxWxC: jax.Array) -> tuple[jax.Array, jax.Array]:
    h = jax.nn.relu(self.enc1(x_BxHxWxC))
    h = jax.nn.relu(self.enc2(h))
    # Flattened in NHWC order (PyTorch flattens NCHW): a fixed permutation of the Dense rows, which changes
    # nothing for a model trained from scratch and saves two transposes per pass.
    h_BxF = h.reshape(h.shape[0], -1)
    return self.fc_mu(h_BxF), self.fc_logvar(h_BxF)

  def decode_logits(self, z_BxL: jax.Array) -> jax.Array:
    h_BxF = jax.nn.relu(self.fc_dec(z_BxL))
    h = h_BxF.reshape((z_BxL.shape[0],) + _FEAT_HxWxC)
    h = jax.nn.relu(self.dec1(h))
    return self.dec2(h)

  def decode(self, z_BxL: jax.Array) -> jax.Array:
    """Decoder mean (Bernoulli probabilities) in [0, 1]: what the paper hands to the next generation."""
    return jax.nn.sigmoid(self.decode_logits(z_BxL))

  def __call__(self, x_BxHxWxC: jax.Array, eps_BxL: jax.Array):
    """Reconstruction logits and the posterior's (mean, log-variance); eps_BxL ~ N(0, I) reparameterises z."""
    mu_BxL, logvar_BxL = self.encode(x_BxHxWxC)
    z_BxL = mu_BxL + jnp.exp(0.5 * logvar_BxL) * eps_BxL
    return self.decode_logits(z_BxL), mu_BxL, logvar_BxL


def per_example_loss(model: VAE, x_BxHxWxC: jax.Array, eps_BxL: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Negative ELBO terms per example, each summed over pixels / latent dims: (bce_B, kl_B).

  One reparameterised sample of z per example (noise eps_BxL), as in the paper's training loss. The noise is
  an argument so callers can draw it for a whole set at once, independently of how they chunk or shard it.
  """
  logits, mu_BxL, logvar_BxL = model(x_BxHxWxC, eps_BxL)
  bce_B = optax.sigmoid_binary_cross_entropy(logits, x_BxHxWxC).reshape(x_BxHxWxC.shape[0], -1).sum(-1)
  kl_B = -0.5 * jnp.sum(1.0 + logvar_BxL - mu_BxL**2 - jnp.exp(logvar_BxL), axis=-1)
  return bce_B, kl_B


def count_params(params) -> int:
  return sum(int(leaf.size) for leaf in jax.tree.leaves(params))
