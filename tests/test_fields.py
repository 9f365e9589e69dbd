"""fields.py, the one layer of field checks, on sections declared here: each rule's boundary accepted and the value
one past it refused by name, the types it takes (NumPy scalars converted, bools never numbers, numbers always
finite), unknown and missing keys, nested section paths and a cross-field rule. Every message is one line."""
import dataclasses
import math

import ml_collections
import numpy as np
import pytest

from collapse_jax import fields
from collapse_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Ints:
  any: int = fields.integer()
  pos: int = fields.integer(lo=1)
  nonneg: int = fields.integer(lo=0)
  two: int = fields.integer(lo=2, why="one to fall back to")
  small: int = fields.integer(lo=1, hi=5)


@dataclasses.dataclass(frozen=True)
class Nums:
  any: float = fields.number()
  nonneg: float = fields.number(lo=0.0)
  pos: float = fields.number(lo=0.0, lo_open=True)
  unit: float = fields.number(0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class Misc:
  kind: str = fields.choice(("a", "b"))
  flag: bool = fields.boolean()
  name: str = fields.text()
  path: str = fields.text(nonempty=True)
  steps: tuple[int, ...] = fields.integers(lo=0)
  qs: tuple[float, ...] = fields.numbers_in(0.0, 1.0)
  extra: dict = fields.mapping()


INTS = dict(any=-3, pos=1, nonneg=0, two=2, small=5)
NUMS = dict(any=-1.5, nonneg=0.0, pos=1e-12, unit=1.0)
MISC = dict(kind="a", flag=False, name="", path="x", steps=(0, 3), qs=(0.0, 1.0), extra=dict(k=1))


def _parse(cls, base, **change):
  return fields.parse(cls, ml_collections.ConfigDict({**base, **change}), "sec")


def _refused(cls, base, match, **change):
  with pytest.raises(ConfigError, match=match) as e:
    _parse(cls, base, **change)
  assert "\n" not in str(e.value), str(e.value)


def test_the_boundaries_are_accepted():
  assert _parse(Ints, INTS) == Ints(**INTS)
  assert _parse(Nums, NUMS) == Nums(**NUMS)
  assert _parse(Nums, NUMS, unit=0.0).unit == 0.0  # [0, 1]: both ends
  assert _parse(Ints, INTS, small=1).small == 1
  assert _parse(Misc, MISC) == Misc(**{**MISC, "steps": (0, 3), "qs": (0.0, 1.0), "extra": {"k": 1}})


@pytest.mark.parametrize("field,value,want", [
    ("pos", 0, "a positive integer"),
    ("nonneg", -1, "a non-negative integer"),
    ("two", 1, r"an integer >= 2 \(one to fall back to\)"),
    ("small", 0, r"an integer in \[1, 5\]"),
    ("small", 6, r"an integer in \[1, 5\]"),
])
def test_one_past_an_integer_bound_is_refused(field, value, want):
  _refused(Ints, INTS, rf"^config\.sec\.{field} must be {want}, got {value}$", **{field: value})


@pytest.mark.parametrize("value", [True, False, 2.0, "3", None, np.float32(2)])
def test_integers_are_integers_not_bools_floats_or_strings(value):
  _refused(Ints, INTS, r"^config\.sec\.any must be an integer, got ", any=value)


@pytest.mark.parametrize("kind", [np.int8, np.int32, np.int64, np.uint16])
def test_numpy_integers_are_accepted_as_python_ints(kind):
  c = _parse(Ints, INTS, any=kind(3), small=kind(5))
  assert c.any == 3 and type(c.any) is int and type(c.small) is int
  c = _parse(Nums, NUMS, any=kind(3))
  assert c.any == 3.0 and type(c.any) is float
  c = _parse(Misc, MISC, steps=[kind(0), kind(7)])
  assert c.steps == (0, 7) and all(type(s) is int for s in c.steps)


def test_numpy_floats_and_python_ints_are_accepted_as_python_floats():
  c = _parse(Nums, NUMS, any=np.float32(0.5), nonneg=3, unit=np.float64(1.0))
  assert (c.any, c.nonneg, c.unit) == (0.5, 3.0, 1.0)
  assert all(type(v) is float for v in (c.any, c.nonneg, c.unit))
  assert all(type(q) is float for q in _parse(Misc, MISC, qs=[np.float32(0.5), 1]).qs)


@pytest.mark.parametrize("field,value,want", [
    ("nonneg", -1e-9, "a finite number >= 0"),
    ("pos", 0.0, "a finite number > 0"),
    ("pos", -1, "a finite number > 0"),
    ("unit", 1.0000001, r"in \[0, 1\]"),
    ("unit", -1e-9, r"in \[0, 1\]"),
])
def test_one_past_a_number_bound_is_refused(field, value, want):
  _refused(Nums, NUMS, rf"^config\.sec\.{field} must be {want}, got ", **{field: value})


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, np.float32("nan"), True, "1.0", None])
def test_numbers_are_finite_and_not_bools_or_strings(value):
  _refused(Nums, NUMS, r"^config\.sec\.any must be a finite number, got ", any=value)
  _refused(Nums, NUMS, r"^config\.sec\.nonneg must be a finite number >= 0, got ", nonneg=value)


@pytest.mark.parametrize("field,value,match", [
    ("kind", "c", r"^config\.sec\.kind='c' is not one of a, b$"),
    ("kind", 1, r"^config\.sec\.kind=1 is not one of a, b$"),
    ("flag", 1, r"^config\.sec\.flag must be True or False, got 1$"),
    ("flag", "True", r"^config\.sec\.flag must be True or False, got 'True'$"),
    ("name", 3, r"^config\.sec\.name must be a string, got 3$"),
    ("path", "", r"^config\.sec\.path must be a non-empty string, got ''$"),
    ("steps", (0, -1), r"^config\.sec\.steps must be a list of non-negative integers, got \(0, -1\)$"),
    ("steps", (0, True), r"^config\.sec\.steps must be a list of non-negative integers, got \(0, True\)$"),
    ("steps", "01", r"^config\.sec\.steps must be a list of non-negative integers, got '01'$"),
    ("steps", 3, r"^config\.sec\.steps must be a list of non-negative integers, got 3$"),
    ("qs", (), r"^config\.sec\.qs must be a non-empty list of numbers in \[0, 1\], got \(\)$"),
    ("qs", (0.5, 1.01), r"must be a non-empty list of numbers in \[0, 1\]"),
    ("qs", (-0.01,), r"must be a non-empty list of numbers in \[0, 1\]"),
    ("qs", (0.5, math.nan), r"must be a non-empty list of numbers in \[0, 1\]"),
    ("extra", 3, r"^config\.sec\.extra must be a mapping of field names to values, got 3$"),
])
def test_the_other_rules_refuse_by_name(field, value, match):
  _refused(Misc, MISC, match, **{field: value})


def test_values_come_back_as_plain_python():
  c = _parse(Misc, MISC, steps=[1, 2], qs=[0.5], extra=ml_collections.ConfigDict(dict(a=dict(b=1))))
  assert c.steps == (1, 2) and c.qs == (0.5,) and c.extra == {"a": {"b": 1}} and type(c.extra) is dict
  assert _parse(Misc, MISC, flag=True).flag is True
  with pytest.raises(dataclasses.FrozenInstanceError):
    c.kind = "b"


def test_an_unknown_key_is_refused_with_the_closest_field():
  _refused(Ints, INTS, r"^unknown config field sec\.smal \(did you mean sec\.small\?\)$", smal=1)
  _refused(Ints, INTS, r"^unknown config field sec\.zzzzzz$", zzzzzz=1)  # nothing close: no suggestion
  c = fields.parse(Ints, ml_collections.ConfigDict({**INTS, "lm": {"x": 1}}), "", ignore=("lm",))
  assert c == Ints(**INTS)  # an ignored key (the family's section, for the loop-level fields) is left alone


def test_a_missing_key_is_refused_by_name():
  base = dict(INTS)
  del base["two"]
  _refused(Ints, base, r"^config\.sec\.two is missing")


@dataclasses.dataclass(frozen=True)
class C:
  c: int = fields.integer(lo=1)


@dataclasses.dataclass(frozen=True)
class B:
  b: C = fields.section(C)


@dataclasses.dataclass(frozen=True)
class A:
  a: B = fields.section(B)


def test_nested_sections_name_the_whole_path():
  cfg = ml_collections.ConfigDict(dict(a=dict(b=dict(c=0))))
  with pytest.raises(ConfigError, match=r"^config\.a\.b\.c must be a positive integer, got 0$"):
    fields.parse(A, cfg, "")
  cfg.a.b.c = 2
  assert fields.parse(A, cfg, "") == A(B(C(2)))
  with pytest.raises(ConfigError, match=r"^unknown config field a\.b\.cc \(did you mean a\.b\.c\?\)$"):
    fields.parse(A, ml_collections.ConfigDict(dict(a=dict(b=dict(c=1, cc=1)))), "")
  with pytest.raises(ConfigError, match=r"^config\.a\.b must be a config section, got 3$"):
    fields.parse(A, ml_collections.ConfigDict(dict(a=dict(b=3))), "")
  with pytest.raises(ConfigError, match=r"^config\.outer\.a\.b\.c is missing"):
    fields.parse(A, ml_collections.ConfigDict(dict(a=dict(b=dict()))), "outer")


@dataclasses.dataclass(frozen=True)
class Window:
  lo: int = fields.integer()
  hi: int = fields.integer()

  def __post_init__(self):
    if self.hi < self.lo:
      raise fields.bad("win.hi", f">= config.win.lo ({self.lo})", self.hi)


def test_a_cross_field_rule_names_its_field():
  assert fields.parse(Window, dict(lo=3, hi=3), "win") == Window(3, 3)
  with pytest.raises(ConfigError, match=r"^config\.win\.hi must be >= config\.win\.lo \(3\), got 2$"):
    fields.parse(Window, dict(lo=3, hi=2), "win")
  # The cross rule sees typed values: a bad type is refused by the field's own rule first.
  with pytest.raises(ConfigError, match=r"^config\.win\.hi must be an integer, got 'x'$"):
    fields.parse(Window, dict(lo=3, hi="x"), "win")


def test_leaves_and_unknown_field_are_the_cli_s_message_too():
  cfg = ml_collections.ConfigDict(dict(seed=0, lm=dict(epochs=5, decode=dict(num_beams=2))))
  assert sorted(fields.leaves(cfg)) == ["lm", "lm.decode", "lm.decode.num_beams", "lm.epochs", "seed"]
  assert str(fields.unknown_field("lm.epochz", fields.leaves(cfg))) == (
      "unknown config field lm.epochz (did you mean lm.epochs?)")
  assert str(fields.unknown_field("lm.decode.num_beamz", fields.leaves(cfg))) == (
      "unknown config field lm.decode.num_beamz (did you mean lm.decode.num_beams?)")
