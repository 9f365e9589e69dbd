"""The paper's MNIST VAE as a Flax NNX module, and its loss.

Architecture (Shumailov et al. 2024, Methods, as in their PyTorch code):
  encoder  Conv(1->64, k4, s2, p1) -> ReLU -> Conv(64->128, k4, s2, p1) -> ReLU -> flatten
           -> Dense(6272 -> 20) mean, Dense(6272 -> 20) log-variance
  decoder  Dense(20 -> 128*7*7) -> ReLU -> ConvTranspose(128->64, k4, s2, p1) -> ReLU
           -> ConvTranspose(64->1, k4, s2, p1) -> sigmoid
647,081 parameters.

PyTorch's ConvTranspose2d(padding=p) pads the stride-dilated input by k-1-p per side, whereas Flax passes its
`padding` straight to `lax.conv_transpose`; PyTorch p=1 with k=4 is therefore Flax ((2, 2), (2, 2)), which maps
7 -> 14 -> 28 exactly. The 4x4 stride-2 layers are our own (DownConv, UpConv: the outputs of nnx.Conv /
nnx.ConvTranspose, kernels held in PyTorch's tap order with the channel axes where the CPU matmuls want them)
because XLA's CPU convolutions are very slow inside loops; see _Conv4x4.
Initialisation follows PyTorch's defaults (weights and biases uniform in +-1/sqrt(fan_in), fan_in as PyTorch
computes it), so training dynamics match the reference code rather than Flax's lecun-normal/zero-bias ones.

The decoder returns logits; the loss uses them directly (a numerically stable form of PyTorch's
`binary_cross_entropy(sigmoid(logits), x, reduction='sum')`), and sampling applies the sigmoid.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

LATENT = 20
IMAGE_HxWxC = (28, 28, 1)
_K = (4, 4)
_FEAT_HxWxC = (7, 7, 128)


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
  """Shared parameters of the two 4x4 stride-2 layers: a kernel [m, 4, 4, n] and a bias.

  The kernel is stored in the orientation its CPU matmul wants (below), which is also PyTorch's order up to a
  move of the channel axes: DownConv keeps [out, 4, 4, in] (PyTorch Conv2d's [out, in, kh, kw]) and UpConv
  [in, 4, 4, out] (ConvTranspose2d's [in, out, kh, kw]), with no flip.

  Why not nnx.Conv / nnx.ConvTranspose: inside a loop body (the epochs scan), XLA's CPU backend lowers these
  convolutions' gradients to code that runs over 20x slower than the same op outside a loop (measured here;
  cf. jax-ml/jax#12868; training at 40 images/s with jax 0.10.2), and the transposed convolution's kernel
  gradient is slow even outside one. On CPU (impl "auto" or "matmul") DownConv is therefore im2col + one
  matmul and UpConv one matmul + col2im, which XLA runs at full speed anywhere; on GPU/TPU ("auto" or "xla")
  both are the native convolutions. Tests check every path against nnx.Conv / nnx.ConvTranspose.

  The kernel gradient of either matmul is a^T b over the rows (batch x pixels) of its two operands; XLA:CPU
  computes it at full speed when the result is [small channels, 16 x big channels], and at half speed in the
  other orientation (measured here: 27 vs 47 ms for the 64 -> 128 layer at batch 256). With the kernel stored
  that way round, no transpose sits between that dot and the parameter for XLA to fold into the dot.
  """

  def __init__(self, shape: tuple[int, int, int, int], n_out: int, fan_in: int, rngs: nnx.Rngs, impl: str):
    init = _torch_uniform(fan_in)
    self.kernel = nnx.Param(init(rngs.params(), shape))
    self.bias = nnx.Param(init(rngs.params(), (n_out,)))
    self.impl = impl


# im2col and col2im for 4x4 kernels at stride 2 with padding 1. In space-to-depth form the padded image is a
# grid of 2x2 blocks; kernel tap (r, s) = (2u + a, 2v + q) of output pixel (i, j) touches block (i + u, j + v)
# at phase (a, q), so both maps are four shifted slices / adds of the block grid. Columns are ordered
# (u, v, a, q, channel). The two maps are each other's adjoints, and each one's gradient is given as the
# other: autodiff would transpose every slice into a zero-padded copy of the whole array.


def _patch_rows(h: int, w: int) -> np.ndarray:
  """[h * w * 16] pixel indices into the flattened (2h+2) x (2w+2) padded image, in _im2col's row and column
  order: output pixel (i, j), then tap (u, v, a, q) at padded pixel (2(i + u) + a, 2(j + v) + q)."""
  i, j, u, v, a, q = np.meshgrid(*(np.arange(n) for n in (h, w, 2, 2, 2, 2)), indexing="ij")
  return ((2 * (i + u) + a) * (2 * w + 2) + 2 * (j + v) + q).reshape(-1)


@jax.custom_vjp
def _im2col(x_BxHxWxC: jax.Array) -> jax.Array:
  """[b, 2h, 2w, c] -> [b, h, w, 16c]: the 4x4 stride-2 patches of the 1-padded image.

  One gather of whole channel rows at constant indices: XLA:CPU emits it (with the pad) as a single loop
  fusion that writes the columns once. The same map as four shifted slices of the space-to-depth grid
  concatenated made XLA materialise each slice and then copy all four into the concatenation: two passes
  over the 51 MB columns of the 64 -> 128 layer at batch 256 instead of one."""
  b, h2, w2, c = x_BxHxWxC.shape
  h, w = h2 // 2, w2 // 2
  x_BxPxC = jnp.pad(x_BxHxWxC, ((0, 0), (1, 1), (1, 1), (0, 0))).reshape(b, -1, c)
  cols = jnp.take(x_BxPxC, jnp.asarray(_patch_rows(h, w)), axis=1, mode="clip")
  return cols.reshape(b, h, w, 16 * c)


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


def _tap_cols(kernel_Mx4x4xN: jax.Array) -> jax.Array:
  """[m, 4, 4, n] -> [m, 16n] with the taps in _im2col's (u, v, a, q) column order."""
  m, n = kernel_Mx4x4xN.shape[0], kernel_Mx4x4xN.shape[3]
  k = kernel_Mx4x4xN.reshape(m, 2, 2, 2, 2, n)  # [m, u, a, v, q, n]
  return jnp.transpose(k, (0, 1, 3, 2, 4, 5)).reshape(m, 16 * n)


class DownConv(_Conv4x4):
  """Conv(k4, s2, p1): halves height and width, as nnx.Conv(n_in, n_out, (4, 4), 2, padding=((1, 1), (1, 1)))
  with that layer's kernel [r, s, in, out] held here as [out, r, s, in]. The matmul form is im2col + one
  matmul."""

  def __init__(self, n_in: int, n_out: int, rngs: nnx.Rngs, impl: str = "auto"):
    super().__init__((n_out,) + _K + (n_in,), n_out, n_in * _K[0] * _K[1], rngs, impl)

  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    kernel = self.kernel[...]
    if not _use_matmul(self.impl):
      y = jax.lax.conv_general_dilated(x_BxHxWxC, kernel, (2, 2), ((1, 1), (1, 1)),
                                       dimension_numbers=("NHWC", "OHWI", "NHWC"))
      return y + self.bias[...]
    return _im2col(x_BxHxWxC) @ _tap_cols(kernel).T + self.bias[...]


class UpConv(_Conv4x4):
  """ConvTranspose(k4, s2, PyTorch padding 1): doubles height and width. Input pixel i adds tap r of the
  kernel [in, r, s, out] to output pixel 2i + r - 1, as PyTorch's ConvTranspose2d (whose padding 1 with k=4
  is Flax's ((2, 2), (2, 2)), with Flax's kernel spatially flipped: nnx.ConvTranspose correlates).

  The matmul form is one matmul + col2im (as PyTorch computes it): every input pixel's 16 taps, added into
  the output where a DownConv would have read them. No zeros are multiplied, unlike the dilated-input form.
  """

  def __init__(self, n_in: int, n_out: int, rngs: nnx.Rngs, impl: str = "auto"):
    # PyTorch stores transposed-conv weights as (in, out, k, k) and takes fan_in from dim 1: n_out * k * k.
    super().__init__((n_in,) + _K + (n_out,), n_out, n_out * _K[0] * _K[1], rngs, impl)

  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    kernel = self.kernel[...]
    if not _use_matmul(self.impl):
      y = jax.lax.conv_transpose(x_BxHxWxC, kernel[:, ::-1, ::-1], (2, 2), ((2, 2), (2, 2)),
                                 dimension_numbers=("NHWC", "IHWO", "NHWC"))
      return y + self.bias[...]
    return _up(x_BxHxWxC, _tap_cols(kernel)) + self.bias[...]


@jax.custom_vjp
def _up(x_BxHxWxC: jax.Array, k_Cx16O: jax.Array) -> jax.Array:
  return _col2im(x_BxHxWxC @ k_Cx16O)


def _up_bwd(res, g_Bx2Hx2WxO):
  """UpConv's VJP, written out so that both dots see cols = im2col(g) as one [n, 16o] array. Through autodiff
  (col2im's VJP, then the kernel's reshapes), XLA:CPU instead transposed the whole 51 MB cols of the 128 -> 64
  layer for the kernel gradient x^T cols at batch 256; this form saves about 10% of the training step."""
  x, k_Cx16O = res
  c, n_cols = k_Cx16O.shape
  cols_Nx16O = _im2col(g_Bx2Hx2WxO).reshape(-1, n_cols)
  x_NxC = x.reshape(-1, c)
  return (cols_Nx16O @ k_Cx16O.T).reshape(x.shape), x_NxC.T @ cols_Nx16O


_up.defvjp(lambda x, k: (_up(x, k), (x, k)), _up_bwd)


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
