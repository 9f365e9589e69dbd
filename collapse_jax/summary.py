"""summary.md: what a run did and where its outputs are, printed at the end of every run (and on re-running a
finished one) and written to the workdir. The family's headline metrics (Family.headline) at a few generations
spread over the run, in words (Family.titles); with several chains, mean +- std over them."""
import os

from collapse_jax import tables


def headline_value(history_metrics: dict, name: str, g: int) -> float | None:
  """The value the progress line shows: the mean over chains of metric `name` at generation g."""
  table = history_metrics.get(name)
  return None if table is None else float(table[g, 0])


def text(workdir: str, exp, history: dict, done: int, files: list[str]) -> str:
  """The Markdown of summary.md for the first `done` generations of `history` (loop.run's host history)."""
  fam, run = exp.family, exp.run
  chains = f"{run.chains} chains" if run.chains > 1 else "1 chain"
  state = "finished" if done >= run.generations else f"stopped after {done} of {run.generations} generations"
  lines = [f"# {fam.name}: {run.generations} generations, regime {run.regime.name}, {chains}, seed {run.seed}", "",
           f"workdir: {workdir} ({state})", ""]
  names = [m for m in fam.headline if m in history["metrics"]]
  if done and names:
    gens = tables.spread(done)
    rows = []
    for m in names:
      table = history["metrics"][m]
      cells = [_cell(table[g], run.chains) for g in gens]
      rows.append([fam.titles.get(m, m) + f" (`{m}`)", *cells])
    lines += [tables.markdown(["metric", *(f"gen {g}" for g in gens)], rows).rstrip("\n")]
    if run.chains > 1:
      lines += ["", f"mean +- std over the {run.chains} chains."]
    lines += [""]
  lines += ["Outputs:"] + [f"- {os.path.join(workdir, f)}" for f in files]
  return "\n".join(lines) + "\n"


def _cell(stats, chains: int) -> str:
  mean = tables.fmt(stats[0])
  return mean if chains == 1 else f"{mean} +- {tables.fmt(stats[1])}"
