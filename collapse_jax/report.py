"""`collapse-jax report DIR [DIR ...] --out OUT`: runs of one family compared, finished or not, local or gs://.

Writes to OUT one figure per headline metric with every run overlaid (bands over a run's chains; runs whose configs
differ only in `seed` drawn as one curve, their median with a band over the seeds), the LM's generation-0
perplexity histograms of every run in one figure (the paper's Fig. 1b/c), and report.md: the runs and each
metric's values at a few generations (tables.py). Runs are labelled by the config fields whose values differ
between them, so a legend reads `regime.name=real_fraction, lm.epochs=10` rather than a directory name.

Everything is read and checked before anything is written: a directory that is not a run, runs of different
families or an unknown metric are one-line ConfigErrors naming the path or flag.
"""
import argparse
import io
import json
import os
import zipfile
from typing import NamedTuple

import numpy as np

from collapse_jax import metrics as metrics_lib
from collapse_jax import paths, registry, tables
from collapse_jax.config import RESULT_NEUTRAL
from collapse_jax.errors import ConfigError

# Fields that do not change a run's results (where files go, how often it saves, how it is spread over devices,
# what it logs): never what tells runs apart. A name covers its sub-fields (wandb.project).
IGNORED = RESULT_NEUTRAL + ("snapshot_generations", "snapshot_size")
# Histogram-like arrays (arrays.npz: "<name>" [G, bins] and "<name>.edges") the report draws, with how: bins in
# log-perplexity are shown as perplexity on a log axis.
HISTOGRAMS = {"data_logppl0_hist": dict(
    title="Each generation's training data scored by the generation-0 model (paper Fig. 1b/c)",
    xlabel="perplexity of a training block under the generation-0 model",
    ylabel="density per unit log-perplexity")}
_UNSET = object()


class RunDir(NamedTuple):
  path: str
  config: dict    # config.json flattened: {"regime.name": "replace", ...}
  series: dict    # metrics.series of metrics.jsonl's whole lines: {metric: {stat: values per generation}}
  arrays: dict    # arrays.npz ({} where the run has none)
  done: int       # generations in metrics.jsonl


class Entry(NamedTuple):
  """What one curve shows: a run, or the runs of one config that differ only in their seed."""
  label: str
  runs: tuple


def flatten(tree: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = _hashable(v)
  return out


def _hashable(v):
  return tuple(_hashable(x) for x in v) if isinstance(v, list) else v


def _ignored(field: str) -> bool:
  return any(field == f or field.startswith(f + ".") for f in IGNORED)


def _results_config(run: RunDir, with_seed: bool) -> dict:
  return {k: v for k, v in run.config.items() if not _ignored(k) and (with_seed or k != "seed")}


def load(path: str) -> RunDir:
  paths.check(path, "DIR")
  if not paths.is_remote(path) and not os.path.isdir(path):
    raise ConfigError(f"{path}: not a directory")
  for name in ("config.json", "metrics.jsonl"):
    if not paths.exists(os.path.join(path, name)):
      raise ConfigError(f"{path}: not a run directory (no {name})")
  cfg_path, rows_path = os.path.join(path, "config.json"), os.path.join(path, "metrics.jsonl")
  try:
    cfg = json.loads(paths.read_text(cfg_path))
  except (ValueError, UnicodeDecodeError) as e:
    raise ConfigError(f"{cfg_path}: not valid JSON ({e})") from None
  if not isinstance(cfg, dict) or not isinstance(cfg.get("family"), str):
    raise ConfigError(f"{cfg_path}: no `family` field (not a collapse-jax config.json)")
  try:
    rows = metrics_lib.read_jsonl(rows_path, whole_lines=True)
  except (ValueError, UnicodeDecodeError) as e:
    raise ConfigError(f"{rows_path}: not JSON lines ({e})") from None
  arrays, npz = {}, os.path.join(path, "arrays.npz")
  if paths.exists(npz):
    try:
      with np.load(io.BytesIO(paths.read_bytes(npz))) as z:
        arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError, zipfile.BadZipFile) as e:
      raise ConfigError(f"{npz}: not a readable .npz ({e})") from None
    for key in HISTOGRAMS:
      if key in arrays and np.shape(arrays.get(f"{key}.edges")) != (np.shape(arrays[key])[-1] + 1,):
        raise ConfigError(f"{npz}: {key} has {np.shape(arrays[key])[-1]} bins but {key}.edges has shape "
                          f"{np.shape(arrays.get(f'{key}.edges'))}")
  return RunDir(path, flatten(cfg), metrics_lib.series(rows), arrays, len(rows))


def _value(v) -> str:
  if v is _UNSET:
    return "(unset)"
  if isinstance(v, tuple):
    return "[" + ",".join(_value(x) for x in v) + "]"
  if isinstance(v, float):
    return repr(v)  # exact: two values never print alike
  return str(v) if v != "" else '""'


def differing(configs: list[dict]) -> list[str]:
  """The fields (sorted) whose values are not the same in every config; a field some configs lack counts."""
  keys = sorted(set().union(*configs)) if configs else []
  return [k for k in keys if len({repr(c.get(k, _UNSET)) for c in configs}) > 1]


def entries(runs: list[RunDir], merge_seeds: bool = True) -> list[Entry]:
  """Runs as curves, in the order given: with merge_seeds, runs whose results-relevant configs are equal but for
  distinct seeds become one entry. Labels name exactly the fields that differ between entries; entries of
  identical configs are told apart by their directory's name (its path where those match too)."""
  keyed = [_results_config(r, with_seed=not merge_seeds) for r in runs]
  parts: dict[tuple, list[int]] = {}
  for i, k in enumerate(keyed):
    parts.setdefault(tuple(sorted(k.items())), []).append(i)
  groups = []
  for idx in parts.values():
    seeds = [runs[i].config.get("seed") for i in idx]
    if merge_seeds and len(idx) > 1 and len(set(seeds)) == len(seeds):
      groups.append(idx)
    else:
      groups += [[i] for i in idx]
  groups.sort(key=lambda g: g[0])  # the order the runs were given in
  fields = differing([keyed[g[0]] for g in groups])
  labels = [", ".join(f"{f}={_value(keyed[g[0]].get(f, _UNSET))}" for f in fields) for g in groups]
  for i, g in enumerate(groups):
    if not labels[i] and len(g) > 1:
      labels[i] = "seeds " + ", ".join(_value(runs[j].config.get("seed")) for j in g)
  # Only runs of one config with a seed repeated share a label (a seed group's fields differ from all others').
  dup = {l for l in labels if labels.count(l) > 1}
  for name in (lambda r: os.path.basename(r.path.rstrip("/")), lambda r: r.path):
    tagged = [", ".join(filter(None, (l, name(runs[g[0]])))) if l in dup else l for l, g in zip(labels, groups)]
    if len(set(tagged)) == len(tagged):
      break
  labels = tagged
  return [Entry(l, tuple(runs[i] for i in g)) for l, g in zip(labels, groups)]


def run_labels(es: list[Entry]) -> list[tuple[str, RunDir]]:
  """(label, run) per run: a seed group's runs carry their seed."""
  return [(e.label + (f", seed={_value(r.config.get('seed'))}" if len(e.runs) > 1 else ""), r)
          for e in es for r in e.runs]


def value_at(run: RunDir, metric: str, g: int):
  """metrics.jsonl's value of `metric` at generation g: the mean over the run's chains (one chain: its value);
  None where the run has not reached g or lacks the metric."""
  st = run.series.get(metric)
  return float(st["mean"][g]) if st is not None and g < len(st["mean"]) else None


def _cell(text: str) -> str:
  return text.replace("|", "\\|")


def markdown(family: str, es: list[Entry], metrics: list[str], titles: dict, figures: list[tuple[str, str]]) -> str:
  labelled = run_labels(es)
  lines = [f"# Report: {family}, {len(labelled)} run{'s' * (len(labelled) != 1)}", "",
           "Runs are labelled by the config fields whose values differ between them. Values are metrics.jsonl's: "
           "the mean over a run's chains (one chain: its value); `-` where a run has not reached that generation.",
           "", "## Runs", ""]
  lines.append(tables.markdown(
      ["run", "directory", "seed", "chains", "generations done"],
      [[_cell(l), _cell(r.path), _value(r.config.get("seed", "")), _value(r.config.get("chains", "")), r.done]
       for l, r in labelled]))
  # Generations spread over the longest run, and each run's last (a run still going, or stopped, shows its latest).
  gens = sorted(set(tables.spread(max((r.done for _, r in labelled), default=0)))
                | {r.done - 1 for _, r in labelled if r.done})
  for m in metrics:
    lines += [f"## {titles.get(m, m)} (`{m}`)", ""]
    lines.append(tables.markdown(["run"] + [f"gen {g}" for g in gens],
                                 [[_cell(l)] + [value_at(r, m, g) for g in gens] for l, r in labelled]))
  if figures:
    lines += ["## Figures", ""] + [f"![{title}]({name})" for name, title in figures] + [""]
  return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
  ap = argparse.ArgumentParser(
      prog="collapse-jax report",
      description="Compare runs of one family (finished, running or stopped; local or gs://): one figure per "
                  "headline metric with every run overlaid, the LM's generation-0 perplexity histograms, and "
                  "report.md with the runs and their values at a few generations.")
  ap.add_argument("dirs", nargs="+", metavar="DIR", help="run directories (workdirs), local or gs://bucket/path")
  ap.add_argument("--out", required=True, help="where the figures and report.md go, local or gs://bucket/path")
  ap.add_argument("--metrics", default="", help="comma-separated metrics to draw and tabulate (default: the "
                  "family's headline metrics)")
  ap.add_argument("--separate-seeds", action="store_true", help="one curve per run even where configs differ only "
                  "in `seed` (default: such runs are one curve, their median with a band over the seeds)")
  return ap.parse_args(argv)


def main(argv: list[str]) -> int:
  from collapse_jax import report_figures  # matplotlib only once the arguments are good
  args = parse_args(argv)
  if len(set(args.dirs)) < len(args.dirs):
    raise ConfigError(f"DIR {next(d for d in args.dirs if args.dirs.count(d) > 1)} is given twice")
  paths.check(args.out, "--out")
  runs = [load(d) for d in args.dirs]
  families = {r.config["family"] for r in runs}
  if len(families) > 1:
    raise ConfigError("runs of different families: " + ", ".join(f"{r.path} ({r.config['family']})" for r in runs)
                      + "; a report compares runs of one family")
  family = families.pop()
  try:
    cls = registry.family_class(family)
  except ConfigError as e:
    raise ConfigError(f"{os.path.join(runs[0].path, 'config.json')}: {e}") from None
  have = sorted(set().union(*(r.series for r in runs)) - {"generation", "train_samples"})
  if args.metrics:
    metrics = [m for m in args.metrics.split(",") if m]
    unknown = [m for m in metrics if m not in have]
    if unknown:
      raise ConfigError(f"--metrics: no run has {unknown[0]!r} (they have: {', '.join(have) or 'no generations'})")
  else:
    metrics = [m for m in cls.headline if m in have]
  es = entries(runs, merge_seeds=not args.separate_seeds)
  paths.makedirs(args.out)
  figures, written = [], []
  for m in metrics:
    title = cls.titles.get(m, m)
    fig = report_figures.metric_figure([(e.label, [r.series.get(m, {}) for r in e.runs]) for e in es],
                                       title=f"{family}: {title}", ylabel=title)
    figures.append((f"{m}.png", title))
    written.append(report_figures.save(fig, os.path.join(args.out, f"{m}.png")))
  for key, how in HISTOGRAMS.items():
    panels = [(l, r.arrays[key][:r.done], r.arrays[f"{key}.edges"]) for l, r in run_labels(es)
              if key in r.arrays and f"{key}.edges" in r.arrays and r.done]
    if panels:
      fig = report_figures.histogram_figure(panels, **how)
      figures.append((f"{key}.png", how["title"]))
      written.append(report_figures.save(fig, os.path.join(args.out, f"{key}.png")))
  md = os.path.join(args.out, "report.md")
  paths.write_atomic(md, markdown(family, es, metrics, cls.titles, figures))
  written.append(md)
  for p in written:
    print(p)
  return 0
