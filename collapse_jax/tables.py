"""Markdown tables of per-generation metrics, the one way the summary (summary.md) and the report print them."""
import math


def spread(n: int, k: int = 6) -> list[int]:
  """Up to k generations spread over 0..n-1, the first and the last always among them."""
  if n <= k:
    return list(range(n))
  return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def fmt(value) -> str:
  """Four significant figures; integers as integers, NaN and infinities spelled out, none as a dash."""
  if value is None:
    return "-"
  v = float(value)
  if math.isnan(v) or math.isinf(v):
    return str(v)
  if v == int(v) and abs(v) < 1e6:
    return str(int(v))
  return f"{v:.4g}"


def markdown(header: list[str], rows: list[list]) -> str:
  """A Markdown table; cells are formatted by fmt unless already strings, a `|` in a cell escaped (it would end
  the cell)."""
  cells = [[(c if isinstance(c, str) else fmt(c)).replace("|", "\\|") for c in row] for row in rows]
  header = [h.replace("|", "\\|") for h in header]
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(row) + " |" for row in cells]
  return "\n".join(lines) + "\n"
