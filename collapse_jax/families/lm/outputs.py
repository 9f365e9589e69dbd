"""The LM's outputs beside metrics.jsonl, host side after the run: samples/gen_NNNN.txt (the fixed text prompts and
each generation's continuations) and plots/lm_data_ppl0.png (the paper's Fig. 1b/c: each generation's training
data scored by the generation-0 model, as a density of log-perplexity over fixed bins)."""
import math
import os

import numpy as np

from collapse_jax import paths

HIST_BINS = 60


def log_ppl_range(vocab_size: int) -> float:
  """The histogram's upper edge in log-perplexity: past log(vocab) (a uniform model's), with room to spare."""
  return math.ceil(math.log(vocab_size)) + 2.0


def write_texts(workdir: str, continuations, prompts, to_text) -> None:
  """One file per generation: every prompt and that generation's continuation of it, as to_text(ids) shows them."""
  paths.makedirs(os.path.join(workdir, "samples"))
  for g, rows in enumerate(continuations):
    parts = [f"=== prompt {i} ===\n{to_text(p)}\n--- generation {g} continues ---\n{to_text(r)}\n"
             for i, (p, r) in enumerate(zip(prompts, rows))]
    paths.write_atomic(os.path.join(workdir, "samples", f"gen_{g:04d}.txt"), "\n".join(parts))


def plot_data_ppl0(workdir: str, hist_GxH, hi: float) -> None:
  """The per-generation densities of log-perplexity under generation 0 (bins over [0, hi]), on a perplexity axis."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  centers = (np.arange(HIST_BINS) + 0.5) * hi / HIST_BINS
  fig, ax = plt.subplots(figsize=(6.5, 4))
  for g, (h, col) in enumerate(zip(hist_GxH, plt.cm.viridis(np.linspace(0, 1, len(hist_GxH))))):
    ax.plot(np.exp(centers), h, color=col, label=f"gen {g}" + (" (real)" if g == 0 else ""))
  ax.set(xscale="log", xlabel="perplexity of a training block under the generation-0 model",
         ylabel="density (per unit log-perplexity)", title="LM: each generation's training data (paper Fig. 1b/c)")
  ax.legend(fontsize=7, ncol=2)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  paths.savefig(fig, os.path.join(workdir, "plots", "lm_data_ppl0.png"), dpi=110)
  plt.close(fig)
