"""Regimes build the training set each generation: checked against hand-built expectations on tagged data."""
import jax
import jax.numpy as jnp
import numpy as np

from collapse_jax import config as config_lib, regimes


def _cfg(name, n=6, frac=0.5, subsample=0, generations=4, schedule="fixed", growth=0.0):
  c = config_lib.base_config()
  c.regime.name, c.regime.real_fraction, c.regime.subsample = name, frac, subsample
  c.samples.n, c.samples.schedule, c.samples.growth, c.generations = n, schedule, growth, generations
  return c


def _setup(cfg, n_real):
  counts = config_lib.sample_counts(cfg)
  counts[0] = n_real
  spec = regimes.make_spec(cfg, n_real, counts)
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
  assert config_lib.sample_counts(cfg) == [10, 15, 20, 25]
  cfg = _cfg("replace", n=10, schedule="geometric", growth=2, generations=4)
  counts = config_lib.sample_counts(cfg)
  assert counts == [10, 20, 40, 80]
  spec, counts, data = _setup(cfg, n_real=10)
  assert spec.m_max == 80 and spec.train_size == 80
  data = regimes.update(spec, data, _samples(0, spec.m_max), counts[1])
  x, w = regimes.training_set(spec, data, 1, jax.random.PRNGKey(0), counts[1])
  assert _valid(x, w) == [100.0 + j for j in range(20)]
