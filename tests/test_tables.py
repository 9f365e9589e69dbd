"""tables.py: the generations a table shows and how its cells read."""
import re

from collapse_jax import tables


def test_spread_keeps_the_ends_and_at_most_k_distinct_generations():
  for n in (1, 2, 5, 6, 7, 50, 2050):
    gens = tables.spread(n)
    assert gens[0] == 0 and gens[-1] == n - 1 and gens == sorted(set(gens)) and len(gens) == min(n, 6)
  assert tables.spread(2050) == [0, 410, 820, 1229, 1639, 2049]


def test_cells_read_as_numbers_and_a_pipe_does_not_split_a_cell():
  assert [tables.fmt(v) for v in (3.0, 2.345678, float("nan"), float("inf"), None, 1e7)] == [
      "3", "2.346", "nan", "inf", "-", "1e+07"]
  text = tables.markdown(["metric", "gen 0"], [["KL(p || q)", 0.5], ["b", 2]])
  rows = [re.split(r"(?<!\\)\|", line.strip())[1:-1] for line in text.splitlines()]
  assert all(len(r) == 2 for r in rows)
  assert rows[2][0].strip().replace("\\|", "|") == "KL(p || q)" and rows[3][1].strip() == "2"
