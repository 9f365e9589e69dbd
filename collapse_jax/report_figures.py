"""The report's figures (report.py), each returned as a matplotlib Figure: one metric with every run overlaid, and
histograms over generations with a panel per run. Made to be read without the code: integer generation ticks,
titles and labels in words, the legend (or a colour bar) beside the axes, never over the curves."""
import math
import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
from matplotlib.cm import ScalarMappable  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from collapse_jax import paths, tables  # noqa: E402

_LINESTYLES = ("-", "--", ":", "-.")
_MAX_CURVES = 10             # histogram curves per panel: generations spread over the run


def _wrap(text: str, width: int) -> str:
  return "\n".join(textwrap.wrap(text, width)) or text


def chain_bands(st: dict) -> tuple[np.ndarray, list[tuple[int, int]]]:
  """A run's curve (the median over its chains where metrics.jsonl has it, else the mean: one chain's value) and
  the symmetric quantile pairs it has, outermost first: [(5, 95), (25, 75)] for the default quantiles."""
  qs = sorted(int(s[1:]) for s in st if s[:1] == "q" and s[1:].isdigit())
  center = st["q50"] if "q50" in st else st.get("mean", np.zeros(0))
  return np.asarray(center, float), [(a, 100 - a) for a in qs if a < 50 and 100 - a in qs]


def _stack(curves: list[np.ndarray]) -> np.ndarray:
  """Curves of different lengths (a run still going) as rows padded with NaN."""
  out = np.full((len(curves), max(len(c) for c in curves)), np.nan)
  for i, c in enumerate(curves):
    out[i, :len(c)] = c
  return out


def metric_figure(curves: list[tuple[str, list[dict]]], title: str, ylabel: str):
  """curves: (label, [one run's {stat: values per generation}, ...]) per entry. One run: its median over chains
  with its quantile bands; several (seeds of one config): the median of their curves, a band from their min to
  max. The legend sits right of the axes."""
  fig, ax = plt.subplots(figsize=(10, 4.6), layout="constrained")
  handles, chain_pairs, seeds, drawn = [], {}, False, []
  for i, (label, runs) in enumerate(curves):
    color, ls = f"C{i % 10}", _LINESTYLES[i // 10 % len(_LINESTYLES)]
    if len(runs) == 1:
      center, pairs = chain_bands(runs[0])
      g = np.arange(len(center))
      # The outer bands lighter: 5-95% at 0.12, 25-75% at 0.28 for the default quantiles.
      for (lo, hi), alpha in zip(pairs, np.linspace(0.12, 0.28, len(pairs)) if len(pairs) > 1 else [0.2]):
        ax.fill_between(g, runs[0][f"q{lo:02d}"], runs[0][f"q{hi:02d}"], color=color, alpha=alpha, lw=0)
        chain_pairs[(lo, hi)] = float(alpha)
        drawn += [runs[0][f"q{lo:02d}"], runs[0][f"q{hi:02d}"]]
    else:
      seeds = True
      per_seed = _stack([chain_bands(st)[0] for st in runs])
      center = np.nanmedian(per_seed, axis=0) if per_seed.size else np.zeros(0)
      g = np.arange(len(center))
      if per_seed.size:
        lo, hi = np.nanmin(per_seed, axis=0), np.nanmax(per_seed, axis=0)
        ax.fill_between(g, lo, hi, facecolor=color, edgecolor=color, alpha=0.2, hatch="///", lw=0)
        drawn += [lo, hi]
      label = f"{label}: median of {len(runs)} seeds"
    drawn.append(center)
    if not len(center):
      label += " (no generations yet)"
    (line,) = ax.plot(g, center, color=color, ls=ls, lw=1.7, marker="o" if len(g) <= 12 else None, ms=3.5,
                      label=_wrap(label, 46))
    handles.append(line)
  if chain_pairs:
    handles.append(Line2D([], [], color="grey", lw=1.7, label="line: median over a run's chains"))
    handles += [Patch(facecolor="grey", alpha=alpha * 1.5, lw=0, label=f"{lo}-{hi}% of a run's chains")
                for (lo, hi), alpha in sorted(chain_pairs.items())]
  if seeds:
    handles.append(Patch(facecolor="none", edgecolor="grey", hatch="///", lw=0, label="min-max over seeds"))
  ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8,
            frameon=False)
  ax.set_title(_wrap(title, 80))
  ax.set_xlabel("generation")
  ax.set_ylabel(_wrap(ylabel, 40))
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  values = np.concatenate([np.ravel(v) for v in drawn]) if drawn else np.zeros(0)
  values = values[np.isfinite(values)]
  # Values spanning decades (perplexities, a variance collapsing to 0) read better on a log axis.
  if values.size and values.min() > 0 and values.max() / values.min() > 100:
    ax.set_yscale("log")
  ax.grid(alpha=0.3)
  return fig


def histogram_figure(panels: list[tuple[str, np.ndarray, np.ndarray]], title: str, xlabel: str, ylabel: str):
  """panels: (label, density_GxH, edges_{H+1}) per run, edges in log units (drawn as exp on a log axis); one panel
  per run on shared axes, a curve per generation (at most 10, spread over the run), coloured by generation."""
  n = len(panels)
  cols = min(3, n)
  rows = math.ceil(n / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.3 * cols + 1.4, 3.3 * rows + 0.8), sharex=True, sharey=True,
                           squeeze=False, layout="constrained")
  axes = list(axes.flat)
  g_max = max(len(h) for _, h, _ in panels)
  norm = Normalize(0, max(g_max - 1, 1))
  cmap = plt.get_cmap("viridis")
  used = np.zeros(max(len(e) - 1 for _, _, e in panels), bool)
  for i, (ax, (label, h_GxH, edges)) in enumerate(zip(axes, panels)):
    centers = 0.5 * (edges[1:] + edges[:-1])
    for g in tables.spread(len(h_GxH), _MAX_CURVES):
      ax.plot(np.exp(centers), h_GxH[g], color=cmap(norm(g)), lw=1.3)
    used[:h_GxH.shape[1]] |= (h_GxH > 0).any(axis=0)
    ax.set_xscale("log")
    ax.set_title(_wrap(label, 44), fontsize=9)
    ax.grid(alpha=0.3)
    # With a panel short of a full last row, the one above it is its column's lowest: it shows the x axis.
    if i + cols >= n:
      ax.xaxis.set_tick_params(labelbottom=True)
      ax.set_xlabel(_wrap(xlabel, 40), fontsize=9)
    if i % cols == 0:
      ax.set_ylabel(_wrap(ylabel, 30), fontsize=9)
  for ax in axes[n:]:
    fig.delaxes(ax)
  if used.any():  # only the bins some generation reaches: the rest of [0, hi] is empty
    edges = max((e for _, _, e in panels), key=len)
    lo, hi = np.flatnonzero(used)[[0, -1]]
    axes[0].set_xlim(math.exp(edges[lo]), math.exp(edges[hi + 1]))
  fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=axes[:n], shrink=0.9, ticks=MaxNLocator(integer=True),
               label="generation (0: trained on real data)")
  fig.suptitle(_wrap(title, 30 * cols + 20))
  return fig


def save(fig, path: str) -> str:
  paths.savefig(fig, path, dpi=110)
  plt.close(fig)
  return path
