"""PNG figures shared by all families: metrics against generation, with bands across chains.

Readable without the code: panels titled in words (Family.titles), related metrics on one panel
(Family.groups), integer generation ticks, the figure's title in its own band above the panels."""
import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from collapse_jax import paths  # noqa: E402


def panels(names, titles: dict, groups) -> list[tuple[str, list[str]]]:
  """(panel title, metrics) in the order of `names`: each group where its first present member comes, every
  other metric alone under its title."""
  out, placed = [], set()
  for m in names:
    if m in placed:
      continue
    group = next(((t, [x for x in ms if x in names]) for t, ms in groups if m in ms), None)
    title, members = group if group else (titles.get(m, m), [m])
    placed.update(members)
    out.append((title, members))
  return out


def generation_axis(ax) -> None:
  ax.set_xlabel("generation")
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.grid(alpha=0.3)


def metric_bands(workdir: str, name: str, by_stat: dict, order, n_chains: int, overlays: dict | None = None,
                 filename: str | None = None, titles: dict | None = None, groups=()) -> str:
  """bands_figure written to workdir/plots/<filename or NAME_metrics.png>; returns its path."""
  fig = bands_figure(name, by_stat, order, n_chains, overlays, titles, groups)
  path = os.path.join(workdir, "plots", filename or f"{name}_metrics.png")
  paths.savefig(fig, path, dpi=110)
  plt.close(fig)
  return path


def bands_figure(name: str, by_stat: dict, order, n_chains: int, overlays: dict | None = None,
                 titles: dict | None = None, groups=()):
  """One panel per metric or group of metrics: the median (one chain: the value), 25-75% and 5-95% bands over
  chains (the paper's style). `overlays` {metric: (label, values per generation)} draws a reference curve
  (e.g. theory) on that metric's panel."""
  titles = titles or {}
  names = [m for m in order if m in by_stat] + [m for m in by_stat if m not in order]
  layout = panels(names, titles, groups)
  cols = min(3, len(layout))
  rows = math.ceil(len(layout) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False, layout="constrained")
  for ax, (title, members) in zip(axes.flat, layout):
    for i, m in enumerate(members):
      st, color = by_stat[m], f"C{i}"
      label = titles.get(m, m) if len(members) > 1 else None
      g = np.arange(len(st["mean"]))
      if n_chains > 1 and "q05" in st and "q95" in st:
        ax.fill_between(g, st["q05"], st["q95"], alpha=0.15, color=color, lw=0)
      if n_chains > 1 and "q25" in st and "q75" in st:
        ax.fill_between(g, st["q25"], st["q75"], alpha=0.3, color=color, lw=0)
      ax.plot(g, st["q50"] if n_chains > 1 and "q50" in st else st["mean"], color=color, label=label,
              marker="o" if len(g) <= 12 else None, ms=3)
      if overlays and m in overlays:
        ref_label, ref = overlays[m]
        ax.plot(g, np.asarray(ref)[:len(g)], color="k", lw=1.2, ls=":", label=ref_label)
    ax.set_title(title, fontsize=10)
    generation_axis(ax)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7, loc="best")
  for ax in list(axes.flat)[len(layout):]:
    ax.axis("off")
  how = f"{n_chains} chains: median, bands 25-75% and 5-95% over chains" if n_chains > 1 else "one chain"
  fig.suptitle(f"{name}: {how}", fontsize=11)
  return fig
