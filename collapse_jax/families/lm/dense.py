"""Matmuls with hand-written backward passes, arranged for XLA:CPU (the OPT model's projections and tied LM head).

Autodiff's weight gradient of y = x @ W is (g^T x)^T: the dot transposes the cotangent g, and XLA fuses g's
producers (the residual stream's gradient: every later layer's LayerNorm backward and dropout) into that
transposed copy, recomputing them per element (20% of an LM train step, benchmarks/profiles/lm_train_profile.py).
Computing x^T g transposes the stored x instead. Same values as autodiff up to float rounding (tests/test_opt.py).
"""
import math

import jax
import jax.numpy as jnp


def _contract(x, w, x_axes, w_axes, out):
  return jax.lax.dot_general(x, w, ((x_axes, w_axes), ((), ())), preferred_element_type=out)


@jax.custom_vjp
def dense(x_TxI, w_IxO, b_O):
  """x_TxI @ w_IxO + b_O with dW = x^T g (module docstring). The bias is inside so that dW, dx and db read one
  [T, O] view of g."""
  return _contract(x_TxI, w_IxO, (1,), (0,), None) + b_O


def _dense_fwd(x_TxI, w_IxO, b_O):
  return dense(x_TxI, w_IxO, b_O), (x_TxI, w_IxO)


def _dense_bwd(res, g_TxO):
  x_TxI, w_IxO = res
  dx_TxI = _contract(g_TxO, w_IxO, (1,), (1,), x_TxI.dtype).astype(x_TxI.dtype)
  dw_IxO = _contract(x_TxI, g_TxO, (0,), (0,), w_IxO.dtype).astype(w_IxO.dtype)
  # db as a dot with ones, not a reduction: XLA:CPU fuses g's producers into a reduction (duplicating them), not
  # into a dot's operand, so g is computed once for all three.
  db_O = _contract(jnp.ones(g_TxO.shape[:1], g_TxO.dtype), g_TxO, (0,), (0,), g_TxO.dtype)
  return dx_TxI, dw_IxO, db_O


dense.defvjp(_dense_fwd, _dense_bwd)


@jax.custom_vjp
def lm_head(x_TxP, table_VxP):
  """Tied-embedding logits x @ table^T in float32. Autodiff's table gradient is dlogits^T x, a transposed copy of
  the [tokens, vocab] dlogits (the largest tensor of a step); (x^T dlogits)^T transposes x and the [P, V] result."""
  return _contract(x_TxP, table_VxP, (1,), (1,), jnp.float32)


def _lm_head_fwd(x_TxP, table_VxP):
  return lm_head(x_TxP, table_VxP), (x_TxP, table_VxP)


def _lm_head_bwd(res, g_TxV):
  x_TxP, table_VxP = res
  dx_TxP = _contract(g_TxV, table_VxP, (1,), (0,), jnp.float32).astype(x_TxP.dtype)
  dtable_PxV = _contract(x_TxP, g_TxV, (0,), (0,), jnp.float32).astype(table_VxP.dtype)
  return dx_TxP, dtable_PxV.T


lm_head.defvjp(_lm_head_fwd, _lm_head_bwd)


def project(x, kernel, bias, n_in: int):
  """x's last n_in axes contracted with kernel's first n_in (a [in..., out...] kernel, heads as their own axes),
  plus the bias [out...]."""
  lead, k_in, k_out = x.shape[:x.ndim - n_in], kernel.shape[:n_in], kernel.shape[n_in:]
  y = dense(x.reshape(-1, math.prod(k_in)), kernel.reshape(math.prod(k_in), -1), bias.reshape(-1))
  return y.reshape(*lead, *k_out)
