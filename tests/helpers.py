"""Shared test helpers: configs as the CLI builds them, the CLI in a subprocess, and float32 bounds for comparing\na sharded program with a single-device one."""
import functools
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from collapse_jax import config as config_lib
from collapse_jax.families.lm import train as lm_train
from collapse_jax.families.lm import model as opt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str, arg: str | None = None, **overrides):
  # One device unless a test asks for more: 8 simulated devices on 2 cores only add thread contention.
  return config_lib.load(name, arg, **{"num_devices": 1, **overrides})


def cli(*args, devices: int = 1, timeout: float = 600, **popen):
  """The CLI in a fresh interpreter with `devices` simulated CPU devices."""
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")
  cmd = [sys.executable, "-m", "collapse_jax.main", *args]
  if popen.pop("background", False):
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def sigkill_then_resume(tmp_path, args, min_checkpoints: int = 1, timeout: float = 300):
  """Run the CLI uninterrupted, and again killed by SIGKILL once `min_checkpoints` checkpoints exist, then
  resumed on the same workdir. Returns (uninterrupted metrics rows, resumed rows, rows written when killed)."""
  import signal
  import time
  from collapse_jax.metrics import read_jsonl
  ref = cli(*args, f"--workdir={tmp_path / 'ref'}")
  assert ref.returncode == 0, ref.stdout + ref.stderr
  wd = tmp_path / "killed"
  proc = cli(*args, f"--workdir={wd}", background=True)
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    ck = wd / "checkpoints"
    if ck.exists() and len([s for s in os.listdir(ck) if s.isdigit()]) >= min_checkpoints:
      break
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
  # metrics.jsonl may be behind the checkpoints, ahead of them (appended while a save was in flight) or end in
  # a line torn by the kill: count its complete lines; the resumed run must have repaired all of that.
  done = (wd / "metrics.jsonl").read_text().count("\n") if (wd / "metrics.jsonl").exists() else 0
  again = cli(*args, f"--workdir={wd}")
  assert again.returncode == 0, again.stdout + again.stderr
  assert "resuming" in again.stdout
  # Byte for byte, not only row for row: no torn, duplicated or missing line survives the resume.
  assert (wd / "metrics.jsonl").read_bytes() == (tmp_path / "ref" / "metrics.jsonl").read_bytes()
  return read_jsonl(str(tmp_path / "ref" / "metrics.jsonl")), read_jsonl(str(wd / "metrics.jsonl")), done


def refused_before_compilation(tmp_path, monkeypatch, cfg, match):
  """loop.run refuses `cfg` with a ConfigError matching `match` before anything is jitted or checkpointed."""
  import jax
  import pytest
  from collapse_jax import loop
  from collapse_jax.errors import ConfigError

  def no_compile(*a, **k):
    raise AssertionError("compiled before validating")

  monkeypatch.setattr(jax, "jit", no_compile)
  with pytest.raises(ConfigError, match=match):
    loop.run(cfg, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


def corrupt_checkpoint(step_dir) -> None:
  """Overwrite every file of an Orbax step with junk of the same size (a disk-level corruption)."""
  for root, _, files in os.walk(step_dir):
    for f in files:
      p = os.path.join(root, f)
      size = os.path.getsize(p)
      with open(p, "wb") as fh:
        fh.write(b"\x00garbage" * (size // 8 + 1))


# --- float32 bounds for comparing two evaluation orders (sharded vs single device) ---------------------------------
# A sharded program computes the same function as a single-device one in another float32 order, so results agree
# only within summation bounds: a sum of n terms in any order is within gamma(n - 1) * sum|terms| of the exact sum
# (Higham, Accuracy and Stability, 4.3), two orders within twice that. These helpers derive such bounds.
U32 = 2.0 ** -24  # unit roundoff of float32


def gamma(n: int, u: float = U32) -> float:
  return n * u / (1 - n * u)


def names(tree):
  return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def inside(name, got, interval):
  got = np.asarray(got, np.float64)
  out = (got < interval[0]) | (got > interval[1])
  assert not out.any(), (f"{name}: {out.sum()} of {out.size} outside, first at {np.argwhere(out)[0]}: "
                         f"{got[out][0]} not in [{interval[0][out][0]}, {interval[1][out][0]}]")


def token_grads(cfg, params, ids_BxL, mask_BxL, drop_key):
  """d(token-mean loss)/d(params) of each (row, target) token of a batch, float32, in float64, stacked on a last
  axis: the B * (L - 1) terms whose sum is the gradient. One reverse pass per token (one-hot weights), in
  sequence: batched under jit (jit of jacfwd, or of vmap over the one-hot weights) these per-token gradients do
  not sum to the gradient on jax 0.10.2 CPU."""
  b, t = ids_BxL.shape[0], ids_BxL.shape[1] - 1
  onehot_NxBxT = jnp.eye(b * t).reshape(-1, b, t)
  jac = _token_grads(cfg, params, jnp.asarray(ids_BxL), jnp.asarray(mask_BxL), drop_key, onehot_NxBxT)
  return jax.tree.map(lambda j: np.moveaxis(np.asarray(j, np.float64), 0, -1), jac)


@functools.partial(jax.jit, static_argnums=0)
def _token_grads(cfg, params, ids, mask, drop, onehot_NxBxT):
  return jax.lax.map(lambda w1: jax.grad(_weighted_loss, argnums=1)(cfg, params, ids, mask, drop, w1), onehot_NxBxT)


def _weighted_loss(cfg, params, ids, mask, drop, w_BxT):
  """The token-mean loss with each target token's term weighted by w_BxT (one-hot: one token's term)."""
  logits = opt.apply(cfg, params, ids, mask, deterministic=drop is None, dropout_key=drop)
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  nll_BxT = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
  w = (mask[:, 1:] * mask[:, :-1]).astype(jnp.float32)
  return jnp.sum(nll_BxT * w * w_BxT) / jnp.maximum(jnp.sum(w), 1.0)


def grad_bound(jac, k: int = 64):
  """Per-coordinate bound on |g_a - g_b| for two float32 evaluations of the gradient in different orders.

  The gradient is a sum of N per-token terms J_t; summed in any order its error is <= gamma_N * sum_t |J_t|, so
  two orders differ by <= 2 gamma_N S_i. Each term is itself a float32 backprop with sums of <= k terms inside one
  token (k = the widest contraction), whose magnitudes before cancellation a coordinate does not show (a key
  bias's gradient cancels to exactly 0 and is nothing but this rounding); we bound them by the largest per-token
  magnitude of the same layer (a bias is the kernel's gradient for a constant input, the layer-normed inputs
  being O(1)): 2 gamma_k * max over the layer.
  """
  n = jax.tree.leaves(jac)[0].shape[-1]
  return bound_from_sums(jax.tree.map(lambda j: np.abs(j).sum(-1), jac), n, k)


def bound_from_sums(sums, n: int, k: int = 64):
  """grad_bound from S_i = sum_t |J_t| of each coordinate (token_grad_sums: without storing the N terms)."""
  flat = jax.tree_util.tree_flatten_with_path(sums)[0]
  layer = lambda path: jax.tree_util.keystr(path[:-1] if len(path) > 1 else path)  # noqa: E731
  layer_max = {}
  for path, a in flat:
    layer_max[layer(path)] = max(layer_max.get(layer(path), 0.0), float(np.max(a)))
  out = [2 * gamma(n) * np.asarray(a, np.float64) + 2 * gamma(k) * layer_max[layer(path)] for path, a in flat]
  return jax.tree.unflatten(jax.tree.structure(sums), out)


def token_grad_sums(cfg, params, ids_BxL, mask_BxL, drop_key):
  """(S, g, N): of the N per-token gradient terms of token_grads, the sum of their absolute values accumulated in
  a scan (for models too large to hold N gradients; float32 sums of positive terms, inflated by 1 + gamma_N to
  bound their own rounding) and their plain sum, the gradient (float64 host arrays)."""
  b, t = ids_BxL.shape[0], ids_BxL.shape[1] - 1
  onehot_NxBxT = jnp.eye(b * t).reshape(-1, b, t)
  sums, total = _token_grad_sums(cfg, params, jnp.asarray(ids_BxL), jnp.asarray(mask_BxL), drop_key, onehot_NxBxT)
  host = lambda tree: jax.tree.map(lambda a: np.asarray(a, np.float64), tree)  # noqa: E731
  return jax.tree.map(lambda a: a * (1 + gamma(b * t)), host(sums)), host(total), b * t


@functools.partial(jax.jit, static_argnums=0)
def _token_grad_sums(cfg, params, ids, mask, drop, onehot_NxBxT):
  def one(acc, w1):
    g = jax.grad(_weighted_loss, argnums=1)(cfg, params, ids, mask, drop, w1)
    return (jax.tree.map(lambda a, x: a + jnp.abs(x), acc[0], g), jax.tree.map(jnp.add, acc[1], g)), None

  zeros = jax.tree.map(jnp.zeros_like, params)
  (sums, total), _ = jax.lax.scan(one, (zeros, zeros), onehot_NxBxT)
  return sums, total


def adam_interval(tcfg, state, g_lo, g_hi, total_steps: int):
  """Per-coordinate [lo, hi] of AdamW's new (params, mu, nu) from lm_train `state` for any gradient in [g_lo,
  g_hi]: optax's update rule (mu' = b1 mu + (1-b1) g, nu' = b2 nu + (1-b2) g^2, step = lr_c (mu'/(1-b1^c)) /
  (sqrt(nu'/(1-b2^c)) + eps) + lr_c wd p for >= 2-D p) evaluated in interval arithmetic. Where [g_lo, g_hi]
  straddles 0 (a gradient within its rounding noise) the step's interval is about +-lr wide: such a weight may
  move either way."""
  b1, b2, eps, wd = tcfg.b1, tcfg.b2, tcfg.eps, tcfg.weight_decay
  adam = state.opt_state[0]
  c = int(adam.count) + 1
  lr = float(lm_train.schedule(tcfg, total_steps)(int(adam.count)))

  w1 = [(1 - b1) * b1 ** (c - k) / (1 - b1 ** c) for k in range(1, c + 1)]
  w2 = [(1 - b2) * b2 ** (c - k) / (1 - b2 ** c) for k in range(1, c + 1)]
  cs = math.sqrt(sum(a * a / b for a, b in zip(w1, w2)))  # 1 at c = 1, 1.0014 at c = 2

  def one(p, mu, nu, lo, hi):
    p, mu, nu = (np.asarray(a, np.float64) for a in (p, mu, nu))
    sq_lo = np.where((lo <= 0) & (hi >= 0), 0.0, np.minimum(lo * lo, hi * hi))
    sq_hi = np.maximum(lo * lo, hi * hi)
    mu_i = (b1 * mu + (1 - b1) * lo, b1 * mu + (1 - b1) * hi)
    nu_i = (b2 * nu + (1 - b2) * sq_lo, b2 * nu + (1 - b2) * sq_hi)
    den = [np.sqrt(v / (1 - b2 ** c)) + eps for v in nu_i]
    q = [m / (1 - b1 ** c) / d for m in mu_i for d in den]
    # Interval arithmetic forgets that mu and nu come from the same g (at c = 1 it gives g / eps); Cauchy-Schwarz
    # on the moments' weighted sums bounds |mu_hat| / sqrt(nu_hat) by cs for any gradient history.
    step = (np.maximum(np.minimum.reduce(q), -cs), np.minimum(np.maximum.reduce(q), cs))
    decay = wd * p if p.ndim >= 2 else 0.0
    p_i = (p - lr * (step[1] + decay), p - lr * (step[0] + decay))
    # The float32 evaluation of each is a handful of roundings of values no larger than these.
    return tuple((lo_ - 8 * U32 * np.maximum(np.abs(lo_), np.abs(hi_)) - 8 * U32 * lr,
                  hi_ + 8 * U32 * np.maximum(np.abs(lo_), np.abs(hi_)) + 8 * U32 * lr)
                 for lo_, hi_ in (p_i, mu_i, nu_i))

  out = [one(*leaves) for leaves in zip(*(jax.tree.leaves(t) for t in (state.params, adam.mu, adam.nu, g_lo, g_hi)))]
  return jax.tree.unflatten(jax.tree.structure(state.params), out)


def check_adam(out, state, box, where):
  """lm_train state `out` (one step after `state`): params and both moments inside `box` (adam_interval)."""
  adam = out.opt_state[0]
  assert int(out.step) == int(state.step) + 1 and int(adam.count) == int(state.opt_state[0].count) + 1
  for name, p, mu, nu, (p_i, mu_i, nu_i) in zip(names(out.params), jax.tree.leaves(out.params),
                                                jax.tree.leaves(adam.mu), jax.tree.leaves(adam.nu),
                                                jax.tree.leaves(box, is_leaf=lambda x: isinstance(x, tuple))):
    for what, got, interval in (("params", p, p_i), ("mu", mu, mu_i), ("nu", nu, nu_i)):
      inside(f"{what}{name} on {where}", got, interval)


def chain_stats_close(a_GxS, b_GxS, n: int, err_msg: str = "", u: float = U32) -> None:
  """Two loop histories' [mean, std, quantiles...] over n chains, whose per-chain values are the same but whose
  cross-chain reductions run in another order (another mesh): the mean is a sum of n terms in another order, then
  one division: |diff| <= (2 gamma_{n-1} + 2u) * sum|x_i| / n <= that * sqrt(mean^2 + std^2) (Cauchy-Schwarz: mean
  |x| <= rms x). The std: its sum of n squares in another order (half of 2 gamma_{n-1} after the sqrt, + a few u),
  plus the mean's shift c, which enters the variance at second order only (sum of deviations is ~0): c^2 / 2 std.
  Quantiles are order statistics of the per-chain values plus one interpolation: given the mean's slack."""
  a, b = np.asarray(a_GxS, np.float64), np.asarray(b_GxS, np.float64)
  m, s = a[:, 0], a[:, 1]
  tol_m = (2 * gamma(n - 1, u) + 2 * u) * np.sqrt(m * m + s * s)
  tol_s = (gamma(n - 1, u) + 4 * u) * s + np.where(s > 0, tol_m ** 2 / (2 * np.maximum(s, 1e-300)), tol_m)
  tol = np.concatenate([tol_m[:, None], tol_s[:, None], np.repeat(tol_m[:, None], a.shape[1] - 2, 1)], axis=1)
  bad = np.abs(a - b) > tol
  assert not bad.any(), f"{err_msg}: {np.argwhere(bad)[0]}: {a[bad][0]} vs {b[bad][0]}, bound {tol[bad][0]}"


def example_grads(loss_i, params, *xs):
  """d(loss_i(params, one row of each x))/d(params) for every row, float32, in float64, stacked on a last axis:
  the terms whose sum is the gradient of a loss summed over rows. One reverse pass per row, in sequence (as
  token_grads, for the same reason)."""
  jac = jax.jit(lambda p, *xs: jax.lax.map(lambda r: jax.grad(lambda p: loss_i(p, *(a[None] for a in r)))(p), xs))(
      params, *xs)
  return jax.tree.map(lambda j: np.moveaxis(np.asarray(j, np.float64), 0, -1), jac)


def adam_first_interval(p, g_lo, g_hi, lr: float, coupled_wd: float = 0.0, decoupled_wd: float = 0.0,
                        b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
  """[lo, hi] of the parameters after Adam's FIRST step (moments 0, count 1) for any gradient in [g_lo, g_hi]:
  optax's mu_hat / (sqrt(nu_hat) + eps) is then g' / (|g'| + eps), increasing in g', so its interval is its
  values at the ends (g' = g + coupled_wd * p: PyTorch-style L2 added before Adam). New p = p - lr (step +
  decoupled_wd p) (AdamW). Float32 roundings on top: the L2 sum, the moments, their bias corrections, sqrt, the
  division (<= 8u of the step), the update and its addition (u of each); and the bias corrections' 1 - b^c,
  taken with b rounded to float32 (b(1 +- u)): relative error <= u b / (1 - b), halved by the sqrt for b2; for
  b2 = 0.999 that is 1.3e-5 measured, a step of 0.9999936 lr where the exact rule gives 1 - eps / |g|."""
  p, g_lo, g_hi = (np.asarray(a, np.float64) for a in (p, g_lo, g_hi))
  lo, hi = g_lo + coupled_wd * p, g_hi + coupled_wd * p
  pad = 2 * U32 * (np.maximum(np.abs(lo), np.abs(hi)))
  lo, hi = lo - pad, hi + pad
  step_lo, step_hi = lo / (np.abs(lo) + eps), hi / (np.abs(hi) + eps)
  r = U32 * (b1 / (1 - b1) + 0.5 * b2 / (1 - b2) + 8)
  step_lo, step_hi = step_lo - r * np.abs(step_lo), step_hi + r * np.abs(step_hi)
  decay = decoupled_wd * p if p.ndim >= 2 else 0.0
  new_lo, new_hi = p - lr * (step_hi + decay), p - lr * (step_lo + decay)
  slack = 2 * U32 * lr + 2 * U32 * np.maximum(np.abs(new_lo), np.abs(new_hi))
  return new_lo - slack, new_hi + slack


def opt_logit_tol(cfg, length: int, sigmas: float = 6.0) -> float:
  """How far two float32 evaluations of an OPT forward pass (ours vs Hugging Face's) may put a logit apart, as a
  share of the largest |logit|, for the fixtures' O(1)-conditioned models (layer-normed activations, weights drawn
  at 1/sqrt(fan_in): every step passes a relative error on with a factor <= 1).

  Rounding errors are modelled as independent, mean-zero and uniform in +-u (the probabilistic analysis of Higham
  & Mary, SIAM J. Sci. Comput. 2019, which holds for any summation order, so on any CPU): a logit formed through
  n roundings carries a relative error of standard deviation <= sqrt(n / 3) u, and two independent evaluations
  differ by sqrt(2 n / 3) u. n counts the roundings on a logit's path: per layer the layer norms' two sums (2E each),
  q/k/v (3E), a head's scores (D), the softmax's sum and the values' (L each), the output projection (E), fc1 (E),
  fc2 (F) and two residual additions; the final layer norm (2E), project_in/out (P, E) and the tied head (P). The
  largest of a fixture's few thousand logits stays within `sigmas` of them (6: a Gaussian tail of 2e-9 each).
  The two fixtures: 9.0e-6 (pre-LN) and 6.7e-6 (post-LN); measured 2.4e-7 and 2.7e-7; a layer-norm epsilon 10x too
  large moves them by 1.8e-5 and 3.8e-5."""
  e, d, f, p = cfg.hidden_size, cfg.head_dim, cfg.ffn_dim, cfg.word_embed_proj_dim
  n = cfg.num_layers * (2 * 2 * e + 3 * e + d + 2 * length + e + e + f + 2) + p
  n += 2 * e if cfg.do_layer_norm_before else 0
  n += p + e if p != e else 0
  return sigmas * math.sqrt(2 * n / 3) * U32


def restore_carry(wd, step):
  """The loop's carry (models, data buffers) as checkpoint `step` of workdir `wd` holds it, restored as saved."""
  import orbax.checkpoint as ocp
  mgr = ocp.CheckpointManager(os.path.abspath(os.path.join(wd, "checkpoints")))
  try:
    return mgr.restore(step, args=ocp.args.StandardRestore())["carry"]
  finally:
    mgr.close()
