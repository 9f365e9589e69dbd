r"""Text for the language-model experiment: a split tokenised, concatenated and cut into fixed blocks, int32
`blocks_NxL` (L = 64 by default, the paper's block length for OPT-125m on wikitext-2), train/valid/test apart.

Sources (TextSource.kind):
  wikitext  A directory with one file per split: wiki.{train,valid,test}.raw (wikitext-2-raw, the paper's data), the
            tokens version wiki.*.tokens, or train.txt / valid.txt / test.txt; the first name present is read.
  files     Plain UTF-8 text files, a list of paths per split (TextSource.files = {"train": [...], ...}).
  tfds      A text dataset of tensorflow-datasets (e.g. tiny_shakespeare, lm1b), one row per example's
            TextSource.text_key field, read with tfds.data_source from a copy prepared as array_record in
            data_dir. Nothing is downloaded: an unprepared dataset fails at once with the command that prepares it.
  hf        Hugging Face `datasets` (optional; TextSource.name="wikitext", config="wikitext-2-raw-v1").
Split names are train / valid / test; tfds and hf call the middle one "validation".

How lines become blocks (as Hugging Face's run_clm.py, the usual recipe for fine-tuning OPT on wikitext-2):
  1. The split is cut into rows. For wikitext, rows are the file's lines with their "\n", and a whitespace-only
     line is the empty row "" (what `datasets.load_dataset("wikitext", ...)` yields); for plain files, every line
     with its "\n"; for tfds and hf, one row per example.
  2. Every row is encoded on its own, with the tokenizer's BOS in front where the tokenizer adds one (OPT: "</s>" =
     id 2 before every line, even an empty one; so do the bytes and trained-bpe tokenizers here). Hence the model
     sees a separator at every line start, as the paper's models did; no EOS is added (OPT's tokenizer adds none).
  3. All ids of the split are concatenated and cut into blocks of L; the last partial block is dropped (run_clm's
     group_texts). Blocks may start mid-line, as in run_clm. A split with fewer than L tokens is an error.

Tokenisation is cached in cache_dir (a parameter; none = no cache) as one .npz per split, named by a hash of the
source's content (file bytes; tfds name/version/size; hf fingerprint), the tokenizer's fingerprint and L; the key
is stored inside too. Files are written atomically (temp file + rename), so a crash never leaves a torn cache; a
cache that cannot be read (corrupt, wrong key, wrong shape) is ignored and rebuilt.
"""
import dataclasses
import hashlib
import io
import itertools
import json
import os
from collections.abc import Mapping, Sequence

import numpy as np

from collapse_jax.errors import ConfigError
from collapse_jax.families.lm import tokenizer as tok_lib

SOURCE_KINDS = ("wikitext", "files", "tfds", "hf")
SPLITS = ("train", "valid", "test")
DEFAULT_BLOCK_LEN = 64
CACHE_VERSION = 1   # bump when the rows or blocks rules change, so old caches are not reused
_WIKITEXT_NAMES = ("wiki.{}.raw", "wiki.{}.tokens", "{}.txt")
_LONG_SPLIT = {"train": "train", "valid": "validation", "test": "test"}


@dataclasses.dataclass(frozen=True)
class TextSource:
  kind: str
  path: str | None = None                          # wikitext: the directory of the split files
  files: Mapping[str, Sequence[str]] | None = None  # files: split -> paths, read in order
  name: str | None = None                          # tfds / hf: the dataset ("tiny_shakespeare", "wikitext")
  config: str | None = None                        # hf: the configuration ("wikitext-2-raw-v1")
  data_dir: str | None = None                      # tfds: data_dir of the prepared copy; hf: cache_dir
  text_key: str = "text"                           # tfds / hf: the text field of an example


def wikitext(path: str) -> TextSource:
  return TextSource("wikitext", path=path)


def check(source: TextSource, split: str | None = None, block_len: int | None = None) -> None:
  """Refuses a bad source, split or block length with a one-line ConfigError naming the field; reads nothing."""
  if not isinstance(source, TextSource):
    raise ConfigError(f"text source must be a TextSource, got {type(source).__name__}")
  if source.kind not in SOURCE_KINDS:
    raise ConfigError(f"text source kind must be one of {', '.join(SOURCE_KINDS)}, got {source.kind!r}")
  if split is not None and split not in SPLITS:
    raise ConfigError(f"text split must be one of {', '.join(SPLITS)}, got {split!r}")
  if block_len is not None:
    _check_block_len(block_len)
  if source.kind == "wikitext" and not source.path:
    raise ConfigError("text source kind wikitext needs path, the directory holding wiki.{train,valid,test}.raw")
  if source.kind == "files":
    if not isinstance(source.files, Mapping) or not source.files:
      raise ConfigError("text source kind files needs files, a mapping split -> list of paths")
    if split is not None and not source.files.get(split):
      raise ConfigError(f"text source files has no paths for split {split!r} (files[{split!r}])")
  if source.kind in ("tfds", "hf") and not source.name:
    raise ConfigError(f"text source kind {source.kind} needs name, the dataset's name")


def _check_block_len(block_len) -> None:
  if isinstance(block_len, bool) or not isinstance(block_len, (int, np.integer)) or block_len < 2:
    raise ConfigError(f"block_len must be an integer >= 2 (a block holds inputs and next-token targets), "
                      f"got {block_len!r}")


def describe(source: TextSource) -> str:
  check(source)
  if source.kind == "wikitext":
    return f"wikitext files in {source.path}"
  if source.kind == "files":
    return "text files " + "; ".join(f"{s}: {', '.join(source.files[s])}" for s in SPLITS if source.files.get(s))
  if source.kind == "tfds":
    return f"tfds {source.name} ({source.data_dir or 'default data_dir'})"
  return f"Hugging Face datasets {source.name}" + (f"/{source.config}" if source.config else "")


# --- rows --------------------------------------------------------------------------------------------------------


def split_lines(text: str, blank_to_empty: bool) -> list[str]:
  r"""Lines as Python's text-mode file iteration gives them ("\n", "\r\n" and "\r" all end a line, each kept as
  "\n"); str.splitlines would also split at form feeds and U+2028, which wikitext's reader does not."""
  text = text.replace("\r\n", "\n").replace("\r", "\n")
  lines = [line + "\n" for line in text.split("\n")]
  lines[-1] = lines[-1][:-1]
  if not lines[-1]:
    lines.pop()
  return ["" if blank_to_empty and not line.strip() else line for line in lines]


def _read_file(path: str, what: str) -> bytes:
  try:
    with open(path, "rb") as f:
      return f.read()
  except OSError as e:
    raise ConfigError(f"cannot read {what} {path}: {e.strerror or e}") from None


def _decode(raw: bytes, path: str) -> str:
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ConfigError(f"text file {path} is not UTF-8 (byte {e.start})") from None


def wikitext_file(directory: str, split: str) -> str:
  d = os.path.expanduser(directory)
  if not os.path.isdir(d):
    raise ConfigError(f"no directory {d} (text source path) for the wikitext files")
  names = [n.format(split) for n in _WIKITEXT_NAMES]
  for n in names:
    if os.path.isfile(os.path.join(d, n)):
      return os.path.join(d, n)
  raise ConfigError(f"no {split} file in {d}: looked for {', '.join(names)}")


def _open_files(paths: Sequence[str], blank_to_empty: bool):
  raws = [(p, _read_file(p, "text file")) for p in paths]
  identity = ["files", blank_to_empty, [[len(r), hashlib.sha256(r).hexdigest()] for _, r in raws]]
  where = ", ".join(paths)
  return identity, where, lambda: [row for p, r in raws for row in split_lines(_decode(r, p), blank_to_empty)]


def _open(source: TextSource, split: str):
  """(identity: JSON-able, where: str for messages, rows: () -> list[str]). Identity is cheap next to
  tokenising: file sources are hashed, not tokenised."""
  if source.kind == "wikitext":
    return _open_files([wikitext_file(source.path, split)], blank_to_empty=True)
  if source.kind == "files":
    return _open_files([os.path.expanduser(p) for p in source.files[split]], blank_to_empty=False)
  if source.kind == "tfds":
    return _open_tfds(source, split)
  return _open_hf(source, split)


def _as_text(value, where: str) -> str:
  if isinstance(value, np.ndarray) and value.shape == ():
    value = value.item()
  if isinstance(value, bytes):
    return _decode(value, where)
  if isinstance(value, str):
    return value
  raise ConfigError(f"{where} yields {type(value).__name__} rows, expected text")


# --- tfds --------------------------------------------------------------------------------------------------------


def _tfds_check(tfds, name: str, data_dir: str | None, split: str) -> tuple[str, dict]:
  """(full name with version, data_source kwargs), or a one-line ConfigError that says how to prepare it."""
  where = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
  how = (f"run `tfds build {name} --file_format=array_record --data_dir={where}` on a machine with network and "
         f"TensorFlow and copy that directory here (text source data_dir), or use text source kind wikitext / files")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # DatasetNotFoundError and kin; their messages run over many lines
    raise ConfigError(f"tfds has no dataset {name!r} (text source name): {str(e).splitlines()[0]}") from None
  if not builder.is_prepared():
    raise ConfigError(f"tfds dataset {name} is not prepared in {where}; {how}")
  fmt = builder.info.file_format or tfds.core.FileFormat.TFRECORD
  if fmt not in tfds.core.FileFormat.with_random_access():
    raise ConfigError(f"tfds dataset {name} in {builder.data_dir} is prepared as {fmt.value}, which "
                      f"tfds.data_source cannot read; {how}")
  if split not in builder.info.splits:
    raise ConfigError(f"tfds dataset {name} has no split {split!r} (it has {', '.join(builder.info.splits)})")
  return builder.info.full_name, {"download": False, "builder_kwargs": {"file_format": fmt.value}}


def _open_tfds(source: TextSource, split: str):
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ConfigError("text source kind tfds needs tensorflow-datasets and importlib_resources "
                      "(pip install 'collapse_jax[data]'), or use text source kind wikitext / files") from None
  data_dir = os.path.expanduser(source.data_dir) if source.data_dir else None
  name, tsplit = source.name, _LONG_SPLIT[split]
  full_name, kwargs = _tfds_check(tfds, name, data_dir, tsplit)
  ds = tfds.data_source(name, split=tsplit, data_dir=data_dir, **kwargs)
  where = f"tfds {name} split {tsplit}"
  identity = ["tfds", full_name, os.path.abspath(data_dir) if data_dir else None, tsplit, len(ds), source.text_key]
  # One record at a time: tfds's batched __getitems__ fails under tfds.testing.mock_data.
  return identity, where, lambda: [_as_text(ds[i][source.text_key], where) for i in range(len(ds))]


# --- Hugging Face datasets ---------------------------------------------------------------------------------------


def _open_hf(source: TextSource, split: str):
  try:
    import datasets  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ConfigError("text source kind hf needs the `datasets` package (pip install datasets), or put "
                      "wiki.*.raw files in a directory and use text source kind wikitext") from None
  tsplit = _LONG_SPLIT[split]
  try:
    ds = datasets.load_dataset(source.name, source.config, split=tsplit, cache_dir=source.data_dir)
  except Exception as e:  # network, unknown name or split: datasets raises many kinds
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise ConfigError(f"datasets.load_dataset({source.name!r}, {source.config!r}, split={tsplit!r}) failed: "
                      f"{first}") from None
  where = f"datasets {source.name}/{source.config} split {tsplit}"
  identity = ["hf", source.name, source.config, tsplit, getattr(ds, "_fingerprint", None), len(ds), source.text_key]
  return identity, where, lambda: [_as_text(t, where) for t in ds[source.text_key]]


# --- blocks ------------------------------------------------------------------------------------------------------


def group_texts(ids_per_row: Sequence[Sequence[int]], block_len: int) -> np.ndarray:
  """run_clm's group_texts: all ids concatenated, cut into blocks of block_len, the remainder dropped.
  -> int32 blocks_NxL (N may be 0)."""
  total = sum(len(r) for r in ids_per_row)
  ids_T = np.fromiter(itertools.chain.from_iterable(ids_per_row), dtype=np.int32, count=total)
  n = total // block_len
  return ids_T[:n * block_len].reshape(n, block_len)


def tokenize_rows(rows: Sequence[str], tokenizer: tok_lib.Tokenizer, block_len: int = DEFAULT_BLOCK_LEN,
                  where: str = "text") -> np.ndarray:
  """Rows -> blocks_NxL (each row encoded with the tokenizer's BOS, all concatenated). Refuses too little text."""
  _check_block_len(block_len)
  ids_per_row = tokenizer.encode_batch(rows)
  blocks_NxL = group_texts(ids_per_row, block_len)
  if not len(blocks_NxL):
    total = sum(len(r) for r in ids_per_row)
    raise ConfigError(f"{where} holds {total} tokens ({len(rows)} lines), not one full block of {block_len}")
  return blocks_NxL


def cache_key(identity, tokenizer: tok_lib.Tokenizer, block_len: int) -> str:
  return hashlib.sha256(json.dumps([CACHE_VERSION, identity, tokenizer.fingerprint, int(block_len)],
                                   sort_keys=True).encode()).hexdigest()


def _read_cache(path: str, key: str, block_len: int, vocab_size: int) -> np.ndarray | None:
  try:
    with np.load(path, allow_pickle=False) as z:
      if str(z["key"]) != key:
        return None
      blocks_NxL = z["blocks"]   # zip members carry a CRC, so flipped bytes are caught here
  except Exception:  # pylint: disable=broad-except  # any unreadable cache is rebuilt, never fatal
    return None
  if (blocks_NxL.dtype != np.int32 or blocks_NxL.ndim != 2 or blocks_NxL.shape[1] != block_len
      or not len(blocks_NxL) or blocks_NxL.min() < 0 or blocks_NxL.max() >= vocab_size):
    return None
  return blocks_NxL


def _write_cache(path: str, key: str, blocks_NxL: np.ndarray) -> None:
  buf = io.BytesIO()
  np.savez(buf, blocks=blocks_NxL, key=np.array(key))
  tok_lib.atomic_write(path, buf.getvalue())


def load_blocks(source: TextSource, split: str, tokenizer: tok_lib.Tokenizer, block_len: int = DEFAULT_BLOCK_LEN,
                cache_dir: str | None = None) -> np.ndarray:
  """One split as int32 blocks_NxL, from cache_dir when it holds this (content, tokenizer, L)."""
  check(source, split, block_len)
  identity, where, rows = _open(source, split)
  where = f"split {split} ({where})"
  if not cache_dir:
    return tokenize_rows(rows(), tokenizer, block_len, where)
  key = cache_key(identity, tokenizer, block_len)
  path = os.path.join(os.path.expanduser(cache_dir), f"{split}-L{int(block_len)}-{key[:24]}.npz")
  blocks_NxL = _read_cache(path, key, block_len, tokenizer.vocab_size) if os.path.isfile(path) else None
  if blocks_NxL is None:
    blocks_NxL = tokenize_rows(rows(), tokenizer, block_len, where)
    _write_cache(path, key, blocks_NxL)
  return blocks_NxL


def load_splits(source: TextSource, tokenizer: tok_lib.Tokenizer, block_len: int = DEFAULT_BLOCK_LEN,
                cache_dir: str | None = None, splits: Sequence[str] = SPLITS) -> dict[str, np.ndarray]:
  """{split: int32 blocks_NxL}; every split is checked before any is read, so a bad name fails fast."""
  for s in splits:
    check(source, s, block_len)
  return {s: load_blocks(source, s, tokenizer, block_len, cache_dir) for s in splits}


def tokenizer_for(kind: str, source: TextSource | None = None, *, path: str | None = None,
                  cache_dir: str | None = None, vocab_size: int = tok_lib.DEFAULT_BPE_VOCAB,
                  split: str = "train") -> tok_lib.Tokenizer:
  """The tokenizer by kind: "bytes", "hf" (path = a Hugging Face folder) or "bpe", trained on the source's `split`
  (the text trained on) and saved in cache_dir (named by that text's content and vocab size), so that a rerun
  reuses it."""
  if kind != "bpe":
    return tok_lib.make(kind, path)
  if source is None:
    raise ConfigError("tokenizer kind bpe is trained on a text source's train split; none was given")
  check(source, split)
  identity, _, rows = _open(source, split)
  if not cache_dir:
    return tok_lib.train_bpe(rows(), vocab_size)
  key = hashlib.sha256(json.dumps([CACHE_VERSION, identity], sort_keys=True).encode()).hexdigest()
  return tok_lib.load_or_train_bpe(tok_lib.bpe_path(cache_dir, key, vocab_size), rows, vocab_size)


def read_rows(source: TextSource, split: str) -> list[str]:
  """The split's rows as the tokenizer sees them (e.g. to take prompts as text, or train another tokenizer)."""
  check(source, split)
  return _open(source, split)[2]()
