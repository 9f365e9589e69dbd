"""One layer of field checks: a config section (an ml_collections ConfigDict, as configs/*.py build it and the
command line overrides it) becomes a frozen dataclass, checked once, before anything is computed.

A section's dataclass declares each field with its rule, e.g.

    @dataclasses.dataclass(frozen=True)
    class Config:
      dim: int = fields.integer(lo=1)
      estimator: str = fields.choice(("mle", "unbiased"))

and `fields.parse(Config, cfg.gaussian, "gaussian")` returns `Config(dim=..., estimator=...)` or raises one
ConfigError naming `config.gaussian.dim` and what it must be. Rules that join several fields (a schedule and its
growth) live in the dataclass's `__post_init__` and raise `fields.bad(...)`; rules that need the data or the mesh
live where those are known, and still name the field. Defaults live in configs/*.py, not here: every field of a
section must be present (a config built from a dict that lacks one is refused by name).

Accepted types: integers are Python or NumPy integers (not bools), numbers are integers or floats and always
finite; both come back as Python int / float, so a dataclass holds one type per field.
"""
import dataclasses
import difflib
import math
import numbers
from typing import Any, Callable

from collapse_jax.errors import ConfigError

_CHECK = "collapse_jax.check"
_NO_DEFAULT = dataclasses.MISSING


def bad(path: str, want: str, value) -> ConfigError:
  """The one shape of a field error: `config.PATH must be WANT, got VALUE` (for rules that join fields, raised from
  a section's __post_init__)."""
  return _bad(f"config.{path}", want, value)


def _bad(where: str, want: str, value) -> ConfigError:
  return ConfigError(f"{where} must be {want}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class _Rule:
  parse: Callable[[str, Any], Any]   # (full name, e.g. config.lm.epochs, value) -> the typed value, or raises


def _field(parse, default=_NO_DEFAULT) -> Any:
  """A dataclass field carrying its rule. `default`: for classes that code also builds (decode.DecodeConfig);
  config sections take every value from configs/*.py and have none."""
  return dataclasses.field(default=default, metadata={_CHECK: _Rule(parse)})


def _is_int(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_num(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _int_want(lo, hi) -> str:
  if hi is not None:
    return f"an integer in [{lo}, {hi}]" if lo is not None else f"an integer <= {hi}"
  return {None: "an integer", 0: "a non-negative integer", 1: "a positive integer"}.get(lo, f"an integer >= {lo}")


def _ints_want(lo) -> str:
  return {None: "integers", 0: "non-negative integers", 1: "positive integers"}.get(lo, f"integers >= {lo}")


def integer(lo: int | None = None, hi: int | None = None, why: str = "", default=_NO_DEFAULT) -> Any:
  """An integer in [lo, hi] (either bound optional). `why` is appended to the error (e.g. what 0 means)."""
  want = _int_want(lo, hi) + (f" ({why})" if why else "")

  def parse(where, v):
    if not _is_int(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
      raise _bad(where, want, v)
    return int(v)
  return _field(parse, default)


def _num_want(lo, hi, lo_open, hi_open) -> str:
  if lo is not None and hi is not None:
    return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
  if lo is not None:
    return f"a finite number {'>' if lo_open else '>='} {lo:g}"
  return "a finite number" if hi is None else f"a finite number {'<' if hi_open else '<='} {hi:g}"


def number(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False,
           default=_NO_DEFAULT) -> Any:
  """A finite number in [lo, hi] (an open end with lo_open / hi_open), as a float."""
  want = _num_want(lo, hi, lo_open, hi_open)

  def parse(where, v):
    if (not _is_num(v) or (lo is not None and (v <= lo if lo_open else v < lo))
        or (hi is not None and (v >= hi if hi_open else v > hi))):
      raise _bad(where, want, v)
    return float(v)
  return _field(parse, default)


def choice(options: tuple, default=_NO_DEFAULT) -> Any:
  """One of `options`, equal in value and type (so 1 is not True, and True is not 1)."""
  def parse(where, v):
    if not any(v == o and type(v) is type(o) for o in options):
      raise ConfigError(f"{where}={v!r} is not one of {', '.join(map(str, options))}")
    return v
  return _field(parse, default)


def boolean(default=_NO_DEFAULT) -> Any:
  def parse(where, v):
    if not isinstance(v, bool):
      raise _bad(where, "True or False", v)
    return v
  return _field(parse, default)


def text(nonempty: bool = False, why: str = "", default=_NO_DEFAULT) -> Any:
  """A string (a name, a path, a comma-separated list); paths are checked where they are read, by field."""
  want = ("a non-empty string" if nonempty else "a string") + (f" ({why})" if why else "")

  def parse(where, v):
    if not isinstance(v, str) or (nonempty and not v):
      raise _bad(where, want, v)
    return v
  return _field(parse, default)


def integers(lo: int | None = None) -> Any:
  """A sequence of integers >= lo, as a tuple."""
  def parse(where, v):
    vals = tuple(v) if hasattr(v, "__iter__") and not isinstance(v, (str, bytes)) else None
    if vals is None or not all(_is_int(i) and (lo is None or i >= lo) for i in vals):
      raise _bad(where, f"a list of {_ints_want(lo)}", vals if vals is not None else v)
    return tuple(int(i) for i in vals)
  return _field(parse)


def numbers_in(lo: float, hi: float, nonempty: bool = True) -> Any:
  """A (non-empty) sequence of numbers in [lo, hi], as a tuple of floats."""
  def parse(where, v):
    vals = tuple(v) if hasattr(v, "__iter__") and not isinstance(v, (str, bytes)) else None
    if vals is None or (nonempty and not vals) or not all(_is_num(q) and lo <= q <= hi for q in vals):
      raise _bad(where, f"{'a non-empty list' if nonempty else 'a list'} of numbers in [{lo:g}, {hi:g}]",
                 vals if vals is not None else v)
    return tuple(float(q) for q in vals)
  return _field(parse)


def mapping() -> Any:
  """A free-form {name: value} section (e.g. model-size overrides, checked by their user), as a plain dict."""
  def parse(where, v):
    if not hasattr(v, "items"):
      raise _bad(where, "a mapping of field names to values", v)
    return dict(v.to_dict() if hasattr(v, "to_dict") else v)
  return _field(parse)


def section(cls) -> Any:
  """A nested section: parsed into its own frozen dataclass, its errors naming `config.outer.inner.field`."""
  return _field(lambda where, v: parse(cls, v, where.removeprefix("config.")))


def parse(cls, node, path: str, ignore: tuple[str, ...] = ()):
  """`node` (a ConfigDict or dict) as `cls`, every field checked by its rule; keys of node that cls does not
  declare are refused by name (with the closest declared one), except those in `ignore`."""
  if not hasattr(node, "keys"):
    raise bad(path, "a config section", node)
  declared = {f.name: f for f in dataclasses.fields(cls)}
  for k in node.keys():
    if k not in declared and k not in ignore:
      raise unknown_field(f"{path}.{k}" if path else k, [f"{path}.{d}" if path else d for d in declared])
  values = {}
  for name, f in declared.items():
    where = f"{path}.{name}" if path else name
    if name not in node:
      raise ConfigError(f"config.{where} is missing (start from the experiment's config file)")
    values[name] = f.metadata[_CHECK].parse(f"config.{where}", node[name])
  return cls(**values)


def check(obj, name: str) -> None:
  """The rules of a dataclass instance built in code (decode.DecodeConfig by a library user), errors naming
  `NAME.field`: the same rules and messages as a config section's."""
  for f in dataclasses.fields(obj):
    if _CHECK in f.metadata:
      f.metadata[_CHECK].parse(f"{name}.{f.name}", getattr(obj, f.name))


def unknown_field(path: str, known) -> ConfigError:
  """`unknown config field lm.epochz (did you mean lm.epochs?)`: the one message for a field that does not exist,
  from this layer and from the command line's overrides (cli.py)."""
  close = difflib.get_close_matches(path, list(known), n=1)
  return ConfigError(f"unknown config field {path}" + (f" (did you mean {close[0]}?)" if close else ""))


def leaves(node, prefix: str = "") -> list[str]:
  """Dotted paths of every field of a (nested) ConfigDict or dict: what `unknown_field` suggests from."""
  out = []
  for k in node.keys():
    v, p = node[k], f"{prefix}{k}"
    out += [p] + (leaves(v, p + ".") if hasattr(v, "keys") else [])
  return out
