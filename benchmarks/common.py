"""Shared benchmark plumbing: timing with a compile stage apart, and a table plus JSON lines as output."""
import json
import platform
import time

import jax


def device_line() -> str:
  d = jax.devices()[0]
  return f"{d.platform}:{getattr(d, 'device_kind', '?')} x{len(jax.devices())}, jax {jax.__version__}, " \
         f"python {platform.python_version()}"


def timed(fn, *args, repeats: int = 1):
  """Best wall time of fn(*args) over `repeats`; fn must block (block_until_ready) before returning."""
  best, out = float("inf"), None
  for _ in range(repeats):
    t = time.perf_counter()
    out = fn(*args)
    best = min(best, time.perf_counter() - t)
  return best, out


def report(title: str, rows: list[dict], columns: list[str]) -> None:
  print(f"\n{title}\n{device_line()}")
  widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
  print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
  for r in rows:
    print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))
  for r in rows:
    print("JSON " + json.dumps(dict(r, benchmark=title, device=device_line())))


def _fmt(v) -> str:
  if v is None:
    return "-"
  if isinstance(v, float):
    return f"{v:.4g}"
  return str(v)
