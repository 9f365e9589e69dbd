"""Entry point: python -m collapse_jax.main --config=configs/gmm.py --workdir=DIR [--config.field=value ...]"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:arg]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: config.json, metrics.jsonl, checkpoints/, plots/.")
_DISTRIBUTED = flags.DEFINE_bool("jax_distributed", False,
                                 "Call jax.distributed.initialize() first (multi-host TPU slices, SLURM).")


def _fail(msg: str):
  print(f"error: {msg}", file=sys.stderr)
  sys.exit(2)


def _parse(argv):
  """absl's parser, with bad flags and config overrides reported as one line instead of a traceback."""
  try:
    rest = flags.FLAGS(argv)
    if _CONFIG.value is None:
      raise ValueError("--config is required, e.g. --config=configs/gmm.py")
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


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO; the loop prints its own progress
  if _DISTRIBUTED.value:
    import jax
    jax.distributed.initialize()
  from collapse_jax import loop  # after flag parsing, so --help and flag errors do not pay JAX's import
  from collapse_jax.config import ConfigError
  try:
    loop.run(_CONFIG.value, _WORKDIR.value)
  except ConfigError as e:
    _fail(str(e))


def run():
  app.run(main, flags_parser=_parse)


if __name__ == "__main__":
  run()
