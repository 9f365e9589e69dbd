"""The VAE's fit checked step by step (tests/test_vae_fit.py): each step the fit takes is recorded and checked from
the very state it started in, against a float64 reference gradient with a float32 summation bound and Adam's
update rule with its roundings (the invariants that hold on any CPU, instead of a whole trajectory)."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from collapse_jax.families.vae import model as vae_model
from tests import helpers
from tests.helpers import U32


def sigmoid(a):
  return 1.0 / (1.0 + np.exp(-np.asarray(a, np.float64)))


@functools.cache
def hand_loss_grad(graphdef, beta):
  """Value and gradient of the loss summed over the rows given (cached: each batch size compiles once)."""
  def loss(params, x_BxHxWxC, eps_BxL):
    bce_B, kl_B = vae_model.per_example_loss(nnx.merge(graphdef, params), x_BxHxWxC, eps_BxL)
    return jnp.sum(bce_B) + beta * jnp.sum(kl_B)

  return jax.jit(jax.value_and_grad(loss))


def record_steps(fam):
  """Wrap fam.tx (before fit is traced) so that each step taken hands (grads, params, opt state before and
  after, updates) to the host: fit's trajectory, to check every step from the very state it started from."""
  steps, tx = [], fam.tx

  def update(grads, state, params):
    updates, new = tx.update(grads, state, params)
    jax.debug.callback(lambda *a: steps.append(jax.tree.map(np.array, a)), grads, params, state, new, updates)
    return updates, new

  fam.tx = optax.GradientTransformation(tx.init, update)
  return steps


def adam_state(state):
  return next(s for s in jax.tree.leaves(state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
              if isinstance(s, optax.ScaleByAdamState))


def inside_tol(name, got, want, tol):
  bad = ~(np.abs(np.asarray(got, np.float64) - want) <= tol)
  assert not bad.any(), (f"{name}: {bad.sum()} of {bad.size} off, first at {np.argwhere(bad)[0]}: "
                         f"{np.asarray(got)[bad][0]} vs {want[bad][0]} +- {np.broadcast_to(tol, bad.shape)[bad][0]}")


def grad_bound(loss_grad, params, x_b, eps_b):
  """The loss and its gradient (leaves, float64) at `params` on the batch, and a per-coordinate bound tau on how
  far another float32 order of the same sums may put the gradient.

  The per-example gradients J_n are the terms the gradient sums. Summed in any order, the sum's error is
  <= gamma_n sum_n |J_n| (Higham, Accuracy and Stability, 4.3), so two orders differ by <= 2 gamma_B sum_n |J_n|.
  Each J_n is a float32 backprop whose own sums (the widest: fc_mu's 6272 features) cancel below what a
  coordinate shows, so those add 2 gamma_6272 times the layer's largest sum_n |J_n| (as tests/test_sharding.py
  bounds them). Measured here: the compiled gradients sit within 4e-4 tau of this one."""
  value, want = loss_grad(params, x_b, eps_b)
  per_example = [loss_grad(params, x_b[i:i + 1], eps_b[i:i + 1])[1] for i in range(len(x_b))]
  jac = jax.tree.map(lambda *js: np.stack([np.asarray(j, np.float64) for j in js], -1), *per_example)
  taus = jax.tree.leaves(helpers.grad_bound(jac, k=6272))
  return float(value), [np.asarray(w, np.float64) for w in jax.tree.leaves(want)], taus


def batch(c, fam, x_N, valid_N, k_train, e, s, g, prev_params):
  """Step s of epoch e as the config draws it: keys k_train -> epochs -> fold_in(s) -> k_data, k_loss; the epoch's
  valid rows in the order of their uniform keys (or decoded from generation g-1's model at g >= 1)."""
  B, L = c.batch_size, vae_model.LATENT
  k_perm, k_steps = jax.random.split(jax.random.split(k_train, c.epochs)[e])
  order = [i for i in np.argsort(np.asarray(jax.random.uniform(k_perm, (len(x_N),)))) if valid_N[i]]
  k_data, k_loss = jax.random.split(jax.random.fold_in(k_steps, s))
  rows = order[s * B:(s + 1) * B]
  eps_b = jax.random.normal(k_loss, (B, L))[:len(rows)]
  if g == 0:
    return x_N[rows], eps_b
  decoder = nnx.merge(fam.graphdef, prev_params)
  return sigmoid(decoder.decode_logits(jax.random.normal(k_data, (B, L))))[:len(rows)].astype(np.float32), eps_b


def check_fit_steps(c, fam, steps, got, x_N, valid_N, key, prev_params, g):
  """fit's recorded steps against the config, each from the state it started from (nothing after Adam is
  reproducible across float32 orders: Adam's early steps are ~lr * sign(gradient), so a gradient that is rounding
  noise moves its weight by +-lr either way, and the trajectories part). Step t of epoch e, step s must use the
  keys k_init, k_train -> epochs -> fold_in(s) -> k_data, k_loss, the epoch's valid rows in the order of their
  uniform keys, ceil(n_valid / batch) steps, the loss summed over only the valid rows; then
  1. its gradient is the loss's gradient at its parameters, within a float32 summation bound;
  2. its Adam state and update are PyTorch's Adam with coupled L2 applied to that gradient, within the
     roundings of the rule; the next step starts from params + updates, and fit returns the last.
  Returns the loss per image over the last epoch, evaluated at the recorded parameters."""
  B, n_valid = c.batch_size, int(valid_N.sum())
  S = math.ceil(n_valid / B)
  k_init, k_train = jax.random.split(key)
  init = jax.tree.map(np.asarray, fam.init_model(k_init, {})["params"])
  steps = sorted(steps, key=lambda st: int(adam_state(st[2]).count))
  assert [int(adam_state(st[2]).count) for st in steps] == list(range(c.epochs * S))
  loss_grad, names = hand_loss_grad(fam.graphdef, c.beta), [jax.tree_util.keystr(p) for p, _ in
                                                     jax.tree_util.tree_leaves_with_path(init)]
  # The rule's constants as optax's float32 arithmetic holds them (1 - b2 = 0.001 is 0.8u off in float32).
  b1, b2, a1, a2, eps, lr, wd = (float(np.float32(z)) for z in (0.9, 0.999, 1 - 0.9, 1 - 0.999, 1e-8, c.lr,
                                                                c.weight_decay))
  prev, epoch_loss = jax.tree.leaves(init), 0.0
  prev_tol = [2 * U32 * np.abs(a) for a in prev]
  for t, (grads, params, state, new, updates) in enumerate(steps):
    e, s = divmod(t, S)
    x_b, eps_b = batch(c, fam, x_N, valid_N, k_train, e, s, g, prev_params)
    p = jax.tree.leaves(params)
    # Step 0 starts from the model of k_init (compiled vs eager init: a scaled uniform, within 2 roundings);
    # step t from step t-1's params + updates (one float32 add, or an FMA with the update's product: 2 roundings).
    for name, a, b, tol in zip(names, p, prev, prev_tol):
      inside_tol(f"params{name} entering step {t}", a, b, tol)
    value, want, taus = grad_bound(loss_grad, params, x_b, eps_b)
    epoch_loss = epoch_loss + value if s else value
    adam, adam_new = adam_state(state), adam_state(new)
    # Bias corrections 1 - b^c: optax's float32 pow is off the exact b^c by up to an ulp or so (jit and eager
    # differ by one at c = 3), allowed 2 ulp, which 1 - b^c magnifies (b2^3 = 0.997: 1 ulp is 2e-5 of 0.003).
    c_new = int(adam.count) + 1
    bc = [1 - b ** c_new for b in (b1, b2)]
    bc_rel = [2 * float(np.spacing(np.float32(b ** c_new))) / z for b, z in zip((b1, b2), bc)]
    for name, pp, gr, w, tau, m, v, m1, v1, u in zip(
        names, p, jax.tree.leaves(grads), want, taus,
        *(jax.tree.leaves(z) for z in (adam.mu, adam.nu, adam_new.mu, adam_new.nu, updates))):
      inside_tol(f"grad{name} at step {t}", gr, w, tau)
      pp, gr, m, v, m1, v1 = (np.asarray(z, np.float64) for z in (pp, gr, m, v, m1, v1))
      # Coupled L2: Adam sees d = g + wd p, itself rounded (<= u |g| + 2u |wd p|, with an FMA or not).
      d, dd = gr + wd * pp, U32 * (np.abs(gr) + 2 * wd * np.abs(pp))
      # Moments: d's error, then <= 3 roundings (2 products, 1 sum) of terms no larger than these.
      inside_tol(f"mu{name} at step {t}", m1, a1 * d + b1 * m, a1 * dd + 3 * U32 * (a1 * np.abs(d) + b1 * np.abs(m)))
      inside_tol(f"nu{name} at step {t}", v1, a2 * d * d + b2 * v,
              a2 * (2 * np.abs(d) * dd + dd * dd) + 3 * U32 * (a2 * d * d + b2 * v))
      # The update from those moments: 2 divisions by the bias corrections, a sqrt, an add, a division, the
      # product by -lr: positive quantities throughout, so within 7 roundings (<= 8u) of the float64 value, and
      # the bias corrections' ulp (all of mu's, half of nu's through the sqrt).
      want_u = -lr * (m1 / bc[0]) / (np.sqrt(v1 / bc[1]) + eps)
      inside_tol(f"update{name} at step {t}", u, want_u, (8 * U32 + bc_rel[0] + bc_rel[1] / 2) * np.abs(want_u))
    prev = [np.asarray(a, np.float64) + u for a, u in zip(p, jax.tree.leaves(updates))]
    prev_tol = [2 * U32 * (np.abs(b) + np.abs(u)) for b, u in zip(prev, jax.tree.leaves(updates))]
  for name, a, b, tol in zip(names, jax.tree.leaves(got["params"]), prev, prev_tol):
    inside_tol(f"returned params{name}", a, b, tol)
  return epoch_loss / n_valid


# g = 0 reads the buffer: 40 valid rows of 64 make two steps per epoch, the second with 8 valid rows of 32.
# g = 1 decodes every batch from the previous model: 8 valid rows make one masked step, the second is skipped.
