"""collapse_jax.families.lm.text, offline: rows and blocks against hand-built ones, the token cache (reuse, keys,
corruption, atomic writes), error paths, and the tfds / Hugging Face datasets sources mocked. Tokenizers:
tests/test_tokenizer.py."""
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from collapse_jax.errors import ConfigError
from collapse_jax.families.lm import text
from collapse_jax.families.lm import tokenizer as tok_lib
from tests.toy_text import FIXTURES, TOY, one_line_error, toy_corpus

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def expected_bytes_stream(body: str, blank_to_empty: bool = True) -> list[int]:
  """The bytes tokenizer's ids of a file, built by hand: per line, </s> (256) then its UTF-8 bytes."""
  out = []
  for line in body.split("\n")[:-1]:
    line = "" if blank_to_empty and not line.strip() else line + "\n"
    out += [256, *line.encode("utf-8")]
  return out


# --- rows and blocks -------------------------------------------------------------------------------------------


def test_split_lines_by_hand():
  body = "a\n\n  \nb\r\nc\rd\u2028e\x0cf"
  assert text.split_lines(body, blank_to_empty=True) == ["a\n", "", "", "b\n", "c\n", "d\u2028e\x0cf"]
  assert text.split_lines(body, blank_to_empty=False) == ["a\n", "\n", "  \n", "b\n", "c\n", "d\u2028e\x0cf"]
  assert text.split_lines("x\n", True) == ["x\n"] and text.split_lines("", True) == []


def test_group_texts_by_hand():
  rows = [[2, 10, 11], [2], [2, 12, 13, 14]]
  np.testing.assert_array_equal(text.group_texts(rows, 3), [[2, 10, 11], [2, 2, 12]])  # 13, 14 dropped
  np.testing.assert_array_equal(text.group_texts(rows, 4), [[2, 10, 11, 2], [2, 12, 13, 14]])
  assert text.group_texts(rows, 9).shape == (0, 9) and text.group_texts(rows, 3).dtype == np.int32


def test_wikitext_splits_as_hand_built_blocks(tmp_path):
  src = text.wikitext(toy_corpus(tmp_path))
  tok = text.tokenizer_for("bytes")
  got = text.load_splits(src, tok, block_len=16)
  assert set(got) == {"train", "valid", "test"}
  for split, body in TOY.items():
    ids = expected_bytes_stream(body)
    n = len(ids) // 16
    assert got[split].dtype == np.int32 and got[split].shape == (n, 16)
    np.testing.assert_array_equal(got[split], np.asarray(ids[:n * 16]).reshape(n, 16))
  assert text.load_blocks(src, "train", tok).shape[1] == text.DEFAULT_BLOCK_LEN == 64
  assert text.read_rows(src, "valid")[:3] == ["", " = Homarus gammarus = \n", ""]


@pytest.mark.parametrize("names", ["wiki.{}.tokens", "{}.txt"])
def test_wikitext_other_file_names(tmp_path, names):
  toy_corpus(tmp_path, names)
  got = text.load_blocks(text.wikitext(str(tmp_path)), "valid", text.tokenizer_for("bytes"), 8)
  ids = expected_bytes_stream(TOY["valid"])
  np.testing.assert_array_equal(got.reshape(-1), ids[:len(got) * 8])
  # The raw file wins where several versions lie side by side.
  (tmp_path / "wiki.valid.raw").write_text(" Other text , long enough for a block .\n")
  np.testing.assert_array_equal(text.load_blocks(text.wikitext(str(tmp_path)), "valid", text.tokenizer_for("bytes"),
                                                 8).reshape(-1)[:8], [256, *b" Other "])


def test_files_source_keeps_order_and_blank_lines(tmp_path):
  a, b = tmp_path / "a.txt", tmp_path / "b.txt"
  a.write_text("one\n\n")
  b.write_text("two three\nfour")
  src = text.TextSource("files", files={"train": [str(a), str(b)], "test": [str(b)]})
  ids = [256, *b"one\n", 256, *b"\n", 256, *b"two three\n", 256, *b"four"]
  np.testing.assert_array_equal(text.load_blocks(src, "train", text.tokenizer_for("bytes"), 5).reshape(-1),
                                ids[:len(ids) // 5 * 5])
  with pytest.raises(ConfigError) as e:
    text.load_blocks(src, "valid", text.tokenizer_for("bytes"), 5)
  one_line_error(e, "files['valid']")


def test_opt_tokenizer_blocks_start_lines_with_bos(tmp_path):
  tok = text.tokenizer_for("hf", path=os.path.join(FIXTURES, "tok_opt_vocab"))
  src = text.wikitext(toy_corpus(tmp_path))
  blocks_NxL = text.load_blocks(src, "train", tok, block_len=4)
  rows = text.read_rows(src, "train")
  expected = [i for r in rows for i in tok.encode(r)]
  assert expected.count(2) == len(rows)   # one </s> per line, also for the blank ones
  np.testing.assert_array_equal(blocks_NxL.reshape(-1), expected[:len(expected) // 4 * 4])


# --- cache -----------------------------------------------------------------------------------------------------


class CountingTokenizer:
  """The bytes tokenizer, counting encode_batch calls."""
  def __init__(self):
    self.inner, self.calls = tok_lib.byte_tokenizer(), 0
    self.fingerprint, self.vocab_size = self.inner.fingerprint, self.inner.vocab_size

  def encode_batch(self, rows):
    self.calls += 1
    return self.inner.encode_batch(rows)


def test_cache_is_reused_and_keyed(tmp_path):
  corpus, cache = toy_corpus(tmp_path / "wt"), str(tmp_path / "cache")
  src, tok = text.wikitext(corpus), CountingTokenizer()
  first = text.load_blocks(src, "train", tok, 8, cache)
  assert tok.calls == 1
  np.testing.assert_array_equal(text.load_blocks(src, "train", tok, 8, cache), first)
  assert tok.calls == 1                                   # the rerun did not tokenise
  text.load_blocks(src, "train", tok, 16, cache)
  assert tok.calls == 2                                   # another block length is another cache entry
  text.load_blocks(src, "valid", tok, 8, cache)
  assert tok.calls == 3
  with open(os.path.join(corpus, "wiki.train.raw"), "a", encoding="utf-8") as f:
    f.write(" One more line of text .\n")
  changed = text.load_blocks(src, "train", tok, 8, cache)
  assert tok.calls == 4 and len(changed) > len(first)     # new content, new key
  other = CountingTokenizer()
  other.fingerprint = "another-tokenizer"
  text.load_blocks(src, "train", other, 8, cache)
  assert other.calls == 1
  assert not [p for p in os.listdir(cache) if p.endswith(".tmp")]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip", "empty", "wrong_key", "wrong_shape"])
def test_corrupt_cache_is_rebuilt(tmp_path, damage):
  src, cache = text.wikitext(toy_corpus(tmp_path / "wt")), tmp_path / "cache"
  tok = CountingTokenizer()
  good = text.load_blocks(src, "train", tok, 8, str(cache))
  (path,) = cache.iterdir()
  raw = path.read_bytes()
  key = np.load(path)["key"]
  if damage == "truncate":
    path.write_bytes(raw[:len(raw) // 2])
  elif damage == "garbage":
    path.write_bytes(b"not a zip file at all")
  elif damage == "flip":   # one byte of the stored ids (past blocks.npy's 128-byte header)
    i = raw.index(b"blocks.npy") + 300
    path.write_bytes(raw[:i] + bytes([raw[i] ^ 0x01]) + raw[i + 1:])
  elif damage == "empty":
    path.write_bytes(b"")
  elif damage == "wrong_key":   # a well-formed file that belongs to something else
    with open(path, "wb") as f:
      np.savez(f, blocks=good + 1, key=np.array("0" * len(str(key))))
  else:
    with open(path, "wb") as f:
      np.savez(f, blocks=good.reshape(-1, 4), key=key)
  np.testing.assert_array_equal(text.load_blocks(src, "train", tok, 8, str(cache)), good)
  assert tok.calls == 2
  np.testing.assert_array_equal(text.load_blocks(src, "train", tok, 8, str(cache)), good)
  assert tok.calls == 2                                   # and the rebuilt file is good again


def test_cache_write_is_atomic(tmp_path, monkeypatch):
  src, cache = text.wikitext(toy_corpus(tmp_path / "wt")), tmp_path / "cache"
  tok = CountingTokenizer()

  def crash(a, b):
    raise OSError("disk pulled out mid-rename")

  monkeypatch.setattr(os, "replace", crash)
  with pytest.raises(OSError, match="disk pulled"):
    text.load_blocks(src, "train", tok, 8, str(cache))
  assert list(cache.iterdir()) == []                      # neither a torn cache nor a temp file left behind
  monkeypatch.undo()
  text.load_blocks(src, "train", tok, 8, str(cache))
  assert len(list(cache.iterdir())) == 1


@pytest.mark.parametrize("crash_in", ["fsync", "replace"])
def test_atomic_write_keeps_the_old_file_on_a_crash(tmp_path, monkeypatch, crash_in):
  path = tmp_path / "blocks.npz"
  path.write_bytes(b"old, complete")

  def crash(*args):
    raise OSError("killed mid-write")

  monkeypatch.setattr(os, crash_in, crash)
  with pytest.raises(OSError, match="killed"):
    tok_lib.atomic_write(str(path), b"new" * 1000)
  monkeypatch.undo()
  assert path.read_bytes() == b"old, complete" and os.listdir(tmp_path) == ["blocks.npz"]
  tok_lib.atomic_write(str(path), b"new")
  assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["blocks.npz"]


# --- bad input ---------------------------------------------------------------------------------------------------


def test_bad_input_is_one_line_config_error(tmp_path):
  corpus = toy_corpus(tmp_path / "wt")
  tok = text.tokenizer_for("bytes")
  os.remove(os.path.join(corpus, "wiki.test.raw"))
  with pytest.raises(ConfigError) as e:
    text.load_splits(text.wikitext(corpus), tok)
  one_line_error(e, "no test file", corpus, "wiki.test.raw", "wiki.test.tokens", "test.txt")
  with pytest.raises(ConfigError) as e:
    text.load_blocks(text.wikitext(str(tmp_path / "nowhere")), "train", tok)
  one_line_error(e, tmp_path / "nowhere")
  with pytest.raises(ConfigError) as e:   # valid.raw holds ~70 ids: not one block of 1024
    text.load_blocks(text.wikitext(corpus), "valid", tok, 1024)
  one_line_error(e, "not one full block of 1024", "wiki.valid.raw")
  (tmp_path / "empty.txt").write_text("")
  with pytest.raises(ConfigError) as e:
    text.load_blocks(text.TextSource("files", files={"train": [str(tmp_path / "empty.txt")]}), "train", tok, 2)
  one_line_error(e, "holds 0 tokens", "empty.txt")
  for bad in (1, 0, True, "64", 2.0):
    with pytest.raises(ConfigError) as e:
      text.load_blocks(text.wikitext(corpus), "train", tok, bad)
    one_line_error(e, "block_len")
  with pytest.raises(ConfigError) as e:
    text.load_blocks(text.TextSource("parquet"), "train", tok)
  one_line_error(e, "text source kind", "'parquet'")
  with pytest.raises(ConfigError) as e:
    text.load_blocks(text.wikitext(corpus), "validation", tok)
  one_line_error(e, "text split", "'validation'")
  (tmp_path / "latin1.txt").write_bytes("café\n".encode("latin-1") * 40)
  with pytest.raises(ConfigError) as e:
    text.load_blocks(text.TextSource("files", files={"train": [str(tmp_path / "latin1.txt")]}), "train", tok)
  one_line_error(e, "latin1.txt", "not UTF-8")
  with pytest.raises(ConfigError) as e:
    text.load_blocks(text.TextSource("files", files={"train": [str(tmp_path / "gone.txt")]}), "train", tok)
  one_line_error(e, "gone.txt")
  with pytest.raises(ConfigError, match="needs path"):
    text.load_blocks(text.TextSource("wikitext"), "train", tok)
  with pytest.raises(ConfigError, match="needs name"):
    text.load_blocks(text.TextSource("tfds"), "train", tok)


def test_import_pulls_in_no_optional_dependency():
  optional = ("tensorflow_datasets", "datasets", "transformers", "torch", "tensorflow", "tokenizers")
  code = ("import sys; import collapse_jax.families.lm.text, collapse_jax.families.lm.tokenizer; "
          f"print([m for m in {optional!r} if m in sys.modules])")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                       env=dict(os.environ, PYTHONPATH=REPO))
  assert out.stdout.strip() == "[]"


# --- tfds and Hugging Face datasets ------------------------------------------------------------------------------


def test_tfds_mock_text_dataset(tmp_path, monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")
  # Under mock_data nothing is prepared on disk; the preparedness check is what the next test covers.
  asked = []
  monkeypatch.setattr(text, "_tfds_check", lambda tfds_, name, data_dir, split: asked.append(split) or (
      f"{name}/mock", {}))
  src = text.TextSource("tfds", name="tiny_shakespeare", data_dir=str(tmp_path))
  with tfds.testing.mock_data(num_examples=4):
    rows = text.read_rows(src, "valid")
    assert asked == ["validation"]
    assert len(rows) == 4 and all(isinstance(r, str) and r for r in rows)
    got = text.load_blocks(src, "valid", text.tokenizer_for("bytes"), 4)
  ids = [i for r in rows for i in [256, *r.encode()]]
  np.testing.assert_array_equal(got.reshape(-1), ids[:len(ids) // 4 * 4])
  # A prepared copy yields bytes (the mock yields str): both are text.
  assert text._as_text(b"caf\xc3\xa9", "x") == text._as_text(np.array("café"), "x") == "café"


def test_tfds_not_prepared_fails_fast(tmp_path, monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")
  monkeypatch.setattr(tfds, "data_source", lambda *a, **k: pytest.fail("nothing prepared: no data_source call"))
  src = text.TextSource("tfds", name="tiny_shakespeare", data_dir=str(tmp_path))
  with pytest.raises(ConfigError) as e:
    text.load_blocks(src, "train", text.tokenizer_for("bytes"))
  one_line_error(e, "tiny_shakespeare is not prepared", tmp_path,
                 "tfds build tiny_shakespeare --file_format=array_record")
  with pytest.raises(ConfigError) as e:
    text.load_blocks(text.TextSource("tfds", name="no_such_text_set", data_dir=str(tmp_path)), "train",
                     text.tokenizer_for("bytes"))
  one_line_error(e, "no dataset 'no_such_text_set'")


def test_hf_datasets_missing_or_present(monkeypatch):
  src = text.TextSource("hf", name="wikitext", config="wikitext-2-raw-v1")
  monkeypatch.setitem(sys.modules, "datasets", None)   # makes `import datasets` raise ImportError
  with pytest.raises(ConfigError) as e:
    text.load_blocks(src, "train", text.tokenizer_for("bytes"))
  one_line_error(e, "needs the `datasets` package", "pip install datasets")
  calls = []

  class FakeDataset(list):   # what load_dataset returns: rows by column name, and a fingerprint
    _fingerprint = "abc123"

    def __getitem__(self, key):
      assert key == "text"
      return list(self)

  def load_dataset(name, config, split, cache_dir):
    calls.append((name, config, split, cache_dir))
    return FakeDataset(text.split_lines(TOY["valid"], blank_to_empty=True))

  FakeDatasets = types.SimpleNamespace(load_dataset=load_dataset)
  monkeypatch.setitem(sys.modules, "datasets", FakeDatasets)
  got = text.load_blocks(src, "valid", text.tokenizer_for("bytes"), 16)
  assert calls == [("wikitext", "wikitext-2-raw-v1", "validation", None)]
  ids = expected_bytes_stream(TOY["valid"])
  np.testing.assert_array_equal(got.reshape(-1), ids[:len(got) * 16])
