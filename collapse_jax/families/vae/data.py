"""MNIST images for the VAE experiment, as a host array uint8 [N, 28, 28, 1] with pixel values 0..255.

Sources (config.vae.data), splits "train" and "test", optionally sliced as "test[:8000]" (config.vae.split):
  tfds    The real data set through `tfds.data_source("mnist")`. It reads a copy prepared as array_record (or
          parquet) in data_dir (default $TFDS_DATA_DIR, else ~/tensorflow_datasets) without TensorFlow. Where no
          copy is prepared, it prepares one, which needs TensorFlow (tfds encodes the images with tf.image) and
          network access: both are checked first, because tfds otherwise retries a failed download for minutes.
  idx     The files from the MNIST site in data_dir: train-images-idx3-ubyte or t10k-images-idx3-ubyte, plain or
          gzipped (only the image files are read; the VAE needs no labels).
  digits  The offline default, no download: scikit-learn's bundled 1797 8x8 digits (values 0..16), scaled to
          0..255, resized bilinearly to 20x20 and centred in 28x28, as MNIST's size-normalised digits are (MNIST
          centres by centre of mass; this centres the box). "train" is the first 1500 images, "test" the last 297
          (every class 27..33 times), so a test ELBO is measured on images the model never saw. It is not MNIST,
          and describe() says so in every output that uses it.

A data set that cannot be read raises DataError with a one-line message that says how to get it.
tensorflow_datasets and scikit-learn are imported only by the source that needs them: both are optional.
"""
import gzip
import importlib.util
import os
import re
import socket
import struct
import threading
import zlib

import numpy as np

from collapse_jax.errors import ConfigError

SOURCES = ("tfds", "idx", "digits")
SPLITS = ("train", "test")
DIGITS_TRAIN = 1500   # digits images 0..1499 are "train", 1500..1796 "test"
SIDE = 28

_IDX_NAMES = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}
_IDX_MAGIC = 0x00000803   # unsigned bytes, 3 dimensions
_IDX_LABEL_MAGIC = 0x00000801
_IDX_HOW = "download the four files from the MNIST site, or use --config.vae.data=tfds / digits"
# Where tfds fetches MNIST from (the cvdf mirror and the prepared-data bucket both live there).
_PROBE = ("storage.googleapis.com", 443)
_PROBE_TIMEOUT_S = 5.0


class DataError(ConfigError):
  """A data set that cannot be read as asked; the message fits on one line and says how to get it."""


_SLICE = re.compile(r"^(\w+)\[(-?\d*):(-?\d*)\]$")


def parse_split(split: str) -> tuple[str, slice]:
  """'test' or tfds-style 'test[:8000]' / 'test[8000:]' -> ('test', slice). Slices let one file serve as
  both training and held-out data (e.g. only MNIST's t10k file at hand)."""
  m = _SLICE.match(split) if isinstance(split, str) else None
  if m:
    lo, hi = (int(v) if v else None for v in m.group(2, 3))
    return m.group(1), slice(lo, hi)
  return split, slice(None)


def _check(source, split):
  if source not in SOURCES:
    raise DataError(f"config.vae.data must be one of {', '.join(SOURCES)}, got {source!r}")
  name, _ = parse_split(split)
  if name not in SPLITS:
    raise DataError(f"config.vae.split must be one of {', '.join(SPLITS)} (optionally sliced, e.g. test[:8000]), "
                    f"got {split!r}")


def _tfds_dir(data_dir):
  return os.path.expanduser(data_dir) if data_dir else (os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")


def describe(source: str, split: str = "train", data_dir: str | None = None) -> str:
  """A one-line label for outputs. Checks source and split (cheaply: nothing is read)."""
  _check(source, split)
  name, sl = parse_split(split)
  rows = "" if sl == slice(None) else f" rows [{'' if sl.start is None else sl.start}:{'' if sl.stop is None else sl.stop}]"
  if source == "tfds":
    return f"MNIST {name}{rows} via tfds ({_tfds_dir(data_dir)})"
  if source == "idx":
    return f"MNIST {_IDX_NAMES[name].split('-')[0]}{rows} from IDX files at {data_dir}"
  part = f"images 0..{DIGITS_TRAIN - 1}" if name == "train" else f"images {DIGITS_TRAIN}.. (held out)"
  return f"OFFLINE STAND-IN: scikit-learn 8x8 digits resized to 28x28 (not MNIST), {name} split = {part}{rows}"


def load(source: str, split: str = "train", data_dir: str | None = None, limit: int = 0) -> np.ndarray:
  """Images uint8 [N, 28, 28, 1], 0..255, in the source's own order. limit > 0 keeps the first `limit` of them
  (all of them where there are fewer)."""
  _check(source, split)
  if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 0:
    raise DataError(f"limit must be a non-negative integer, got {limit!r}")
  split, rows = parse_split(split)
  if source == "tfds":
    x = _load_tfds(split, data_dir, int(limit) if rows == slice(None) else 0)
  elif source == "idx":
    x = _read_idx(_find_idx(split, data_dir))
  else:
    x = _load_digits(split)
  x = x[rows]
  if limit:
    x = x[:limit]
  return np.ascontiguousarray(x)


def as_float(x: np.ndarray) -> np.ndarray:
  """uint8 0..255 -> float32 in [0, 1]. Refuses anything else, so already-scaled data is not divided twice."""
  if x.dtype != np.uint8:
    raise TypeError(f"as_float expects uint8 images (0..255), got {x.dtype}")
  return np.asarray(x, np.float32) * np.float32(1.0 / 255.0)


# --- idx ---------------------------------------------------------------------------------------------------------


def _find_idx(split, data_dir) -> str:
  if not data_dir:
    raise DataError("config.vae.data=idx needs config.vae.data_dir, the directory holding the MNIST IDX files")
  d = os.path.expanduser(data_dir)
  name = _IDX_NAMES[split]
  if not os.path.isdir(d):
    raise DataError(f"no directory {d} (config.vae.data_dir) for MNIST IDX file {name}[.gz]; {_IDX_HOW}")
  # Some mirrors spell the name with a dot (train-images.idx3-ubyte); accept it silently.
  dotted = name.replace("-idx3", ".idx3")
  for candidate in (name, name + ".gz", dotted, dotted + ".gz"):
    path = os.path.join(d, candidate)
    if os.path.isfile(path):
      return path
  raise DataError(f"no MNIST IDX file {name}[.gz] in {d}; {_IDX_HOW}")


def _read_idx(path: str) -> np.ndarray:
  """Parses an IDX image file, plain or gzipped (told apart by content, not by name)."""
  try:
    with open(path, "rb") as f:
      raw = f.read()
    if raw[:2] == b"\x1f\x8b":
      raw = gzip.decompress(raw)
  except (OSError, EOFError, zlib.error) as e:  # a cut gzip stream raises EOFError, a damaged one BadGzipFile/zlib
    raise DataError(f"cannot read MNIST IDX file {path} (corrupt or truncated?): {e}") from None
  if len(raw) < 16:
    raise DataError(f"MNIST IDX file {path} is truncated: {len(raw)} bytes, shorter than its 16-byte header")
  magic, n, rows, cols = struct.unpack(">4I", raw[:16])
  if magic != _IDX_MAGIC:
    hint = " (that of a label file)" if magic == _IDX_LABEL_MAGIC else ""
    raise DataError(f"{path} is not an MNIST image IDX file: magic 0x{magic:08x}{hint}, expected 0x{_IDX_MAGIC:08x}")
  if (rows, cols) != (SIDE, SIDE) or n == 0:
    raise DataError(f"MNIST IDX file {path} holds {n} images of {rows}x{cols}; expected some of {SIDE}x{SIDE}")
  want = 16 + n * rows * cols
  if len(raw) != want:
    what = "truncated" if len(raw) < want else "corrupt (trailing bytes)"
    raise DataError(f"MNIST IDX file {path} is {what}: its header says {n} images ({want} bytes), it has {len(raw)}")
  # A copy: frombuffer over bytes is read-only, and callers may write into the array.
  return np.frombuffer(raw, np.uint8, count=n * rows * cols, offset=16).reshape(n, rows, cols, 1).copy()


# --- digits ------------------------------------------------------------------------------------------------------


def _resize_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] bilinear weights with half-pixel centres (jax.image.resize "linear" when upsampling)."""
  src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
  lo = np.floor(src).astype(int)
  hi = np.minimum(lo + 1, n_in - 1)
  w = src - lo
  m = np.zeros((n_out, n_in))
  np.add.at(m, (np.arange(n_out), lo), 1 - w)
  np.add.at(m, (np.arange(n_out), hi), w)
  return m


def _digits_to_mnist(images: np.ndarray) -> np.ndarray:
  """[N, 8, 8] values 0..16 -> uint8 [N, 28, 28, 1]: the digit fills the central 20x20, MNIST's layout."""
  box = 20
  m = _resize_matrix(images.shape[-1], box)
  scaled = np.einsum("oi,nij,pj->nop", m, np.asarray(images, np.float64) * (255.0 / 16.0), m)
  out = np.zeros((len(images), SIDE, SIDE, 1), np.uint8)
  pad = (SIDE - box) // 2
  out[:, pad:pad + box, pad:pad + box, 0] = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
  return out


def _load_digits(split: str) -> np.ndarray:
  try:
    from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise DataError("config.vae.data=digits needs scikit-learn (pip install scikit-learn), "
                    "or use --config.vae.data=tfds / idx") from None
  images = load_digits().images
  images = images[:DIGITS_TRAIN] if split == "train" else images[DIGITS_TRAIN:]
  return _digits_to_mnist(images)


# --- tfds --------------------------------------------------------------------------------------------------------


def _has_tensorflow() -> bool:
  return importlib.util.find_spec("tensorflow") is not None


def _online() -> bool:
  """Whether tfds could download MNIST, found out in seconds."""
  # Behind a proxy a direct connection proves nothing; trust the proxy and let the download tell.
  if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
    return True
  reached = []

  def probe():
    try:
      socket.create_connection(_PROBE, timeout=_PROBE_TIMEOUT_S).close()
      reached.append(True)
    except OSError:
      pass

  # A thread, because name resolution has no timeout of its own; a hung lookup is left behind as a daemon.
  t = threading.Thread(target=probe, daemon=True)
  t.start()
  t.join(_PROBE_TIMEOUT_S + 1)
  return bool(reached)


def _tfds_how(where: str) -> str:
  return (f"run `tfds build mnist --file_format=array_record --data_dir={where}` on a machine with network and "
          "TensorFlow and copy that directory here (config.vae.data_dir), or use --config.vae.data=idx / digits")


def _load_tfds(split: str, data_dir: str | None, limit: int) -> np.ndarray:
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise DataError("config.vae.data=tfds needs tensorflow-datasets and importlib_resources "
                    "(pip install 'collapse_jax[data]'), or use --config.vae.data=idx / digits") from None
  data_dir = os.path.expanduser(data_dir) if data_dir else None
  where = _tfds_dir(data_dir)
  # Built without a file format, so that it takes the one of a copy already prepared; naming array_record here
  # would fail on a TFRecord copy with a confusing "file format is already set".
  builder = tfds.builder("mnist", data_dir=data_dir)
  if builder.is_prepared():
    fmt = builder.info.file_format or tfds.core.FileFormat.TFRECORD
    if fmt not in tfds.core.FileFormat.with_random_access():
      raise DataError(
          f"MNIST in {builder.data_dir} is prepared as {fmt.value}, which tfds.data_source cannot read; convert it "
          f"(`tfds convert_format --dataset_version_dir={builder.data_dir} --out_file_format=array_record`) or "
          f"rebuild it (`tfds build mnist --file_format=array_record`), or use --config.vae.data=idx / digits")
    kwargs = {"download": False, "builder_kwargs": {"file_format": fmt.value}}
  else:
    if not _has_tensorflow():
      raise DataError(f"MNIST is not prepared in {where}, and preparing it through tfds needs TensorFlow, which is "
                      f"not installed; {_tfds_how(where)}")
    if not _online():
      raise DataError(f"MNIST is not prepared in {where}, and this machine cannot reach {_PROBE[0]} to download "
                      f"it; {_tfds_how(where)}")
    # array_record named explicitly: with a data_dir given, tfds would otherwise prepare TFRecord, which
    # tfds.data_source then refuses to read.
    kwargs = {"download": True, "builder_kwargs": {"file_format": "array_record"}}
  try:
    ds = tfds.data_source("mnist", split=split, data_dir=data_dir, **kwargs)
  except (OSError, ImportError) as e:
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise DataError(f"tfds could not prepare MNIST in {where} ({first}); {_tfds_how(where)}") from None
  n = min(limit, len(ds)) if limit else len(ds)
  out = np.empty((n, SIDE, SIDE, 1), np.uint8)
  # One record at a time: each one decodes a PNG; a batched __getitems__ is no faster and fails under
  # tfds.testing.mock_data.
  for i in range(n):
    image = np.asarray(ds[i]["image"])
    if image.shape != (SIDE, SIDE, 1) or image.dtype != np.uint8:
      raise DataError(f"tfds MNIST in {where} yields images {image.shape} {image.dtype}; expected (28, 28, 1) uint8")
    out[i] = image
  return out
