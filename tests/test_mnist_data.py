"""collapse_jax.families.vae.data: every source offline, on files the tests write (no real MNIST needed)."""
import gzip
import io
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

from collapse_jax.families.vae import data as mnist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def idx_bytes(images: np.ndarray, magic: int = 0x00000803) -> bytes:
  n, rows, cols = images.shape[:3]
  return struct.pack(">4I", magic, n, rows, cols) + images.astype(np.uint8).tobytes()


def label_bytes(labels: np.ndarray) -> bytes:
  return struct.pack(">2I", 0x00000801, len(labels)) + labels.astype(np.uint8).tobytes()


def random_images(n: int, seed: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)


# --- source / split / limit checks ---------------------------------------------------------------------------------


def test_unknown_source_and_split_name_the_field():
  with pytest.raises(mnist.DataError, match=r"config\.vae\.data .*'cifar'"):
    mnist.load("cifar")
  with pytest.raises(mnist.DataError, match=r"config\.vae\.split .*'validation'"):
    mnist.load("digits", "validation")
  with pytest.raises(mnist.DataError, match=r"config\.vae\.data"):
    mnist.describe("mnist")
  with pytest.raises(mnist.DataError, match="limit"):
    mnist.load("digits", limit=-1)
  assert issubclass(mnist.DataError, ValueError)


def test_describe_labels():
  assert "STAND-IN" in mnist.describe("digits", "train") and "not MNIST" in mnist.describe("digits", "test")
  assert mnist.describe("idx", "test", "/d") == "MNIST t10k from IDX files at /d"
  assert mnist.describe("idx", "train", "/d") == "MNIST train from IDX files at /d"
  assert mnist.describe("tfds", "train", "/tf").startswith("MNIST train via tfds") and "/tf" in mnist.describe(
      "tfds", "train", "/tf")


def test_import_pulls_in_no_optional_dependency():
  code = ("import sys; import collapse_jax.families.vae.data; "
          "print([m for m in ('tensorflow_datasets', 'sklearn', 'tensorflow') if m in sys.modules])")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                       env=dict(os.environ, PYTHONPATH=REPO))
  assert out.stdout.strip() == "[]"


def test_as_float():
  x = np.array([[0, 51, 255]], np.uint8)
  y = mnist.as_float(x)
  assert y.dtype == np.float32
  np.testing.assert_allclose(y, [[0.0, 0.2, 1.0]], rtol=1e-6)  # one float32 division: <= u = 6e-8 relative
  with pytest.raises(TypeError, match="uint8"):
    mnist.as_float(y)


# --- idx -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, gz):
  train, test = random_images(7, 0), random_images(3, 1)
  for name, images in (("train-images-idx3-ubyte", train), ("t10k-images-idx3-ubyte", test)):
    data = idx_bytes(images)
    (tmp_path / (name + (".gz" if gz else ""))).write_bytes(gzip.compress(data) if gz else data)
  # A label file beside them must not be mistaken for the images.
  (tmp_path / "train-labels-idx1-ubyte").write_bytes(label_bytes(np.arange(7)))
  got = mnist.load("idx", "train", str(tmp_path))
  assert got.dtype == np.uint8 and got.shape == (7, 28, 28, 1) and got.flags.writeable
  np.testing.assert_array_equal(got, train)
  np.testing.assert_array_equal(mnist.load("idx", "test", str(tmp_path)), test)
  np.testing.assert_array_equal(mnist.load("idx", "train", str(tmp_path), limit=2), train[:2])
  np.testing.assert_array_equal(mnist.load("idx", "train", str(tmp_path), limit=100), train)


def test_idx_gzip_told_by_content(tmp_path):
  # A gzipped file under the plain name (a download saved without its .gz) still reads.
  images = random_images(2, 2)
  (tmp_path / "train-images-idx3-ubyte").write_bytes(gzip.compress(idx_bytes(images)))
  np.testing.assert_array_equal(mnist.load("idx", "train", str(tmp_path)), images)


def _expect_error_naming(path, pattern):
  with pytest.raises(mnist.DataError, match=pattern) as e:
    mnist.load("idx", "train", str(path.parent))
  assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_idx_truncated_plain(tmp_path):
  path = tmp_path / "train-images-idx3-ubyte"
  path.write_bytes(idx_bytes(random_images(4, 3))[:-10])
  _expect_error_naming(path, "truncated")


def test_idx_trailing_bytes(tmp_path):
  path = tmp_path / "train-images-idx3-ubyte"
  path.write_bytes(idx_bytes(random_images(4, 3)) + b"\0")
  _expect_error_naming(path, "corrupt")


def test_idx_truncated_header(tmp_path):
  path = tmp_path / "train-images-idx3-ubyte"
  path.write_bytes(idx_bytes(random_images(1, 3))[:9])
  _expect_error_naming(path, "truncated")


def test_idx_truncated_gzip(tmp_path):
  path = tmp_path / "train-images-idx3-ubyte.gz"
  data = gzip.compress(idx_bytes(random_images(4, 4)))
  path.write_bytes(data[:len(data) // 2])
  _expect_error_naming(path, "corrupt or truncated")


def test_idx_damaged_gzip(tmp_path):
  path = tmp_path / "train-images-idx3-ubyte.gz"
  data = bytearray(gzip.compress(idx_bytes(random_images(4, 5))))
  data[-8] ^= 0xFF  # the CRC
  path.write_bytes(bytes(data))
  _expect_error_naming(path, "corrupt or truncated")


def test_idx_wrong_magic_and_shape(tmp_path):
  path = tmp_path / "train-images-idx3-ubyte"
  path.write_bytes(label_bytes(np.arange(10)))
  _expect_error_naming(path, "label file")
  path.write_bytes(idx_bytes(np.zeros((2, 32, 32), np.uint8)))
  _expect_error_naming(path, "32x32")


def test_idx_missing(tmp_path):
  missing = r"no MNIST IDX file t10k-images-idx3-ubyte\[\.gz\] in .*MNIST site.*digits"
  with pytest.raises(mnist.DataError, match=missing):
    mnist.load("idx", "test", str(tmp_path))
  with pytest.raises(mnist.DataError, match=r"no directory .*nowhere.*MNIST site"):
    mnist.load("idx", "train", str(tmp_path / "nowhere"))
  with pytest.raises(mnist.DataError, match=r"config\.vae\.data_dir"):
    mnist.load("idx", "train", None)


# --- digits ----------------------------------------------------------------------------------------------------------


def test_digits_shape_range_layout_determinism():
  train, test = mnist.load("digits", "train"), mnist.load("digits", "test")
  assert train.shape == (mnist.DIGITS_TRAIN, 28, 28, 1) and test.shape == (1797 - mnist.DIGITS_TRAIN, 28, 28, 1)
  assert train.dtype == np.uint8 and test.dtype == np.uint8
  assert train.min() == 0 and train.max() == 255 and 20 < train.mean() < 80
  # MNIST's layout: ink only in the central 20x20 box.
  assert not train[:, :4].any() and not train[:, 24:].any() and not train[:, :, :4].any() and not train[:, :, 24:].any()
  np.testing.assert_array_equal(train, mnist.load("digits", "train"))
  np.testing.assert_array_equal(mnist.load("digits", "train", limit=5), train[:5])


def test_digits_split_is_disjoint_and_complete():
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  train, test = mnist.load("digits", "train"), mnist.load("digits", "test")
  seen = {x.tobytes() for x in train}
  assert not any(x.tobytes() in seen for x in test)
  np.testing.assert_array_equal(np.concatenate([train, test]), mnist._digits_to_mnist(load_digits().images))


def test_digits_resize_keeps_values():
  # Constant images stay constant inside the box, nothing leaks outside it, and a step edge stays a monotone ramp.
  full = mnist._digits_to_mnist(np.full((1, 8, 8), 16.0))
  assert (full[0, 4:24, 4:24] == 255).all() and full.sum() == 255 * 400
  quarter = mnist._digits_to_mnist(np.full((1, 8, 8), 4.0))
  assert (quarter[0, 4:24, 4:24] == 64).all()
  step = np.zeros((1, 8, 8))
  step[:, :, 4:] = 16.0
  rows = mnist._digits_to_mnist(step)[0, 4:24, 4:24, 0].astype(int)
  assert (rows == rows[0]).all() and (np.diff(rows[0]) >= 0).all() and rows[0, 0] == 0 and rows[0, -1] == 255
  assert 0 < rows[0, 9] < 255 or 0 < rows[0, 10] < 255  # blended at the edge, not nearest-neighbour


# --- tfds ------------------------------------------------------------------------------------------------------------


@pytest.fixture
def tfds():
  return pytest.importorskip("tensorflow_datasets")


@pytest.fixture
def offline_can_prepare(monkeypatch):
  """Pretends this machine could prepare MNIST, so that the tfds mock's no-op preparation is reached."""
  monkeypatch.setattr(mnist, "_has_tensorflow", lambda: True)
  monkeypatch.setattr(mnist, "_online", lambda: True)


def test_tfds_mock_data(tfds, tmp_path, offline_can_prepare):
  with tfds.testing.mock_data(num_examples=6):
    x = mnist.load("tfds", "train", str(tmp_path))
    assert x.shape == (6, 28, 28, 1) and x.dtype == np.uint8 and x.any()
    np.testing.assert_array_equal(mnist.load("tfds", "train", str(tmp_path), limit=4), x[:4])
    assert mnist.load("tfds", "test", None, limit=2).shape == (2, 28, 28, 1)


def _forbid_download(monkeypatch, tfds):
  def fail(*args, **kwargs):
    raise AssertionError("tfds.data_source must not be called when MNIST cannot be prepared")
  monkeypatch.setattr(tfds, "data_source", fail)


def test_tfds_missing_without_network_fails_fast(tfds, tmp_path, monkeypatch):
  monkeypatch.setattr(mnist, "_has_tensorflow", lambda: True)
  monkeypatch.setattr(mnist, "_online", lambda: False)
  _forbid_download(monkeypatch, tfds)
  how = r"not prepared in .*cannot reach.*tfds build mnist --file_format=array_record"
  with pytest.raises(mnist.DataError, match=how):
    mnist.load("tfds", "train", str(tmp_path))


def test_tfds_missing_without_tensorflow(tfds, tmp_path, monkeypatch):
  monkeypatch.setattr(mnist, "_has_tensorflow", lambda: False)
  monkeypatch.setattr(mnist, "_online", lambda: pytest.fail("no probe needed: TensorFlow is missing"))
  _forbid_download(monkeypatch, tfds)
  with pytest.raises(mnist.DataError, match=r"needs TensorFlow.*tfds build mnist.*idx / digits"):
    mnist.load("tfds", "test", str(tmp_path))


def test_online_probe_is_fast_and_honours_proxies(monkeypatch):
  for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
    monkeypatch.delenv(var, raising=False)
  with socket.socket() as s:  # a port that was free a moment ago: connecting is refused at once
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  monkeypatch.setattr(mnist, "_PROBE", ("127.0.0.1", port))
  start = time.monotonic()
  assert mnist._online() is False
  assert time.monotonic() - start < 3
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    monkeypatch.setattr(mnist, "_PROBE", s.getsockname())
    assert mnist._online() is True
  monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
  assert mnist._online() is True


@pytest.fixture
def prepared_dir(tfds, tmp_path, monkeypatch):
  """A real array_record MNIST copy in tmp_path, built offline and without TensorFlow from small arrays.

  tfds's MNIST builder downloads, reads with tf.io.gfile and encodes PNGs with tf.image; those three steps are
  swapped for local arrays and PIL. Everything that tfds.data_source later reads is tfds's own format.
  """
  mnist_builder = pytest.importorskip("tensorflow_datasets.image_classification.mnist")
  image_feature = pytest.importorskip("tensorflow_datasets.core.features.image_feature")
  pil = pytest.importorskip("PIL.Image")
  arrays = {"train": (random_images(9, 10), np.arange(9) % 10), "test": (random_images(5, 11), np.arange(5) % 10)}

  def split_generators(self, dl_manager):
    del self, dl_manager
    return [tfds.core.SplitGenerator(name=s, gen_kwargs={"num_examples": len(arrays[s][0]), "data_path": s,
                                                         "label_path": s}) for s in arrays]

  def encode_png(self, image):
    del self
    buf = io.BytesIO()
    pil.fromarray(image[..., 0]).save(buf, format="PNG")
    return buf.getvalue()

  with monkeypatch.context() as m:
    m.setattr(mnist_builder.MNIST, "_split_generators", split_generators)
    m.setattr(mnist_builder, "_extract_mnist_images", lambda split, n: arrays[split][0])
    m.setattr(mnist_builder, "_extract_mnist_labels", lambda split, n: arrays[split][1].astype(np.int64))
    m.setattr(image_feature._ImageEncoder, "_encode_image", encode_png)
    builder = tfds.builder("mnist", data_dir=str(tmp_path), file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return tmp_path, {s: a[0] for s, a in arrays.items()}


def _sorted(images):
  return sorted(x.tobytes() for x in images)


def test_tfds_reads_prepared_copy(tfds, prepared_dir, monkeypatch):
  data_dir, arrays = prepared_dir
  monkeypatch.setattr(mnist, "_online", lambda: pytest.fail("a prepared copy needs no network"))
  for split in ("train", "test"):
    x = mnist.load("tfds", split, str(data_dir))
    assert x.shape == arrays[split].shape and x.dtype == np.uint8
    # tfds shuffles records when it prepares them: the same images, in its own (fixed) order.
    assert _sorted(x) == _sorted(arrays[split])
  x = mnist.load("tfds", "train", str(data_dir))
  np.testing.assert_array_equal(mnist.load("tfds", "train", str(data_dir), limit=3), x[:3])


def test_tfds_tfrecord_copy_is_refused_with_the_fix(tfds, prepared_dir, monkeypatch):
  data_dir, _ = prepared_dir
  # Relabel the copy as TFRecord, what `tfds build mnist` writes unless told otherwise.
  version_dir = next((data_dir / "mnist").iterdir())
  info_path = version_dir / "dataset_info.json"
  info = json.loads(info_path.read_text())
  info["fileFormat"] = "tfrecord"
  info_path.write_text(json.dumps(info))
  for f in list(version_dir.iterdir()):
    if ".array_record-" in f.name:
      shutil.move(f, version_dir / f.name.replace(".array_record-", ".tfrecord-"))
  _forbid_download(monkeypatch, tfds)
  with pytest.raises(mnist.DataError, match=r"prepared as tfrecord.*convert_format.*--file_format=array_record"):
    mnist.load("tfds", "train", str(data_dir))


def test_split_slices_partition_one_file(tmp_path):
  """'test[:k]' and 'test[k:]' are disjoint and together the whole split. The slice is taken after any
  source has loaded its split, so the digits source stands for all three here; describe() names the rows."""
  full = mnist.load("digits", "test")
  head, tail = mnist.load("digits", "test[:100]"), mnist.load("digits", "test[100:]")
  assert head.shape[0] == 100 and tail.shape[0] == full.shape[0] - 100
  np.testing.assert_array_equal(np.concatenate([head, tail]), full)
  assert mnist.load("digits", "test[10:20]", limit=3).shape[0] == 3
  assert "rows [:100]" in mnist.describe("idx", "test[:100]", "/d")
  with pytest.raises(mnist.DataError, match=r"config\.vae\.split .*got 'test\[a:\]'"):
    mnist.load("digits", "test[a:]")
