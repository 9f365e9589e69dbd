"""A synthetic language with a known distribution: a sparse first-order Markov source with Zipfian unigrams.

It is the LM experiment's offline ground truth. Corpora are drawn on device (`sample_blocks`), and every metric
is exact against the true distribution rather than estimated from a held-out corpus: the true log-likelihood of
generated text, KL(source || model), the true mass of the rare tokens and bigrams a corpus still contains, and the
entropy rate (the best perplexity any model can reach is exp(entropy_rate)).

Token ids. The language has `vocab` tokens; ids 0..specials-1 of the model's vocabulary are kept out of it for
OPT-style specials (<s>=0, <pad>=1, </s>=2, <unk>=3 with the default specials=4), so language token k is model id
k + specials and the model's vocabulary is V_total = vocab + specials. Every function here takes and returns
MODEL ids; ids outside the language (specials, or past V_total in a padded vocabulary) have probability 0 under
the source. Language token k is the k-th most frequent by construction (its target mass is (k+1)^-s / H).

Construction (numpy, float64, deterministic from `seed` via np.random.default_rng(seed); the same on every
platform). Row i of P has exactly `branching` successors: itself, i-1 and i+1 (the rank neighbours; row 0 and
row V-1 have one of them) and the rest drawn without replacement with probability proportional to the target
Zipf masses z (frequent tokens follow anything). Positive Gamma(concentration) weights on that support are then
scaled by Sinkhorn to a flow F = diag(z) P with row AND column sums z, so z is stationary. The scaling exists
because the support holds the diagonal and the rank line i <-> i+1 (strongly connected), i.e. the pattern is
fully indecomposable (Sinkhorn-Knopp / Brualdi 1966); self-loops are the price of that guarantee (they absorb
the flow the head tokens cannot pass on). Where Sinkhorn stops short of its tolerance after 20,000 sweeps (tiny
branching with steep exponents: branching=3, s=1.5 ends with pi up to 35x off the target and a rank-frequency
slope of -0.83) P is still an exact stochastic matrix and `pi_V` is always the exact stationary distribution of
the stored P (a dense solve); only the Zipf shape is lost. branching >= 4 with s <= 1.2 reaches the target to
1e-7 (measured: V=1000/b=4/s=1, V=1000/b=16/s=1, V=2000/b=32/s=1.1).

Blocks start from the stationary distribution, so every position of every block is distributed as pi: the
corpus is a stationary process and per-position averages estimate per-token rates without a burn-in.

Only a first-order source is implemented: an order-2 source is the first-order chain on token pairs, and would
need the V^2-context tables this module avoids.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from collapse_jax.errors import ConfigError

SPECIALS = 4  # OPT's <s>, <pad>, </s>, <unk> occupy model ids 0..3
_FIELD = "config.lm.markov"
_SINKHORN_TOL = 1e-10
_SINKHORN_MAX_ITER = 20000


@struct.dataclass
class Source:
  pi_V: jax.Array  # stationary distribution of P, also the distribution of each block's first token
  P_VxV: jax.Array  # transition matrix over language tokens, dense; exactly `branching` nonzeros per row
  succ_VxB: jax.Array  # int32 successors of each token (ascending)
  logp_VxB: jax.Array  # log P at those successors (for sampling and bigram look-ups)
  offset: int = struct.field(pytree_node=False, default=SPECIALS)

  @property
  def vocab(self):
    return self.P_VxV.shape[0]

  @property
  def vocab_total(self):
    return self.vocab + self.offset


def _check_int(name, value, lo):
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
    raise ConfigError(f"{_FIELD}.{name} must be an integer >= {lo}, got {value!r}")


def _check_positive(name, value):
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
    raise ConfigError(f"{_FIELD}.{name} must be a positive finite number, got {value!r}")


def zipf_target(vocab, zipf_exponent):
  """z_k = (k+1)^-s / sum: the unigram masses the construction aims for, float64."""
  z_V = np.arange(1, vocab + 1, dtype=np.float64) ** -float(zipf_exponent)
  return z_V / z_V.sum()


def _support(rng, z_V, branching):
  """[V, B] distinct successors: self, rank neighbours, then Gumbel-top-k draws proportional to z."""
  v = z_V.shape[0]
  succ_VxB = np.empty((v, branching), np.int64)
  log_z = np.log(z_V)
  for lo in range(0, v, 256):  # row chunks keep the [rows, V] Gumbel table small for large V
    rows = np.arange(lo, min(lo + 256, v))
    g_RxV = log_z + rng.gumbel(size=(rows.size, v))
    for d in (-1, 0, 1):
      cols = rows + d
      ok = (cols >= 0) & (cols < v)
      g_RxV[np.nonzero(ok)[0], cols[ok]] = np.inf
    succ_VxB[rows] = np.argpartition(-g_RxV, branching - 1, axis=1)[:, :branching]
  return np.sort(succ_VxB, axis=1)


def _sinkhorn(k_VxB, succ_VxB, z_V):
  """Row and column scalings r, c with sum_j r_i K_ij c_j = z_i (rows) and = z_j (columns), on the sparse
  support. Returns the row-stochastic P at the support and the last column error (relative)."""
  v = z_V.shape[0]
  c_V = np.ones(v)
  for _ in range(_SINKHORN_MAX_ITER):
    r_V = z_V / np.sum(k_VxB * c_V[succ_VxB], axis=1)
    col_V = np.bincount(succ_VxB.ravel(), (k_VxB * r_V[:, None]).ravel(), v)
    err = np.max(np.abs(col_V * c_V / z_V - 1))
    if err < _SINKHORN_TOL:
      break
    c_V = z_V / col_V
  f_VxB = k_VxB * c_V[succ_VxB]
  return f_VxB / f_VxB.sum(axis=1, keepdims=True), err


def stationary(P_VxV):
  """Exact stationary distribution of an irreducible stochastic matrix: pi (P - I) = 0 with sum(pi) = 1,
  one balance equation replaced by the normalisation (float64 dense solve)."""
  P_VxV = np.asarray(P_VxV, np.float64)
  v = P_VxV.shape[0]
  a_VxV = P_VxV.T - np.eye(v)
  a_VxV[-1] = 1
  rhs_V = np.zeros(v)
  rhs_V[-1] = 1
  pi_V = np.maximum(np.linalg.solve(a_VxV, rhs_V), 0)
  return pi_V / pi_V.sum()


def make_source(vocab, branching, zipf_exponent, seed, concentration=1.0, specials=SPECIALS,
                dtype=jnp.float32):
  """The source (see the module docstring); `vocab` language tokens, `branching` successors per token."""
  _check_int("vocab", vocab, 3)
  _check_int("branching", branching, 3)
  if branching > vocab:
    raise ConfigError(f"{_FIELD}.branching must be <= {_FIELD}.vocab ({vocab}), got {branching}")
  _check_positive("zipf_exponent", zipf_exponent)
  _check_int("seed", seed, 0)
  _check_positive("concentration", concentration)
  _check_int("specials", specials, 0)
  rng = np.random.default_rng(seed)
  z_V = zipf_target(vocab, zipf_exponent)
  succ_VxB = _support(rng, z_V, branching)
  p_VxB, _ = _sinkhorn(rng.gamma(concentration, size=succ_VxB.shape), succ_VxB, z_V)
  P_VxV = np.zeros((vocab, vocab))
  P_VxV[np.arange(vocab)[:, None], succ_VxB] = p_VxB
  return Source(pi_V=jnp.asarray(stationary(P_VxV), dtype), P_VxV=jnp.asarray(P_VxV, dtype),
                succ_VxB=jnp.asarray(succ_VxB, jnp.int32), logp_VxB=jnp.asarray(np.log(p_VxB), dtype),
                offset=int(specials))


# ----------------------------------------------------------------------------------------------------------
# Sampling.


def sample_blocks(source, n_blocks, block_len, key):
  """[n_blocks, block_len] int32 model ids: the first token of each block from pi (so the blocks are
  stationary), then one transition per position in a lax.scan. Jittable with n_blocks, block_len static.

  Every draw is an inverse CDF of one uniform: the first token's over pi, each transition's over the B
  successors of the current token. All uniforms come from one threefry call before the scan; a categorical
  per step puts the random-bit generator inside the loop and costs several seconds of XLA:CPU compilation."""
  for name, value in (("n_blocks", n_blocks), ("block_len", block_len)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ConfigError(f"sample_blocks: {name} must be a positive integer, got {value!r}")
  u_LxN = jax.random.uniform(key, (block_len, n_blocks), source.pi_V.dtype)
  # Rounding can leave the last cumulative sum just under 1: a uniform above it takes the last entry, which
  # has positive probability (every support entry does).
  cum_V = jnp.cumsum(source.pi_V)
  x_N = jnp.minimum(jnp.sum(cum_V[None] <= u_LxN[0, :, None], axis=1), source.vocab - 1).astype(jnp.int32)
  cum_VxB = jnp.cumsum(jnp.exp(source.logp_VxB), axis=1)
  b = source.succ_VxB.shape[1]

  def step(x_N, u_N):
    slot_N = jnp.minimum(jnp.sum(cum_VxB[x_N] <= u_N[:, None], axis=1), b - 1)
    x_N = source.succ_VxB[x_N, slot_N]
    return x_N, x_N

  _, rest_LxN = jax.lax.scan(step, x_N, u_LxN[1:])
  return jnp.concatenate([x_N[:, None], rest_LxN.T], axis=1) + source.offset


# ----------------------------------------------------------------------------------------------------------
# Exact metrics against the truth.


def _language(source, ids):
  """(language ids clipped into range, whether each id is a language token)."""
  x = ids.astype(jnp.int32) - source.offset
  valid = jnp.logical_and(x >= 0, x < source.vocab)
  return jnp.clip(x, 0, source.vocab - 1), valid


def _mask(ids_NxL, mask_NxL):
  return jnp.ones(ids_NxL.shape, bool) if mask_NxL is None else jnp.asarray(mask_NxL, bool)


def token_logprobs(source, ids_NxL):
  """[N, L] true log-probability of each token given its block's prefix: log pi(x_0), then log P(x_t | x_{t-1});
  -inf for a token the source cannot emit there (an id outside the language, or a bigram off the support)."""
  x_NxL, valid_NxL = _language(source, ids_NxL)
  first_N = jnp.log(source.pi_V)[x_NxL[:, 0]]
  trans_NxL1 = jnp.log(source.P_VxV[x_NxL[:, :-1], x_NxL[:, 1:]])
  ok_NxL = jnp.logical_and(valid_NxL, jnp.concatenate([valid_NxL[:, :1], valid_NxL[:, :-1]], axis=1))
  logp_NxL = jnp.concatenate([first_N[:, None], trans_NxL1], axis=1)
  return jnp.where(ok_NxL, logp_NxL, -jnp.inf)


def true_loglik(source, ids_NxL, mask_NxL=None):
  """{'loglik': mean true log-likelihood per token over the tokens the source can emit, 'impossible': the
  fraction of (masked-in) tokens it cannot}. With 'impossible' = 0, 'loglik' is the exact per-token mean
  (1/NL) sum log p(x); generated text with impossible tokens has true likelihood 0, so the two are reported
  apart rather than as a mean of -inf. Positions with mask False (padding) are left out."""
  logp_NxL = token_logprobs(source, ids_NxL)
  m_NxL = _mask(ids_NxL, mask_NxL)
  possible_NxL = jnp.logical_and(m_NxL, jnp.isfinite(logp_NxL))
  n_possible, n = jnp.sum(possible_NxL), jnp.sum(m_NxL)
  total = jnp.sum(jnp.where(possible_NxL, logp_NxL, 0))
  return {"loglik": total / jnp.maximum(n_possible, 1), "impossible": (n - n_possible) / jnp.maximum(n, 1)}


def _kl_rows(p_KxV, logq_KxV):
  """KL(p_k || q_k) per row; terms with p = 0 are 0 (and q may be 0 there)."""
  pos = p_KxV > 0
  log_ratio = jnp.log(jnp.where(pos, p_KxV, 1)) - jnp.where(pos, logq_KxV, 0)
  return jnp.sum(jnp.where(pos, p_KxV * log_ratio, 0), axis=-1)


def _language_columns(source, logq_XxW):
  """The model's log-probs of the language tokens: columns offset..offset+V-1 of its full log-softmax."""
  if logq_XxW.shape[-1] < source.vocab_total:
    raise ConfigError(f"model log-probs have {logq_XxW.shape[-1]} columns; the source needs the model "
                      f"vocabulary, >= vocab + specials = {source.vocab_total}")
  return logq_XxW[..., source.offset:source.vocab_total]


def kl_source_model(source, model_logq_VxW):
  """KL(source || model) per token = sum_i pi_i KL(P_i || Q_i), nats.

  Q_i is the model's next-token distribution after context token i: row i of `model_logq_VxW` is its full
  log-softmax over the model vocabulary (W >= vocab + specials) after a context ending in model id i + offset;
  mass it puts on specials or other non-language ids counts as lost (P is 0 there). For a first-order source
  this is the expected per-step KL of the next-token distribution over the stationary process. To get Q from a
  Transformer LM, score the V two-token sequences [BOS, i + offset] and take the log-softmax at the last
  position, or use `kl_on_text`, which conditions on real contexts."""
  return jnp.sum(source.pi_V * _kl_rows(source.P_VxV, _language_columns(source, model_logq_VxW)))


def kl_on_text(source, ids_NxL, model_logp_NxLxW, mask_NxL=None):
  """Mean over positions t of KL(P[x_t] || model(. | x_<=t)), nats per token.

  `model_logp_NxLxW[n, t]` is the model's log-softmax for the token AFTER position t (the usual LM output on
  the input ids_NxL, before shifting), so the last position is used too. For a first-order source the true
  next-token distribution given the prefix is P[x_t] exactly, so each term is the exact KL at that context;
  on stationary blocks drawn from the source the mean is an unbiased estimate of the model's expected KL over
  its real contexts. Positions whose context token is not a language token, or masked out, are left out."""
  x_NxL, valid_NxL = _language(source, ids_NxL)
  kl_NxL = _kl_rows(source.P_VxV[x_NxL], _language_columns(source, model_logp_NxLxW))
  m_NxL = jnp.logical_and(_mask(ids_NxL, mask_NxL), valid_NxL)
  return jnp.sum(jnp.where(m_NxL, kl_NxL, 0)) / jnp.maximum(jnp.sum(m_NxL), 1)


def tail_coverage(source, ids_NxL, tail_fraction=0.5, mask_NxL=None):
  """True mass of what a corpus still contains, overall and in the tail.

  Tokens: the mass pi(S) of the set S of distinct language tokens in the corpus ('token_mass'); the tail is the
  ceil(tail_fraction * V) tokens of smallest pi, and 'tail_token_mass' = pi(S & tail), 'tail_token_frac' = that
  over pi(tail). Bigrams: the same with the stationary bigram masses pi_i P_ij over the V*B bigrams of the
  support (those observed in truth): the distinct support bigrams present in consecutive masked-in positions,
  and the tail the ceil(tail_fraction * V * B) rarest of them. Impossible tokens and bigrams add nothing. As a
  recursion loses its tails these fall; a corpus drawn from the truth keeps them near their expected values."""
  if isinstance(tail_fraction, bool) or not isinstance(tail_fraction, (int, float)) or not 0 < tail_fraction <= 1:
    raise ConfigError(f"{_FIELD}.tail_fraction must be in (0, 1], got {tail_fraction!r}")
  v, b = source.succ_VxB.shape
  x_NxL, valid_NxL = _language(source, ids_NxL)
  m_NxL = jnp.logical_and(_mask(ids_NxL, mask_NxL), valid_NxL)
  present_V = jnp.zeros(v, bool).at[jnp.where(m_NxL, x_NxL, v)].set(True, mode="drop")
  # A bigram is looked up as the slot of x_t among the successors of x_{t-1}; off-support bigrams match none.
  prev_NxL1, cur_NxL1 = x_NxL[:, :-1], x_NxL[:, 1:]
  hit_NxL1xB = source.succ_VxB[prev_NxL1] == cur_NxL1[..., None]
  ok_NxL1 = jnp.logical_and(jnp.logical_and(m_NxL[:, :-1], m_NxL[:, 1:]), jnp.any(hit_NxL1xB, axis=-1))
  flat_NxL1 = prev_NxL1 * b + jnp.argmax(hit_NxL1xB, axis=-1)
  present_VB = jnp.zeros(v * b, bool).at[jnp.where(ok_NxL1, flat_NxL1, v * b)].set(True, mode="drop")
  bigram_VB = (source.pi_V[:, None] * jnp.exp(source.logp_VxB)).reshape(-1)
  out = {}
  for name, mass_X, present_X in (("token", source.pi_V, present_V), ("bigram", bigram_VB, present_VB)):
    n = mass_X.shape[0]
    tail_X = jnp.zeros(n, bool).at[jnp.argsort(mass_X)[:math.ceil(tail_fraction * n)]].set(True)
    tail_mass = jnp.sum(jnp.where(tail_X, mass_X, 0))
    kept = jnp.sum(jnp.where(jnp.logical_and(tail_X, present_X), mass_X, 0))
    out[f"{name}_mass"] = jnp.sum(jnp.where(present_X, mass_X, 0))
    out[f"tail_{name}_mass"] = kept
    out[f"tail_{name}_frac"] = kept / tail_mass
  return out


def entropy_rate(source):
  """H = -sum_i pi_i sum_j P_ij log P_ij, nats per token: the per-token cross-entropy of the truth on its own
  stationary text, so exp(H) is the best perplexity a model can reach (per transition; a block's first token
  costs the unigram entropy instead)."""
  # With log q = 0, _kl_rows gives sum_j P_ij log P_ij: minus each row's entropy.
  return -jnp.sum(source.pi_V * _kl_rows(source.P_VxV, jnp.zeros_like(source.P_VxV)))
