"""The one path layer for every file of a run (config.json, metrics.jsonl, checkpoints/, plots/, samples/): local
paths and gs:// URLs (Google Cloud Storage) alike.

Local paths keep plain `os` semantics (an atomic write is a temp file, fsync and rename). gs:// goes through
etils.epath, the layer Orbax uses for its own files (Orbax writes the arrays through tensorstore's GCS driver):
tf.io.gfile where TensorFlow is installed, else fsspec's gcsfs (`pip install gcsfs`). An object write replaces
the object in one step, so it needs no temp file; object stores have no directories, so `makedirs` does nothing
there and an append rewrites the whole object. Any other scheme (s3://, http://, ...) is a one-line ConfigError,
raised by `check` / `check_workdir` before anything is computed.

A local GCS emulator (tests/test_paths.py) is reached with STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT (gcsfs),
TENSORSTORE_GCS_HTTP_URL=http://127.0.0.1:PORT and GOOGLE_AUTH_TOKEN_FOR_TESTING=any (tensorstore, for Orbax's
arrays), FSSPEC_GCS_TOKEN=anon and GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false (no credential or bucket-type lookups),
EPATH_USE_TF=false (gcsfs even where TensorFlow is installed).
"""
import importlib.util
import io
import os
import re
import uuid

from collapse_jax.errors import ConfigError

SCHEMES = ("gs",)
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def scheme(path) -> str | None:
  """'gs' for gs://bucket/x, None for a local path."""
  m = _URL.match(os.fspath(path))
  return m.group(1) if m else None


def is_remote(path) -> bool:
  return scheme(path) is not None


def check(path, what: str = "--workdir") -> None:
  """A supported scheme whose backend is installed, or a one-line ConfigError naming `what` and the scheme."""
  s = scheme(path)
  if s is None:
    return
  if s not in SCHEMES:
    raise ConfigError(f"{what}={path}: the {s}:// scheme is not supported; use a local path or gs://bucket/path")
  if not path[len(s) + 3:].split("/")[0]:
    raise ConfigError(f"{what}={path}: no bucket name; use gs://bucket/path")
  # epath (and so Orbax) reads gs:// with tf.io.gfile where TensorFlow is installed and allowed, else with gcsfs.
  use_tf = os.environ.get("EPATH_USE_TF", "").lower() not in ("false", "no", "f", "0")
  if importlib.util.find_spec("gcsfs") is None and not (use_tf and importlib.util.find_spec("tensorflow")):
    raise ConfigError(f"{what}={path}: gs:// paths need gcsfs (or TensorFlow's tf.io.gfile): pip install gcsfs")


def _epath(path):
  from etils import epath  # Orbax's dependency; imported only for remote paths
  return epath.Path(path)


def abspath(path: str) -> str:
  """os.path.abspath for local paths; a URL unchanged (abspath would make gs://b/x a local 'gs:/b/x')."""
  return path if is_remote(path) else os.path.abspath(path)


def makedirs(path: str) -> None:
  if not is_remote(path):  # object stores have no directories: writing an object makes its parents
    os.makedirs(path, exist_ok=True)


def exists(path: str) -> bool:
  return _epath(path).exists() if is_remote(path) else os.path.exists(path)


def listdir(path: str) -> list[str]:
  """Sorted names in a directory (for gs://, the next component of every object under the prefix)."""
  if is_remote(path):
    p = _epath(path)
    return sorted(c.name for c in p.iterdir()) if p.exists() else []
  return sorted(os.listdir(path))


def read_bytes(path: str) -> bytes:
  if is_remote(path):
    return _epath(path).read_bytes()
  with open(path, "rb") as fh:
    return fh.read()


def read_text(path: str) -> str:
  return read_bytes(path).decode("utf-8")


def write_atomic(path: str, data: str | bytes) -> None:
  """Replace `path` whole, so a crash never leaves a half-written file (local: temp + fsync + rename; gs://: one
  object upload, which is atomic)."""
  raw = data.encode("utf-8") if isinstance(data, str) else data
  if is_remote(path):
    _epath(path).write_bytes(raw)
    return
  tmp = path + ".tmp"
  with open(tmp, "wb") as fh:
    fh.write(raw)
    fh.flush()
    os.fsync(fh.fileno())
  os.replace(tmp, path)


def append_text(path: str, text: str) -> None:
  """Append `text` (local: in place; gs://: objects cannot grow, so read + rewrite the object)."""
  if is_remote(path):
    write_atomic(path, (read_text(path) if exists(path) else "") + text)
    return
  # No fsync: one write() of whole lines survives a kill of the process (the page cache keeps it), and the
  # metrics.jsonl it serves is rebuilt from the checkpoint on every start (metrics.sync_jsonl) after a crash.
  with open(path, "a", encoding="utf-8") as fh:
    fh.write(text)


def remove(path: str) -> None:
  if is_remote(path):
    _epath(path).unlink()
  else:
    os.remove(path)


def _files(p):
  for c in p.iterdir():
    if c.is_dir():
      yield from _files(c)
    else:
      yield c


def rename(src: str, dst: str) -> None:
  """Move a file or directory. gs:// has no rename: every object under `src` is copied, then deleted (by hand:
  gcsfs's move tries an API that not every endpoint has, and tf.io.gfile cannot rename directories on GCS)."""
  if not is_remote(src):
    os.replace(src, dst)
    return
  s, d = _epath(src), _epath(dst)
  if d.exists():
    raise FileExistsError(f"{dst} already exists")
  files = [s] if s.is_file() else list(_files(s))
  for f in files:
    f.copy(d if f == s else d / f.relative_to(s))
  for f in files:
    f.unlink()


def _format(path: str) -> str:
  return os.path.splitext(path)[1][1:].lower() or "png"


def savefig(fig, path: str, **kwargs) -> None:
  """fig.savefig(path), atomically (through an in-memory buffer): a figure is rewritten as a run goes, and a kill
  mid-write must leave the previous one."""
  buf = io.BytesIO()
  fig.savefig(buf, format=_format(path), **kwargs)
  write_atomic(path, buf.getvalue())


def imsave(path: str, arr, **kwargs) -> None:
  """matplotlib's plt.imsave(path, arr), atomically like savefig."""
  import matplotlib.pyplot as plt
  buf = io.BytesIO()
  plt.imsave(buf, arr, format=_format(path), **kwargs)
  write_atomic(path, buf.getvalue())


def _one_line(e: Exception) -> str:
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  return (lines[0] if lines else type(e).__name__)[:300]


def check_workdir(workdir: str) -> None:
  """The workdir must be a supported path that exists or can be created, and be writable; checked before
  anything is computed."""
  if not workdir:
    raise ConfigError("--workdir is required")
  check(workdir)
  # A probe per process: every process of a multi-process run checks the same (shared) workdir at once.
  probe = os.path.join(workdir, f".write_probe-{uuid.uuid4().hex[:12]}")
  if is_remote(workdir):
    try:
      write_atomic(probe, "ok")
      remove(probe)
    except Exception as e:  # gcsfs / gfile raise many types (auth, missing bucket, HTTP); all mean "not usable"
      raise ConfigError(f"workdir {workdir} is not writable: {_one_line(e)}") from None
    return
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise ConfigError(f"workdir {workdir} cannot be created: {e.strerror}") from None
  if not os.path.isdir(workdir):
    raise ConfigError(f"workdir {workdir} is not a directory")
  try:
    with open(probe, "w") as fh:
      fh.write("ok")
    os.remove(probe)
  except OSError as e:
    raise ConfigError(f"workdir {workdir} is not writable: {e.strerror}") from None
