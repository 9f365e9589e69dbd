"""Targeted mutants for benchmarks/mutation.py: one module per area, each a list MUTANTS of Mutant entries.

A mutant is a one-line bug a reviewer would plant: `old` must occur exactly once in `file` (repo-relative) and is
replaced by `new`; `tests` are the pytest node ids or files that must fail with it in place. `why` names the
behaviour the bug breaks, so a surviving mutant reads as a missing test.
"""
import dataclasses


@dataclasses.dataclass(frozen=True)
class Mutant:
  name: str
  file: str
  old: str
  new: str
  tests: tuple[str, ...]
  why: str
