"""Regimes build the training set each generation: checked against hand-built expectations on tagged data."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from collapse_jax import config as config_lib, family, regimes


def _cfg(name, n=6, frac=0.5, subsample=0, generations=4, schedule="fixed", growth=0.0):
  c = config_lib.base_config()
  c.regime.name, c.regime.real_fraction, c.regime.subsample = name, frac, subsample
  c.samples.n, c.samples.schedule, c.samples.growth, c.generations = n, schedule, growth, generations
  return c


def _setup(cfg, n_real):
  run = config_lib.parse(cfg)
  counts = run.sample_counts()
  counts[0] = n_real
  spec = regimes.make_spec(run, n_real, counts)
  # Real data are tagged 1000+i, generation g's samples 100*(g+1)+j: the source of every row is readable.
  real = (1000 + jnp.arange(n_real, dtype=jnp.float32))[:, None]
  return spec, counts, regimes.init(spec, real)


def _samples(g, m):
  return (100.0 * (g + 1) + jnp.arange(m, dtype=jnp.float32))[:, None]


def _valid(x, w):
  return sorted(np.asarray(x)[np.asarray(w) > 0, 0].tolist())


def test_replace_uses_real_then_only_last_samples():
  cfg = _cfg("replace")
  spec, counts, data = _setup(cfg, n_real=6)
  key = jax.random.PRNGKey(0)
  x, w = regimes.training_set(spec, data, 0, key, counts[0])
  assert _valid(x, w) == [1000.0 + i for i in range(6)]
  for g in range(3):
    data = regimes.update(spec, data, _samples(g, spec.m_max), counts[g + 1])
    x, w = regimes.training_set(spec, data, g + 1, key, counts[g + 1])
    assert _valid(x, w) == [100.0 * (g + 1) + j for j in range(6)]


def test_real_fraction_mixes_a_fresh_real_subset_with_last_samples():
  cfg = _cfg("real_fraction", n=10, frac=0.3)
  spec, counts, data = _setup(cfg, n_real=20)
  data = regimes.update(spec, data, _samples(0, spec.m_max), counts[1])
  subsets = []
  for seed in range(2):
    x, w = regimes.training_set(spec, data, 1, jax.random.PRNGKey(seed), counts[1])
    vals = _valid(x, w)
    real = [v for v in vals if v >= 1000]
    assert len(vals) == 10 and len(real) == 3 and len(set(real)) == 3  # without replacement
    assert [v for v in vals if v < 1000] == [100.0 + j for j in range(7)]
    subsets.append(real)
  assert subsets[0] != subsets[1]  # a new random subset for a new key
  x, w = regimes.training_set(spec, data, 0, jax.random.PRNGKey(0), counts[0])
  assert _valid(x, w) == [1000.0 + i for i in range(20)]  # generation 0 is all real


def test_accumulate_keeps_everything_in_order():
  cfg = _cfg("accumulate", n=4, generations=4)
  spec, counts, data = _setup(cfg, n_real=5)
  expect = [1000.0 + i for i in range(5)]
  for g in range(3):
    x, w = regimes.training_set(spec, data, g, jax.random.PRNGKey(g), counts[g])
    assert _valid(x, w) == sorted(expect)
    data = regimes.update(spec, data, _samples(g, spec.m_max), counts[g + 1])
    expect += [100.0 * (g + 1) + j for j in range(4)]
  assert int(data["pool_n"]) == 5 + 3 * 4


def test_accumulate_subsample_draws_without_replacement_from_all_so_far():
  cfg = _cfg("accumulate_subsample", n=4, subsample=6, generations=5)
  spec, counts, data = _setup(cfg, n_real=5)
  x, w = regimes.training_set(spec, data, 0, jax.random.PRNGKey(0), counts[0])
  assert _valid(x, w) == [1000.0 + i for i in range(5)]  # fewer valid than the subsample size: all of them
  pool = [1000.0 + i for i in range(5)]
  for g in range(4):
    data = regimes.update(spec, data, _samples(g, spec.m_max), counts[g + 1])
    pool += [100.0 * (g + 1) + j for j in range(4)]
  draws = [tuple(_valid(*regimes.training_set(spec, data, 4, jax.random.PRNGKey(s), counts[4]))) for s in range(50)]
  for d in draws:
    assert len(d) == 6 and len(set(d)) == 6 and set(d) <= set(pool)
  # Every entry of the pool is reachable (uniform over all generations, not just the newest).
  assert set().union(*draws) == set(pool)


def test_growing_schedules_size_the_buffers():
  cfg = _cfg("replace", n=10, schedule="linear", growth=5, generations=4)
  assert config_lib.parse(cfg).sample_counts() == [10, 15, 20, 25]
  cfg = _cfg("replace", n=10, schedule="geometric", growth=2, generations=4)
  counts = config_lib.parse(cfg).sample_counts()
  assert counts == [10, 20, 40, 80]
  spec, counts, data = _setup(cfg, n_real=10)
  assert spec.m_max == 80 and spec.train_size == 80
  data = regimes.update(spec, data, _samples(0, spec.m_max), counts[1])
  x, w = regimes.training_set(spec, data, 1, jax.random.PRNGKey(0), counts[1])
  assert _valid(x, w) == [100.0 + j for j in range(20)]


def test_real_fraction_takes_round_f_m_distinct_real_rows_on_a_growing_schedule():
  # M_g = 35 + 20g: f * M_g = 16.5, 22.5, 28.4999... (0.3 * 95 in float64): Python's round gives 16, 22, 28.
  # float32 on device made the last one 28.500001 -> 29 (the bug this pins).
  cfg = _cfg("real_fraction", n=35, frac=0.3, schedule="linear", growth=20, generations=4)
  spec, counts, data = _setup(cfg, n_real=40)
  assert counts[1:] == [55, 75, 95]
  for g, k in [(1, 16), (2, 22), (3, 28)]:
    data = regimes.update(spec, data, _samples(g - 1, spec.m_max), counts[g])
    # M_g as the loop hands it over: an int32 on device (a Python int would be multiplied in float64).
    x, w = regimes.training_set(spec, data, g, jax.random.PRNGKey(g), jnp.int32(counts[g]))
    vals = _valid(x, w)
    real = [v for v in vals if v >= 1000]
    assert len(vals) == counts[g] and len(real) == k and len(set(real)) == k
    assert [v for v in vals if v < 1000] == [100.0 * g + j for j in range(counts[g] - k)]


def test_accumulate_on_a_geometric_schedule_keeps_exactly_the_valid_samples():
  # M_g = 3 * 2^g; each update writes m_max = 24 rows but only the first M_{g+1} are valid.
  cfg = _cfg("accumulate", n=3, schedule="geometric", growth=2, generations=4)
  spec, counts, data = _setup(cfg, n_real=5)
  assert counts == [5, 6, 12, 24] and spec.m_max == 24
  expect = [1000.0 + i for i in range(5)]
  for g in range(4):
    x, w = regimes.training_set(spec, data, g, jax.random.PRNGKey(g), counts[g])
    assert _valid(x, w) == sorted(expect)
    if g < 3:
      data = regimes.update(spec, data, _samples(g, spec.m_max), counts[g + 1])
      expect += [100.0 * (g + 1) + j for j in range(counts[g + 1])]
  assert regimes.train_sizes(spec, counts) == [5, 11, 23, 47]


def test_train_sizes_by_hand():
  # M_g = 10 + 5g, R = 7: replace-like regimes train on R then M_g; accumulate on R + M_1 + ... + M_g.
  for name, sizes in [("replace", [7, 15, 20, 25]), ("real_fraction", [7, 15, 20, 25]),
                      ("accumulate", [7, 22, 42, 67]), ("accumulate_subsample", [7, 12, 12, 12])]:
    cfg = _cfg(name, n=10, schedule="linear", growth=5, subsample=12, generations=4)
    spec, counts, _ = _setup(cfg, n_real=7)
    assert regimes.train_sizes(spec, counts) == sizes, name


def test_subsample_larger_than_the_pool_takes_all_of_it():
  cfg = _cfg("accumulate_subsample", n=4, subsample=1000, generations=3)
  spec, counts, data = _setup(cfg, n_real=5)
  pool = [1000.0 + i for i in range(5)]
  for g in range(2):
    data = regimes.update(spec, data, _samples(g, spec.m_max), counts[g + 1])
    pool += [100.0 * (g + 1) + j for j in range(4)]
  x, w = regimes.training_set(spec, data, 2, jax.random.PRNGKey(0), counts[2])
  assert _valid(x, w) == sorted(pool)


def test_accumulate_subsample_inclusion_is_uniform_over_valid_entries():
  """K = 4000 independent draws of S = 10 from a pool whose first P = 40 rows are valid, followed by stale rows
  (samples past M_{g+1}) and never-written zeros. Exact: no invalid row, no repeat within a draw. Statistical: the
  inclusion counts C_i have mean K S/P and, for a uniform draw without replacement, covariance
  K p (1-p) P/(P-1) (I - 11^T/P), so sum (C_i - Kp)^2 / (K p (1-p) P/(P-1)) is chi2(P-1). Refused at
  p-value < 1e-3 (a correct sampler fails for 1 seed in 1000). Power (scipy ncx2): if the newest 20 entries were
  drawn 1.1x as often as the rest, noncentrality 118 -> detected with probability 0.99999 (1.05x: 0.42)."""
  from scipy import stats
  cfg = _cfg("accumulate_subsample", n=10, subsample=10, schedule="linear", growth=5, generations=4)
  spec, counts, data = _setup(cfg, n_real=5)
  for g in range(2):  # M = 15, 20 of the 25 rows written each time: 5 stale rows follow the valid ones
    data = regimes.update(spec, data, _samples(g, spec.m_max), counts[g + 1])
  P, S, K = 5 + 15 + 20, 10, 4000
  assert int(data["pool_n"]) == P and spec.pool_size > P + 5
  draw = jax.jit(jax.vmap(lambda k: regimes.training_set(spec, data, 2, k, counts[2])))
  x, w = draw(jax.random.split(jax.random.PRNGKey(7), K))
  x, w = np.asarray(x)[..., 0], np.asarray(w)
  assert (w.sum(1) == S).all()
  valid = [1000.0 + i for i in range(5)] + [100.0 + j for j in range(15)] + [200.0 + j for j in range(20)]
  picked = x[w > 0].reshape(K, S)
  assert np.isin(picked, valid).all(), "an invalid pool row was picked"
  assert all(len(set(r)) == S for r in picked), "a row was picked twice in one training set"
  c = np.array([(picked == v).sum() for v in valid])
  p = S / P
  t = ((c - K * p) ** 2).sum() / (K * p * (1 - p) * P / (P - 1))
  assert stats.chi2.sf(t, P - 1) > 1e-3, (t, c)


# --- every regime through the loop: a spy family records exactly which rows each generation's `fit` gets ------
U_GEN = 1000  # tag stride per generation (> any M_g here): sample j of generation h is tagged 1 + 1000 h + j


class _Spy(family.Family):
  """Real row i is tagged -(i+1); `fit` histograms the weighted training rows by tag (bin i for real row i,
  R + 1000 h + j for sample j of generation h, the last bin for never-written zeros), `evaluate` reports it."""
  name, metric_names = "spy", ("n_train",)

  @classmethod
  def parse(cls, run, section):
    return None  # no config section: everything it needs is the loop's

  def __init__(self, run, c, mesh, abstract=False):
    super().__init__(run, c, mesh, abstract)
    self.n_real = run.n_real
    self.bins = run.n_real + U_GEN * run.generations + 1

  def load_data(self):
    return family.Data(self.n_real, {})

  def init_chain(self, key, shared):
    return -(1.0 + jnp.arange(self.n_real, dtype=jnp.float32))[:, None], {}

  def init_model(self, key, shared):
    return {"g": jnp.zeros((), jnp.int32), "hist": jnp.zeros((self.bins,)), "n": jnp.zeros(())}

  def fit(self, gen, key):
    t, w = gen.x[:, 0], gen.w
    b = jnp.where(t < 0, -t - 1, jnp.where(t > 0, self.n_real + t - 1, self.bins - 1)).astype(jnp.int32)
    return {"g": jnp.asarray(gen.g, jnp.int32), "hist": jnp.zeros((self.bins,)).at[b].add(w), "n": w.sum()}

  def sample(self, model, n, key, gen):
    return (1.0 + U_GEN * model["g"] + jnp.arange(n)).astype(jnp.float32)[:, None], {}

  def evaluate(self, model, gen):
    return {"n_train": model["n"], "hist": model["hist"]}


def _gen_key(seed, g):
  """The documented key of chain 0's generation g, derived here independently of loop.py."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), 0), 0), g)


# (regime, schedule, growth, samples.n, n_real, extra, M_1.., by hand)
SPY_CASES = [
    ("replace", "linear", 5.0, 10, 8, {}, [15, 20, 25]),
    ("real_fraction", "geometric", 2.0, 5, 16, {"real_fraction": 0.37}, [10, 20, 40]),  # k: 3.7, 7.4, 14.8
    ("accumulate", "linear", 3.0, 4, 6, {}, [7, 10, 13]),
    ("accumulate_subsample", "geometric", 2.0, 3, 5, {"subsample": 12}, [6, 12, 24, 48]),
]


@pytest.mark.parametrize("name,schedule,growth,n,R,extra,M", SPY_CASES, ids=[c[0] for c in SPY_CASES])
def test_every_regime_through_the_loop_trains_on_exactly_the_right_rows(tmp_path, monkeypatch, name, schedule,
                                                                          growth, n, R, extra, M):
  from collapse_jax import loop, metrics as metrics_lib, registry
  monkeypatch.setattr(registry, "family_class", lambda fam: _Spy)
  G = len(M) + 1
  cfg = config_lib.base_config()
  cfg.family, cfg.generations, cfg.checkpoint_every, cfg.num_devices, cfg.plots, cfg.seed = "spy", G, G, 1, False, 3
  cfg.n_real, cfg.samples.n, cfg.samples.schedule, cfg.samples.growth = R, n, schedule, growth
  cfg.regime.name = name
  for k, v in extra.items():
    cfg.regime[k] = v
  hist = loop.run(cfg, str(tmp_path / "run"))
  rows = metrics_lib.read_jsonl(str(tmp_path / "run" / "metrics.jsonl"))
  M = [R] + M  # M[g]: what generation g trains on (R real rows at generation 0)
  for g in range(G):
    h = hist["arrays"]["hist"][g]
    real, syn, zeros = h[:R], h[R:-1].reshape(G, U_GEN), h[-1]
    if name in ("replace", "real_fraction") and g > 0:
      k = round(extra.get("real_fraction", 0.0) * M[g])
      want_syn = np.zeros((G, U_GEN))
      want_syn[g - 1, :M[g] - k] = 1  # the previous generation's first M_g - k samples
      assert sorted(real) == [0] * (R - k) + [1] * k and zeros == 0, g  # k distinct real rows
      np.testing.assert_array_equal(syn, want_syn, err_msg=f"generation {g}")
      size = M[g]
    else:
      every = np.zeros((G, U_GEN))
      for p in range(g):
        every[p, :M[p + 1]] = 1  # every generation so far, its valid samples only
      size = R + sum(M[1:g + 1])
      if name == "accumulate_subsample":
        size = min(size, extra["subsample"])
        assert h.max() == 1 and (real <= 1).all() and (syn <= every).all() and zeros == 0, g
      else:  # generation 0 of every regime, and accumulate: all real rows and everything so far, once each
        assert (real == 1).all() and zeros == 0, g
        np.testing.assert_array_equal(syn, every, err_msg=f"generation {g}")
    assert h.sum() == size and rows[g]["train_samples"] == size, g
    assert hist["metrics"]["n_train"][g, 0] == size, g
  if name in ("real_fraction", "accumulate_subsample"):
    # The random rows come from the documented mixing key fold_in(generation key, 0): the same regime code
    # fed that key and the data state rebuilt by hand picks the same rows as the loop did.
    run = config_lib.parse(cfg)
    counts, spy = [R] + M[1:], _Spy(run, None, None)
    spec = regimes.make_spec(run, R, counts)
    for g in range(1, G):
      data = regimes.init(spec, spy.init_chain(None, None)[0])
      for p in (range(g) if name == "accumulate_subsample" else [g - 1]):
        data = regimes.update(spec, data, spy.sample({"g": p}, spec.m_max, None, None)[0], counts[p + 1])
      x, w = regimes.training_set(spec, data, g, jax.random.fold_in(_gen_key(3, g), 0), counts[g])
      gen = family.Generation(g, x, w, None, None, {}, {})
      np.testing.assert_array_equal(spy.fit(gen, None)["hist"], hist["arrays"]["hist"][g], err_msg=f"generation {g}")
