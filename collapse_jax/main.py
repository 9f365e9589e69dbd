"""Entry point: collapse-jax --config=NAME[:ARG] --workdir=DIR [--config.FIELD=VALUE ...]

(also python -m collapse_jax.main ...). `collapse-jax --help` lists the flags and the experiments.
"""
import ast
import glob
import importlib.util
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment: NAME[:ARG] (e.g. gmm:quick; --help lists them) or a config file PATH[:ARG] "
    "(e.g. configs/gmm.py:quick); fields are overridden by --config.FIELD=VALUE.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory, local or gs://bucket/path: config.json, "
                               "metrics.jsonl, checkpoints/, plots/.")
_DISTRIBUTED = flags.DEFINE_bool("jax_distributed", False,
                                 "Call jax.distributed.initialize() first (Cloud TPU slices, SLURM, or the flags "
                                 "below); on CPU, collectives go through gloo.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "With --jax_distributed: host:port of process 0 (default: found by JAX on Cloud "
                                   "TPU and SLURM).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "With --jax_distributed: number of processes "
                                      "(default: found by JAX).", lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "With --jax_distributed: this process's index, in "
                                   "[0, num_processes) (default: found by JAX).", lower_bound=0)
_LOCAL_DEVICE_IDS = flags.DEFINE_list("local_device_ids", None, "With --jax_distributed: comma-separated ids of "
                                      "the local devices this process uses (default: all visible).")
_DISTRIBUTED_FLAGS = (_COORDINATOR, _NUM_PROCESSES, _PROCESS_ID, _LOCAL_DEVICE_IDS)
_CPU_THREADS = flags.DEFINE_integer("cpu_threads", 0, "Cores for XLA's CPU compute (0: all). 1 speeds up runs of "
                                    "many tiny ops on a CPU, e.g. the single-chain GMM; results are unchanged.",
                                    lower_bound=0)
_PLAN = flags.DEFINE_string("plan", None, "Run nothing: compile the run's programs for a target (local, a TPU slice "
                            "like v5e-8 / v5p-64, a topology like v5e:2x2 / v5e-16x16, or h100 / h200: estimated from "
                            "the CPU compilation) and report per-chip memory and roofline time; a run that does not "
                            "fit is refused (exit 2). Needs libtpu for TPUs.")
_PLAN_OUT = flags.DEFINE_string("plan_out", None, "With --plan: where the JSON report goes (default: "
                                "<workdir>/plan.json with --workdir, else stdout).")
# absl's own short help lists only the flags of the __main__ module, which under the console script is the
# generated wrapper (none): these are answered here instead. --helpfull still goes to absl.
_HELP_ARGS = ("--help", "-help", "-h", "-?", "--helpshort", "-helpshort")


def _fail(msg: str):
  print(f"error: {msg}", file=sys.stderr)
  sys.exit(2)


def configs_dir() -> str:
  """The experiments' config files: the installed collapse_jax.configs package (pyproject maps it onto configs/),
  else configs/ beside the package, as in a checkout whose editable install predates that mapping."""
  try:
    spec = importlib.util.find_spec("collapse_jax.configs")
  except ImportError:
    spec = None
  if spec is not None and spec.submodule_search_locations:
    return list(spec.submodule_search_locations)[0]
  return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def experiments() -> dict[str, tuple[str, tuple[str, ...]]]:
  """name -> (first line of the config's docstring, its VARIANTS), read without executing the config files."""
  out = {}
  for path in sorted(glob.glob(os.path.join(configs_dir(), "*.py"))):
    name = os.path.basename(path)[:-3]
    if name.startswith("_"):
      continue
    with open(path, encoding="utf-8") as fh:
      tree = ast.parse(fh.read(), path)
    doc = (ast.get_docstring(tree) or "").strip().splitlines()
    variants = ()
    for node in tree.body:
      if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "VARIANTS" for t in node.targets):
        variants = tuple(ast.literal_eval(node.value))
    out[name] = (doc[0] if doc else "", variants)
  return out


def resolve_config(value: str) -> str:
  """NAME[:ARG] -> the packaged configs/NAME.py[:ARG]. A path (it has a '/' or ends in .py) is kept as it is, so
  relative paths still resolve against the working directory as ml_collections does."""
  head, sep, arg = value.partition(":")
  if not head or "/" in head or os.sep in head or head.endswith(".py"):
    return value
  path = os.path.join(configs_dir(), f"{head}.py")
  if head.startswith("_") or not os.path.isfile(path):
    raise ValueError(f"--config={value}: unknown experiment {head!r}; known: {', '.join(experiments())} "
                     "(or a path to a config file)")
  return path + sep + arg


def _resolve_argv(argv: list[str]) -> list[str]:
  out = list(argv)
  i = 1
  while i < len(out) and out[i] != "--":
    for prefix in ("--config=", "-config="):
      if out[i].startswith(prefix):
        out[i] = prefix + resolve_config(out[i][len(prefix):])
    if out[i] in ("--config", "-config") and i + 1 < len(out):
      out[i + 1] = resolve_config(out[i + 1])
      i += 1
    i += 1
  return out


def help_text() -> str:
  module = sys.argv[0] if __name__ == "__main__" else __name__  # absl files __main__'s flags under argv[0]
  lines = ["collapse-jax: the model-collapse experiments of Shumailov et al. (Nature 2024) in JAX.", "",
           "usage: collapse-jax --config=NAME[:ARG] --workdir=DIR [--config.FIELD=VALUE ...]",
           "       (or: python -m collapse_jax.main ...); the same workdir again resumes the run.", "",
           "experiments (--config=NAME or NAME:VARIANT[,VARIANT]; each config file's docstring gives its command,",
           f"hardware and expected result; files in {configs_dir()}):"]
  exps = experiments()
  width = max(map(len, exps), default=0)
  for name, (summary, variants) in exps.items():
    lines.append(f"  {name:<{width}}  {summary}")
    if variants:
      lines.append(f"  {'':<{width}}  variants: {', '.join(variants)}")
  lines += ["", flags.FLAGS.module_help(module).strip("\n"), "",
            "--helpfull lists every flag, absl's included."]
  return "\n".join(lines)


def _parse(argv):
  """absl's parser, with bad flags and config overrides reported as one line instead of a traceback."""
  if any(a in _HELP_ARGS for a in argv[1:argv.index("--") if "--" in argv else len(argv)]):
    print(help_text())
    sys.exit(0)
  try:
    rest = flags.FLAGS(_resolve_argv(argv))
    if _CONFIG.value is None:
      raise ValueError("--config is required, e.g. --config=gmm:quick (collapse-jax --help lists the experiments)")
    "family" in _CONFIG.value  # a config file that failed to load raises only when first read
  except flags.Error as e:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    # A config file's own exception arrives wrapped with its traceback: keep the first and the last line.
    _fail(" ".join(lines[:1] + lines[-1:]) if len(lines) > 1 else lines[0])
  except (AttributeError, KeyError) as e:  # ml_collections: an override of a field the config does not have
    bad = [a for a in argv if a.startswith("--config.")]
    _fail(f"unknown config field {str(e).strip(chr(34)).strip(chr(39))!r} (in {' '.join(bad) or 'the config'})")
  except (OSError, ValueError, TypeError) as e:
    _fail(" ".join(str(e).split())[:300])
  return rest


def distributed_kwargs() -> dict | None:
  """jax.distributed.initialize's arguments from the flags (only those given: JAX finds the rest on Cloud TPU
  and SLURM), or None without --jax_distributed; inconsistent flags end the run with a one-line error."""
  given = {h.name: h.value for h in _DISTRIBUTED_FLAGS if h.value is not None}
  if not _DISTRIBUTED.value:
    if given:
      _fail(f"--{next(iter(given))} is only used with --jax_distributed")
    return None
  n, p = given.get("num_processes"), given.get("process_id")
  if (n is None) != (p is None):
    _fail("--num_processes and --process_id go together (or leave both out for JAX to find them)")
  if n is not None and p >= n:
    _fail(f"--process_id={p} must be less than --num_processes={n}")
  if "local_device_ids" in given:
    try:
      given["local_device_ids"] = [int(i) for i in given["local_device_ids"]]
    except ValueError:
      _fail(f"--local_device_ids must be comma-separated integers, got {','.join(given['local_device_ids'])!r}")
  return given


def init_distributed(kwargs: dict) -> None:
  import jax
  platforms = (jax.config.jax_platforms or "").split(",")
  if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ and (platforms == [""] or "cpu" in platforms):
    # Cross-process collectives on CPU need an implementation; gloo ships with jaxlib (MPI would need a library).
    # It must be chosen before initialize() creates the backends.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(**kwargs)
  except (ValueError, TypeError, RuntimeError) as e:
    _fail(f"--jax_distributed: jax.distributed.initialize failed: {' '.join(str(e).split())[:300]}")


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO; the loop prints its own progress
  kwargs = distributed_kwargs()
  if kwargs is not None:
    init_distributed(kwargs)
  if _CPU_THREADS.value:  # creates the backends: after jax.distributed.initialize, which must come first
    from collapse_jax import hardware
    hardware.limit_cpu_threads(_CPU_THREADS.value)
  from collapse_jax.errors import ConfigError
  try:
    # After flag parsing, so --help and flag errors do not pay JAX's import; inside the try, since importing
    # reads COLLAPSE_JAX_PROGRESS_EVERY (progress.py), whose bad value is a one-line error too.
    if _PLAN.value:
      from collapse_jax import plan
      plan.run(_CONFIG.value, _PLAN.value, out_path=_PLAN_OUT.value, workdir=_WORKDIR.value)
      return
    if _PLAN_OUT.value:
      _fail("--plan_out is only used with --plan")
    from collapse_jax import loop
    loop.run(_CONFIG.value, _WORKDIR.value)
  except ConfigError as e:
    _fail(str(e))


def run():
  app.run(main, flags_parser=_parse)


if __name__ == "__main__":
  run()
