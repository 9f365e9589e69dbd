"""Mutants of the config layer: the loop-level fields (collapse_jax/config.py), the field checks every section
shares (collapse_jax/fields.py), the variant parser of configs/*.py, and the command line's one-line errors
(collapse_jax/cli.py); caught by tests/test_config.py, tests/test_fields.py and tests/test_main.py."""
from benchmarks.mutants import Mutant

CFG, FIELDS, CLI = "collapse_jax/config.py", "collapse_jax/fields.py", "collapse_jax/cli.py"
_BAD = "tests/test_config.py::test_bad_field_is_refused_by_name"
_EDGE = "tests/test_config.py::test_boundary_value_is_accepted"
_COUNTS = "tests/test_config.py::test_sample_counts_by_hand"
_F = "tests/test_fields.py"

MUTANTS = [
    # --- config.py: the loop-level fields ---
    Mutant(name="config_linear_growth_ignored", file=CFG,
           old="[int(round(s.n + s.growth * g)) for g in range(G)]", new="[int(round(s.n)) for g in range(G)]",
           tests=(_COUNTS,), why="a linear schedule stays fixed"),
    Mutant(name="config_geometric_exponent_off_by_one", file=CFG,
           old="s.n * s.growth**g", new="s.n * s.growth**(g + 1)",
           tests=(_COUNTS,), why="the geometric schedule starts one step ahead"),
    Mutant(name="config_keep_checkpoints_bound", file=CFG,
           old="keep_checkpoints: int = fields.integer(lo=2,", new="keep_checkpoints: int = fields.integer(lo=1,",
           tests=(_BAD,), why="keep_checkpoints=1 accepted: no checkpoint to fall back to"),
    Mutant(name="config_geometric_growth_bound", file=CFG,
           old='self.schedule == "geometric" and self.growth < 1',
           new='self.schedule == "geometric" and self.growth <= 1',
           tests=("tests/test_config.py::test_boundary_growth_is_accepted",),
           why="growth 1 (a constant schedule) refused"),
    Mutant(name="config_real_fraction_bound", file=CFG,
           old="real_fraction: float = fields.number(0.0, 1.0)",
           new="real_fraction: float = fields.number(0.0, 1.0, lo_open=True)",
           tests=(_EDGE,), why="real_fraction 0 refused"),
    Mutant(name="config_n_real_unchecked", file=CFG,
           old="n_real: int = fields.integer(lo=0)", new="n_real: int = fields.integer()",
           tests=(_BAD,), why="a negative n_real accepted"),
    Mutant(name="config_family_section_not_ignored", file=CFG,
           old="ignore=(family,) if isinstance(family, str) and family else ()", new="ignore=()",
           tests=("tests/test_config.py::test_parse_gives_typed_loop_fields_and_leaves_the_family_section_to_the_family",),
           why="every real config refused: its family's section is an unknown loop-level field"),
    Mutant(name="config_variant_value_form_unchecked", file=CFG,
           old="if bool(eq) != takes_value[key]:", new="if False:",
           tests=("tests/test_config.py::test_variants_refuses_anything_else_in_one_line",),
           why="`gmm:chains` (no count) or `gmm:quick=1` accepted"),
    # --- fields.py: the rules every section shares ---
    Mutant(name="config_quantile_bound", file=FIELDS,
           old="_is_num(q) and lo <= q <= hi", new="_is_num(q) and lo <= q < hi",
           tests=(_EDGE,), why="the maximum (quantile 1) refused"),
    Mutant(name="config_seed_bool_accepted", file=FIELDS,
           old="return isinstance(v, numbers.Integral) and not isinstance(v, bool)",
           new="return isinstance(v, numbers.Integral)",
           tests=(_BAD,), why="seed=True accepted"),
    Mutant(name="config_snapshot_generation_bound", file=FIELDS,
           old="_is_int(i) and (lo is None or i >= lo)", new="_is_int(i) and (lo is None or i >= lo - 1)",
           tests=(_BAD,), why="snapshot generation -1 accepted"),
    Mutant(name="fields_integer_lower_bound", file=FIELDS,
           old="(lo is not None and v < lo) or (hi is not None and v > hi):\n      raise _bad(where, want, v)\n"
               "    return int(v)",
           new="(lo is not None and v <= lo) or (hi is not None and v > hi):\n      raise _bad(where, want, v)\n"
               "    return int(v)",
           tests=(f"{_F}::test_the_boundaries_are_accepted",), why="every integer's lower bound refused"),
    Mutant(name="fields_number_lo_open_ignored", file=FIELDS,
           old="(v <= lo if lo_open else v < lo)", new="(v < lo)",
           tests=(f"{_F}::test_one_past_a_number_bound_is_refused",), why="a rate of 0 accepted where > 0 is needed"),
    Mutant(name="fields_nan_accepted", file=FIELDS,
           old="and not isinstance(v, bool) and math.isfinite(v)", new="and not isinstance(v, bool)",
           tests=(f"{_F}::test_numbers_are_finite_and_not_bools_or_strings",), why="lr=nan accepted"),
    Mutant(name="fields_numpy_int_not_converted", file=FIELDS,
           old="      raise _bad(where, want, v)\n    return int(v)", new="      raise _bad(where, want, v)\n    return v",
           tests=(f"{_F}::test_numpy_integers_are_accepted_as_python_ints",),
           why="a NumPy integer reaches the config as is (config.json cannot write it)"),
    Mutant(name="fields_unknown_key_accepted", file=FIELDS,
           old="    if k not in declared and k not in ignore:", new="    if False:",
           tests=(f"{_F}::test_an_unknown_key_is_refused_with_the_closest_field",),
           why="a misspelt field is silently ignored"),
    # --- cli.py: one line, naming the field ---
    Mutant(name="cli_unknown_override_raw", file=CLI,
           old="    if unknown is not None:\n      return str(unknown)", new="    if False:\n      return str(unknown)",
           tests=("tests/test_main.py::test_unknown_field_is_one_clean_line",),
           why="`--config.lm.epochz=3` prints ml_collections' escaped KeyError instead of the field"),
    Mutant(name="cli_variant_error_traceback", file=CLI,
           old="    if isinstance(e, ConfigError) and \"\\n\" not in str(e):", new="    if False:",
           tests=("tests/test_main.py::test_bad_variant_or_config_file_is_one_line",),
           why="a bad variant is reported through ml_collections' traceback wrapper"),
]
