"""Loop-level config (config.parse -> Run): every validated field refused with its name (and its boundary value
accepted, so an off-by-one bound fails too), unknown and missing fields, the variant parser the config files share,
and the sample-count schedules against hand-computed counts."""
import dataclasses

import jax
import ml_collections
import pytest

from collapse_jax import config as config_lib, loop
from collapse_jax.errors import ConfigError
from tests.helpers import load_config


def _with(path: str, value, cfg=None):
  """A base config with one field set to anything, even a value of another type (ml_collections would refuse
  e.g. seed=1.5 on assignment; a config built from a dict, as a JSON-loaded one is, does not)."""
  d = (cfg or config_lib.base_config()).to_dict()
  node = d
  *parents, leaf = path.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value
  return ml_collections.ConfigDict(d)


BAD = [
    ("generations", 0, "must be a positive integer"),
    ("generations", True, "must be a positive integer"),
    ("chains", 0, "must be a positive integer"),
    ("checkpoint_every", 0, "must be a positive integer"),
    ("checkpoint_every", 2.0, "must be a positive integer"),
    ("keep_checkpoints", 1, "must be an integer >= 2"),
    ("keep_checkpoints", 0, "must be an integer >= 2"),
    ("checkpoint_min_seconds", -1, "must be a finite number >= 0"),
    ("checkpoint_min_seconds", float("inf"), "must be a finite number >= 0"),
    ("samples.n", 0, "must be a positive integer"),
    ("num_devices", -1, "must be a non-negative integer"),
    ("chain_batch", -1, "must be a non-negative integer"),
    ("n_real", -1, "must be a non-negative integer"),
    ("regime.subsample", -1, "must be a non-negative integer"),
    ("snapshot_size", -1, "must be a non-negative integer"),
    ("regime.name", "keep_all", "is not one of"),
    ("regime.real_fraction", 1.0001, r"must be in \[0, 1\]"),
    ("regime.real_fraction", -0.0001, r"must be in \[0, 1\]"),
    ("regime.real_fraction", True, r"must be in \[0, 1\]"),
    ("samples.schedule", "cubic", "is not one of"),
    ("quantiles", (), r"must be a non-empty list of numbers in \[0, 1\]"),
    ("quantiles", (0.5, 1.01), r"must be a non-empty list of numbers in \[0, 1\]"),
    ("quantiles", (-0.01, 0.5), r"must be a non-empty list of numbers in \[0, 1\]"),
    ("snapshot_generations", (3, -1), "must be a list of non-negative integers"),
    ("seed", 1.5, "must be an integer"),
    ("seed", True, "must be an integer"),
    ("seed", "3", "must be an integer"),
]


@pytest.mark.parametrize("path,value,msg", BAD, ids=[f"{p}={v!r}" for p, v, _ in BAD])
def test_bad_field_is_refused_by_name(path, value, msg):
  with pytest.raises(ConfigError, match=rf"config\.{path.replace('.', chr(92) + '.')}\b.*{msg}"):
    config_lib.parse(_with(path, value))


@pytest.mark.parametrize("schedule,growth", [("linear", -0.01), ("geometric", 0.99)])
def test_bad_growth_is_refused_by_name(schedule, growth):
  cfg = _with("samples.growth", growth, _with("samples.schedule", schedule))
  with pytest.raises(ConfigError, match=rf"config\.samples\.growth must be >= {int(schedule == 'geometric')}"):
    config_lib.parse(cfg)


GOOD = [  # the boundary values each bound above must still accept
    ("keep_checkpoints", 2), ("generations", 1), ("num_devices", 0), ("chain_batch", 0), ("n_real", 0),
    ("regime.subsample", 0), ("snapshot_size", 0), ("regime.real_fraction", 0.0), ("regime.real_fraction", 1.0),
    ("quantiles", (0.0, 1.0)), ("snapshot_generations", (0,)), ("seed", 0), ("seed", -7),
    ("regime.name", "accumulate_subsample"),
]


@pytest.mark.parametrize("path,value", GOOD, ids=[f"{p}={v!r}" for p, v in GOOD])
def test_boundary_value_is_accepted(path, value):
  run = config_lib.parse(_with(path, value))
  node = run
  for p in path.split("."):
    node = getattr(node, p)
  assert node == value


@pytest.mark.parametrize("schedule,growth", [("linear", 0.0), ("geometric", 1.0)])
def test_boundary_growth_is_accepted(schedule, growth):
  assert config_lib.parse(_with("samples.growth", growth, _with("samples.schedule", schedule))).samples.growth == growth


def test_unknown_and_missing_fields_are_refused_by_name():
  with pytest.raises(ConfigError, match=r"^unknown config field regime\.nmae \(did you mean regime\.name\?\)$"):
    config_lib.parse(_with("regime.nmae", "replace"))
  with pytest.raises(ConfigError, match=r"^unknown config field generatoins \(did you mean generations\?\)$"):
    config_lib.parse(_with("generatoins", 3))
  d = config_lib.base_config().to_dict()
  del d["samples"]["n"]
  with pytest.raises(ConfigError, match=r"^config\.samples\.n is missing"):
    config_lib.parse(ml_collections.ConfigDict(d))


def test_parse_gives_typed_loop_fields_and_leaves_the_family_section_to_the_family():
  cfg = load_config("lm", "ci")
  run = config_lib.parse(cfg)  # cfg.lm is the family's: not refused as unknown here
  assert (run.family, run.generations, run.samples.n, run.regime.name) == ("lm", 3, 28, "replace")
  assert run.quantiles == (0.05, 0.25, 0.5, 0.75, 0.95) and isinstance(run.snapshot_generations, tuple)
  with pytest.raises(dataclasses.FrozenInstanceError):
    run.generations = 4
  cfg.gmm = dict(components=2)  # another family's section is unknown to an LM run
  with pytest.raises(ConfigError, match=r"^unknown config field gmm$"):
    config_lib.parse(cfg)


@pytest.mark.parametrize("arg,flags,values", [
    (None, set(), {}), ("", set(), {}), ("quick", {"quick"}, {}), ("chains=4", set(), {"chains": "4"}),
    ("chains=4,quick", {"quick"}, {"chains": "4"}), (" quick , ,chains=", {"quick"}, {"chains": ""}),
])
def test_variants_parses_flags_and_values(arg, flags, values):
  assert config_lib.variants(arg, ("quick", "chains=N")) == (flags, values)


@pytest.mark.parametrize("arg,msg", [
    ("quik", r"^unknown config variant 'quik' \(known: quick, chains=N\)$"),
    ("quick=1", r"^config variant 'quick=1' is not of the form quick$"),
    ("chains", r"^config variant 'chains' is not of the form chains=N$"),
])
def test_variants_refuses_anything_else_in_one_line(arg, msg):
  with pytest.raises(ConfigError, match=msg):
    config_lib.variants(arg, ("quick", "chains=N"))


def test_num_devices_beyond_the_visible_ones_is_a_config_error():
  n = len(jax.devices())
  with pytest.raises(ConfigError, match=rf"config\.num_devices={n + 1} but only {n} devices"):
    loop.Experiment(load_config("gaussian", "100", num_devices=n + 1))
  assert loop.Experiment(load_config("gaussian", "100", num_devices=n)).mesh.devices.size == n  # no compile


@pytest.mark.parametrize("schedule,growth,want", [
    ("fixed", 3.0, [10, 10, 10, 10, 10]),          # growth is ignored by the fixed schedule
    ("linear", 0.0, [10, 10, 10, 10, 10]),
    ("linear", 2.4, [10, 12, 15, 17, 20]),         # 10 + 2.4 g = 10, 12.4, 14.8, 17.2, 19.6, rounded
    ("geometric", 1.0, [10, 10, 10, 10, 10]),
    ("geometric", 1.3, [10, 13, 17, 22, 29]),      # 10 * 1.3^g = 10, 13, 16.9, 21.97, 28.561
    ("geometric", 2.0, [10, 20, 40, 80, 160]),
])
def test_sample_counts_by_hand(schedule, growth, want):
  cfg = config_lib.base_config()
  cfg.samples.n, cfg.samples.schedule, cfg.samples.growth, cfg.generations = 10, schedule, growth, 5
  assert config_lib.parse(cfg).sample_counts() == want
