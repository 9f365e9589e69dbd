"""The project's errors: imported by every layer, importing nothing of the project (so nothing imports in a
circle through them)."""


class ConfigError(ValueError):
  """A bad config value or path; the message names it (`config.a.b`) and fits on one line. The CLI prints it as
  `error: ...` and exits 2."""


class NonFiniteError(ConfigError):
  """A loss or metric became NaN or infinite. A ConfigError so that the CLI reports it as one line and exits 2;
  the run's checkpoints end before the bad chunk (loop.py)."""
