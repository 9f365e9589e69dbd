"""PNG figures shared by all families: each metric against generation, with bands across chains."""
import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402

from collapse_jax import paths  # noqa: E402


def metric_bands(workdir: str, name: str, by_stat: dict, order, n_chains: int, overlays: dict | None = None,
                 filename: str | None = None) -> str:
  """One panel per scalar metric: median line, 25-75% and 5-95% bands over chains (the paper's style).
  `overlays` {metric: (label, values per generation)} draws a reference curve (e.g. theory) on that panel."""
  names = [m for m in order if m in by_stat] + [m for m in by_stat if m not in order]
  cols = min(3, len(names))
  rows = math.ceil(len(names) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
  for ax, m in zip(axes.flat, names):
    st = by_stat[m]
    g = np.arange(len(st["mean"]))
    if n_chains > 1 and "q05" in st and "q95" in st:
      ax.fill_between(g, st["q05"], st["q95"], alpha=0.2, color="C0", label="5-95%")
    if n_chains > 1 and "q25" in st and "q75" in st:
      ax.fill_between(g, st["q25"], st["q75"], alpha=0.35, color="C0", label="25-75%")
    ax.plot(g, st["q50"] if n_chains > 1 and "q50" in st else st["mean"], color="C0",
            label="median" if n_chains > 1 else "value")
    if n_chains > 1:
      ax.plot(g, st["mean"], color="C1", lw=1, ls="--", label="mean")
    if overlays and m in overlays:
      label, ref = overlays[m]
      ax.plot(g, np.asarray(ref)[:len(g)], color="k", lw=1.2, ls=":", label=label)
      ax.legend(fontsize=8)
    ax.set_title(m)
    ax.set_xlabel("generation")
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(names):]:
    ax.axis("off")
  axes.flat[0].legend(fontsize=8)
  fig.suptitle(f"{name}: {n_chains} chain{'s' if n_chains > 1 else ''}")
  fig.tight_layout()
  path = os.path.join(workdir, "plots", filename or f"{name}_metrics.png")
  paths.savefig(fig, path, dpi=110)
  plt.close(fig)
  return path
