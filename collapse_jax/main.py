"""Entry point: collapse-jax --config=NAME[:ARG] --workdir=DIR [--config.FIELD=VALUE ...] (or python -m
collapse_jax.main ...). --help lists flags, experiments and commands; cli.py holds help, commands, cluster start-up
and one-line errors."""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from collapse_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment: NAME[:ARG] (e.g. gmm:quick; --help lists them) or a config file PATH[:ARG] "
    "(e.g. configs/gmm.py:quick); fields are overridden by --config.FIELD=VALUE.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory, local or gs://bucket/path (summary.md lists its files).")
_CPU_THREADS = flags.DEFINE_integer("cpu_threads", 0, "Cores for XLA's CPU compute (0: all). 1 speeds up runs of "
                                    "many tiny ops on a CPU, e.g. the single-chain GMM; results are unchanged.",
                                    lower_bound=0)
_PLAN = flags.DEFINE_string("plan", None, "Run nothing: compile the run's programs for a target (local, a TPU slice "
                            "like v5e-8 / v5p-64, a topology like v5e:2x2 / v5e-16x16, or h100 / h200: estimated from "
                            "the CPU compilation) and report per-chip memory and roofline time; a run that does not "
                            "fit is refused (exit 2). Needs libtpu for TPUs.")
_PLAN_OUT = flags.DEFINE_string("plan_out", None, "With --plan: where the JSON report goes (default: "
                                "<workdir>/plan.json with --workdir, else stdout).")
_PRINT_CONFIG = flags.DEFINE_bool("print_config", False, "Run nothing: print the resolved config (the file with "
                                  "its variants and every --config.FIELD override) as JSON, then exit.")


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
  if _PLAN_OUT.value and not _PLAN.value:
    cli.fail("--plan_out is only used with --plan")
  if _PRINT_CONFIG.value:
    return print(_CONFIG.value.to_json_best_effort(indent=2, sort_keys=True))
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO; the loop prints its own progress
  cli.start_distributed()
  if _CPU_THREADS.value:  # creates the backends: after jax.distributed.initialize, which must come first
    from collapse_jax import hardware
    hardware.limit_cpu_threads(_CPU_THREADS.value)
  # JAX is imported here, after the flags, so that --help and a bad flag do not pay for it; inside the guard,
  # since importing reads COLLAPSE_JAX_PROGRESS_EVERY (progress.py), whose bad value is a one-line error too.
  with cli.one_line_errors():
    if _PLAN.value:
      from collapse_jax import plan
      plan.run(_CONFIG.value, _PLAN.value, out_path=_PLAN_OUT.value, workdir=_WORKDIR.value)
    else:
      from collapse_jax import loop
      loop.run(_CONFIG.value, _WORKDIR.value)


def run():
  status = cli.command(sys.argv)
  if status is not None:
    sys.exit(status)
  app.run(main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
  run()
