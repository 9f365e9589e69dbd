"""Mutants of `collapse-jax report` (tests/test_report.py): labels, seed groups, report.md's numbers, the figures'
data and readability, gs:// output, bad input."""
from benchmarks.mutants import Mutant

REPORT, FIGS = "collapse_jax/report.py", "collapse_jax/report_figures.py"
_T = "tests/test_report.py::"
_LABELS = f"{_T}test_labels_name_exactly_the_fields_that_differ"
_TABLE = f"{_T}test_table_values_are_metrics_jsonl_and_figures_are_readable"
_SEEDS = f"{_T}test_seed_runs_merge_into_one_curve_median_and_min_max"
_BANDS = f"{_T}test_metric_figure_bands_from_the_data"
_HIST = f"{_T}test_lm_histograms_one_figure_panel_per_run"

MUTANTS = [
    Mutant(name="report_label_drops_a_field", file=REPORT,
           old="return [k for k in keys if len({repr(c.get(k, _UNSET)) for c in configs}) > 1]",
           new="return [k for k in keys if len({repr(c.get(k, _UNSET)) for c in configs}) > 1][1:]",
           tests=(_LABELS, _TABLE), why="a label leaves out one of the fields that differ between runs"),
    Mutant(name="report_ignores_a_result_field", file=REPORT,
           old='IGNORED = RESULT_NEUTRAL + ("snapshot_generations", "snapshot_size")',
           new='IGNORED = RESULT_NEUTRAL + ("regime", "snapshot_generations", "snapshot_size")', tests=(_LABELS,),
           why="runs of different regimes get the same label (and seeds of different regimes merge)"),
    Mutant(name="report_labels_an_ignored_field", file="collapse_jax/config.py",
           old='"keep_checkpoints", "checkpoint_every", "checkpoint_min_seconds",',
           new='"keep_checkpoints", "checkpoint_min_seconds",', tests=(_LABELS, _TABLE),
           why="checkpoint_every, which changes no result, tells runs apart in the labels"),
    Mutant(name="report_seeds_not_merged", file=REPORT,
           old="if merge_seeds and len(idx) > 1 and len(set(seeds)) == len(seeds):", new="if False:",
           tests=(_LABELS, _SEEDS), why="runs differing only in seed are drawn as separate curves"),
    Mutant(name="report_seed_curve_is_the_mean", file=FIGS, old="np.nanmedian(per_seed, axis=0)",
           new="np.nanmean(per_seed, axis=0)", tests=(_BANDS,),
           why="a seed group's line is the mean over seeds while the legend says median"),
    Mutant(name="report_table_wrong_generation", file=REPORT, old='float(st["mean"][g])',
           new='float(st["mean"][min(g + 1, len(st["mean"]) - 1)])', tests=(_TABLE,),
           why="report.md's column `gen g` shows another generation's value"),
    Mutant(name="report_table_no_last_generation", file=REPORT,
           old="| {r.done - 1 for _, r in labelled if r.done})", new="| set())", tests=(_HIST,),
           why="a run still going shows no value at its latest generation"),
    Mutant(name="report_reads_a_torn_line", file=REPORT, old="read_jsonl(rows_path, whole_lines=True)",
           new="read_jsonl(rows_path)", tests=(_HIST,),
           why="a run being written (its last line half there) cannot be reported"),
    Mutant(name="report_histogram_past_the_done_generations", file=REPORT, old="r.arrays[key][:r.done]",
           new="r.arrays[key]", tests=(_HIST,),
           why="the histogram figure draws generations metrics.jsonl does not hold yet"),
    Mutant(name="report_histogram_log_axis_values", file=FIGS, old="ax.plot(np.exp(centers), h_GxH[g]",
           new="ax.plot(centers, h_GxH[g]", tests=(_HIST,),
           why="the perplexity axis shows log-perplexities"),
    Mutant(name="report_legend_over_the_curves", file=FIGS,
           old='loc="upper left", bbox_to_anchor=(1.02, 1.0)', new='loc="upper left"', tests=(_BANDS, _SEEDS),
           why="the legend is drawn over the plotting area"),
    Mutant(name="report_fractional_generation_ticks", file=FIGS,
           old="  ax.xaxis.set_major_locator(MaxNLocator(integer=True))", new="  pass", tests=(_TABLE,),
           why="the generation axis is ticked at 0.5, 1.5, ..."),
    Mutant(name="report_mixes_families", file=REPORT, old="  if len(families) > 1:", new="  if False:",
           tests=(f"{_T}test_bad_input_is_one_line_naming_the_path",),
           why="a GMM run and an LM run are overlaid under one family's titles"),
    Mutant(name="report_gs_figures_written_locally", file=FIGS, old="paths.savefig(fig, path, dpi=110)",
           new="fig.savefig(path, dpi=110)", tests=(f"{_T}test_gs_runs_and_output_through_the_emulator",),
           why="a gs:// --out gets its figures in a local directory named 'gs:'"),
]
