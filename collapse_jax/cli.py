"""The command line around main.py: experiment names, --help, the cluster flags and their start-up, and every
error before or during a run as one line `error: ...` with exit status 2.

JAX is imported only to start a distributed run: --help and a bad flag answer at once.
"""
import ast
import contextlib
import glob
import os
import re
import sys

import ml_collections
from absl import flags

from collapse_jax import config as config_lib
from collapse_jax import fields
from collapse_jax.errors import ConfigError

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
# absl's own short help lists only the flags of the __main__ module, which under the console script is the
# generated wrapper (none): these are answered here instead. --helpfull still goes to absl.
_HELP_ARGS = ("--help", "-help", "-h", "-?", "--helpshort", "-helpshort")
_OVERRIDE = re.compile(r"^--?(?:no)?config\.([^=]+)")


# `collapse-jax COMMAND ...`: commands beside running an experiment, each a module with main(argv) -> exit status
# and its own argparse help.
COMMANDS = {"report": ("collapse_jax.report", "compare finished or running workdirs: figures and a table"),
            "export": ("collapse_jax.families.lm.export", "write an LM generation's model as a Hugging Face folder")}


def command(argv: list[str]) -> int | None:
  """Runs `collapse-jax COMMAND ...` if argv names one, returning its exit status; None otherwise."""
  if len(argv) < 2 or argv[1] not in COMMANDS:
    return None
  import importlib
  with one_line_errors():
    return importlib.import_module(COMMANDS[argv[1]][0]).main(argv[2:])


def fail(msg: str):
  print(f"error: {msg}", file=sys.stderr)
  sys.exit(2)


def experiments() -> dict[str, tuple[str, tuple[str, ...]]]:
  """name -> (first line of the config's docstring, its VARIANTS), read without executing the config files."""
  out = {}
  for path in sorted(glob.glob(os.path.join(config_lib.configs_dir(), "*.py"))):
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
  path = os.path.join(config_lib.configs_dir(), f"{head}.py")
  if head.startswith("_") or not os.path.isfile(path):
    raise ConfigError(f"unknown experiment {head!r}; known: {', '.join(experiments())} (or a path to a config "
                      "file)")
  return path + sep + arg


def _config_args(argv: list[str]) -> list[tuple[int, str, str]]:
  """(index, prefix, value) of each --config value in argv before any `--`: `--config=V` or `--config V`."""
  end = argv.index("--") if "--" in argv else len(argv)
  out = []
  for i in range(1, end):
    if argv[i] in ("--config", "-config") and i + 1 < end:
      out.append((i + 1, "", argv[i + 1]))
    elif argv[i].startswith(("--config=", "-config=")):
      prefix, _, value = argv[i].partition("=")
      out.append((i, prefix + "=", value))
  return out


def _config_value(argv: list[str]) -> str | None:
  """The --config value absl ends up with (the last one given)."""
  found = _config_args(argv)
  return found[-1][2] if found else None


def resolve_argv(argv: list[str]) -> list[str]:
  out = list(argv)
  for i, prefix, value in _config_args(argv):
    out[i] = prefix + resolve_config(value)
  return out


def _flag_help(module: str, title: str) -> str:
  lines = flags.FLAGS.module_help(module).strip("\n").splitlines()
  return "\n".join([title] + lines[1:])  # absl heads them with the module's name or file


def help_text() -> str:
  # absl files main.py's flags under the file's path when it runs as __main__ (python -m), else its name.
  run_module = flags.FLAGS.find_module_defining_flag("config")
  lines = ["collapse-jax: the model-collapse experiments of Shumailov et al. (Nature 2024) in JAX.", "",
           "usage: collapse-jax --config=NAME[:ARG] --workdir=DIR [--config.FIELD=VALUE ...]",
           "       (or: python -m collapse_jax.main ...); the same workdir again resumes the run.", "",
           "experiments (--config=NAME or NAME:VARIANT[,VARIANT]; each config file's docstring gives its command,",
           f"hardware and expected result; files in {config_lib.configs_dir()}):"]
  exps = experiments()
  width = max(map(len, exps), default=0)
  for name, (summary, variants) in exps.items():
    lines.append(f"  {name:<{width}}  {summary}")
    if variants:
      lines.append(f"  {'':<{width}}  variants: {', '.join(variants)}")
  lines += ["", "commands (collapse-jax COMMAND --help for each):"]
  lines += [f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items()]
  lines += [""] + ([_flag_help(run_module, "flags:"), ""] if run_module else [])
  lines += [_flag_help(__name__, "cluster flags (several processes, one run):"), "",
            "--helpfull lists every flag, absl's included."]
  return "\n".join(lines)


def _unknown_override(argv: list[str]) -> ConfigError | None:
  """The first --config.PATH=VALUE whose PATH the config does not have, as fields' one-line message (config
  files are plain Python: loading one again to list its fields is cheap and only happens on this error)."""
  value = _config_value(argv)
  if value is None:
    return None
  path, _, arg = resolve_config(value).partition(":")
  known = fields.leaves(config_lib.load(path, arg or None))
  for a in argv[1:argv.index("--") if "--" in argv else len(argv)]:
    m = _OVERRIDE.match(a)
    if m and m.group(1) not in known:
      return fields.unknown_field(m.group(1), known)
  return None


def _innermost_config_error(e: BaseException) -> ConfigError | None:
  """ml_collections re-raises a config file's exception with its traceback in the message, and absl wraps that
  again: the ConfigError the config file raised is the last one down the chain."""
  found, seen = None, set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, ConfigError) and "\n" not in str(e):
      found = e
    e = e.__cause__ or e.__context__
  return found


def _one_line(e: Exception, argv: list[str]) -> str:
  inner = _innermost_config_error(e)
  if inner is not None:  # from a config file (a bad variant) or from naming one
    value = _config_value(argv)
    return (f"--config={value}: " if value is not None else "") + str(inner)
  if isinstance(e, (AttributeError, KeyError)):  # ml_collections: an override of a field the config lacks
    try:
      unknown = _unknown_override(argv)
    except Exception:  # the config no longer loads: say what ml_collections said
      unknown = None
    if unknown is not None:
      return str(unknown)
  lines = [l.strip() for l in str(e).splitlines() if l.strip()] or [type(e).__name__]
  # A config file's own exception arrives with its traceback: keep the first and the last line.
  return " ".join(" ".join(lines[:1] + lines[1:][-1:]).split())[:300]


def parse_flags(argv: list[str]) -> list[str]:
  """app.run's flags_parser: absl's parser, --help answered here, every bad flag, config file or override
  reported as one line instead of a traceback."""
  if any(a in _HELP_ARGS for a in argv[1:argv.index("--") if "--" in argv else len(argv)]):
    print(help_text())
    sys.exit(0)
  try:
    rest = flags.FLAGS(resolve_argv(argv))
    if _config_value(argv) is None:
      raise ConfigError("--config is required, e.g. --config=gmm:quick (collapse-jax --help lists the experiments)")
    cfg = flags.FLAGS["config"].value
    if not isinstance(cfg, ml_collections.ConfigDict):
      # ml_collections keeps a config file's OSError (no such file) for the config's first use: report it now.
      why = str(getattr(cfg, "_error", "get_config() gave no ConfigDict")).strip().splitlines()[-1].strip()
      raise OSError(f"--config={_config_value(argv)}: {why}")
  except (flags.Error, OSError, ValueError, TypeError, AttributeError, KeyError) as e:
    fail(_one_line(e, argv))
  return rest


@contextlib.contextmanager
def one_line_errors():
  """A run's ConfigError (bad value, bad data, a NaN) as `error: MESSAGE` and exit status 2."""
  try:
    yield
  except ConfigError as e:
    fail(str(e))


def start_distributed() -> None:
  """With --jax_distributed, jax.distributed.initialize with the flags given (JAX finds the rest on Cloud TPU
  and SLURM); inconsistent flags end the run with a one-line error. Must come before anything makes a backend."""
  kwargs = distributed_kwargs()
  if kwargs is None:
    return
  import jax
  platforms = (jax.config.jax_platforms or "").split(",")
  if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ and (platforms == [""] or "cpu" in platforms):
    # Cross-process collectives on CPU need an implementation; gloo ships with jaxlib (MPI would need a library).
    # It must be chosen before initialize() creates the backends.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(**kwargs)
  except (ValueError, TypeError, RuntimeError) as e:
    fail(f"--jax_distributed: jax.distributed.initialize failed: {' '.join(str(e).split())[:300]}")


def distributed_kwargs() -> dict | None:
  """jax.distributed.initialize's arguments from the flags (only those given), or None without
  --jax_distributed."""
  given = {h.name: h.value for h in _DISTRIBUTED_FLAGS if h.value is not None}
  if not _DISTRIBUTED.value:
    if given:
      fail(f"--{next(iter(given))} is only used with --jax_distributed")
    return None
  n, p = given.get("num_processes"), given.get("process_id")
  if (n is None) != (p is None):
    fail("--num_processes and --process_id go together (or leave both out for JAX to find them)")
  if n is not None and p >= n:
    fail(f"--process_id={p} must be less than --num_processes={n}")
  if "local_device_ids" in given:
    try:
      given["local_device_ids"] = [int(i) for i in given["local_device_ids"]]
    except ValueError:
      fail(f"--local_device_ids must be comma-separated integers, got {','.join(given['local_device_ids'])!r}")
  return given
