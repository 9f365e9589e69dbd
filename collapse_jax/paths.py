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


def append_bytes(path: str, data: bytes) -> None:
  """Append `data` (local: in place; gs://: objects cannot grow, so read + rewrite the object)."""
  if is_remote(path):
    write_atomic(path, (read_bytes(path) if exists(path) else b"") + data)
    return
  # No fsync: one write() survives a kill of the process (the page cache keeps it); its readers (metrics.jsonl,
  # rebuilt from the checkpoint on every start; TensorBoard event files, read up to the last whole record)
  # tolerate a tail torn by a machine crash.
  with open(path, "ab") as fh:
    fh.write(data)


def append_text(path: str, text: str) -> None:
  append_bytes(path, text.encode("utf-8"))


def remove(path: str) -> None:
  if is_remote(path):
    _epath(path).unlink()
  else:
    os.remove(path)


# --- conditional writes (the workdir lock, lock.py) ---------------------------------------------------------------
# One object or file changed only if it still holds what the caller read: `read_versioned` returns its bytes and
# a version (gs://: the object's generation; local: the bytes themselves), and `replace_if` / `remove_if` act only
# while that version is current. gs:// uses GCS's generation preconditions (ifGenerationMatch; 0: must not exist),
# which the server checks atomically; a local file changes only under an flock on PATH.guard, which the kernel
# releases when its holder dies (NFS emulates it with byte-range locks) and which stays in place: deleting a
# lock file that others may be waiting on would let two of them in.

def _gcs(path: str):
  """(gcsfs filesystem, bucket, object name) of a gs:// URL; these calls need gcsfs itself (its generation
  preconditions), not tf.io.gfile."""
  try:
    import fsspec
    fs = fsspec.filesystem("gs")
  except (ImportError, ValueError):
    raise ConfigError(f"{path}: conditional writes on gs:// need gcsfs: pip install gcsfs") from None
  bucket, _, key = path[len("gs://"):].partition("/")
  return fs, bucket, key


def _gcs_upload(path: str, raw: bytes, generation: str) -> bool:
  """Write the object if its generation is `generation` ("0": absent); False if it is not."""
  fs, bucket, key = _gcs(path)
  try:  # gcsfs's own upload has no ifGenerationMatch other than 0; this is its request with the precondition
    fs.call("POST", f"{fs._location}/upload/storage/v1/b/{bucket}/o", uploadType="media", name=key,
            ifGenerationMatch=generation, data=raw, headers={"Content-Type": "application/octet-stream"})
  except FileExistsError:  # gcsfs's name for 412 Precondition Failed
    return False
  fs.invalidate_cache(path)
  return True


class _Guard:
  """flock on PATH.guard for the duration of a local read-compare-write."""

  def __init__(self, path: str):
    self.path = path + ".guard"

  def __enter__(self):
    import fcntl
    self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(self.fd, fcntl.LOCK_EX)

  def __exit__(self, *exc):
    os.close(self.fd)  # releases the flock


def create_exclusive(path: str, data: str | bytes) -> bool:
  """Create `path` holding `data` unless it exists: True if this call created it. Atomic: of racing callers
  exactly one gets True, and no reader ever sees the file partly written."""
  raw = data.encode("utf-8") if isinstance(data, str) else data
  if is_remote(path):
    return _gcs_upload(path, raw, "0")
  tmp = f"{path}.{uuid.uuid4().hex}.tmp"
  with open(tmp, "wb") as fh:
    fh.write(raw)
    fh.flush()
    os.fsync(fh.fileno())
  try:
    os.link(tmp, path)  # fails if path exists, and shows the file whole
    return True
  except FileExistsError:
    return False
  except OSError:  # no hard links on this filesystem (some FUSE / SMB mounts): O_EXCL, then the content
    try:
      fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "wb") as fh:
      fh.write(raw)
    return True
  finally:
    os.remove(tmp)


def read_versioned(path: str) -> tuple[bytes, object] | None:
  """(bytes, version) of `path`, or None if it does not exist."""
  if is_remote(path):
    fs, _, _ = _gcs(path)
    try:
      headers, raw = fs.call("GET", fs.url(path))
    except FileNotFoundError:
      return None
    return raw, headers["x-goog-generation"]  # of the very bytes returned: one request
  try:
    with open(path, "rb") as fh:
      raw = fh.read()
  except FileNotFoundError:
    return None
  return raw, raw


def replace_if(path: str, data: str | bytes, version) -> bool:
  """Replace `path` with `data` if it still holds `version` (from read_versioned); False if it does not."""
  raw = data.encode("utf-8") if isinstance(data, str) else data
  if is_remote(path):
    return _gcs_upload(path, raw, version)
  with _Guard(path):
    cur = read_versioned(path)
    if cur is None or cur[1] != version:
      return False
    write_atomic(path, raw)
    return True


def remove_if(path: str, version) -> bool:
  """Remove `path` if it still holds `version`; False if it does not (or is gone)."""
  if is_remote(path):
    fs, bucket, key = _gcs(path)
    try:
      fs.call("DELETE", "b/{}/o/{}", bucket, key, ifGenerationMatch=version)
    except (FileExistsError, FileNotFoundError):
      return False
    fs.invalidate_cache(path)
    return True
  with _Guard(path):
    cur = read_versioned(path)
    if cur is None or cur[1] != version:
      return False
    os.remove(path)
    return True


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
