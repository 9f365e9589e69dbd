"""Tokenizers for the language-model experiment, behind one small interface (`Tokenizer`).

Three kinds:
  hf     The OPT / GPT-2 byte-level BPE of a Hugging Face folder, read with the `tokenizers` library: tokenizer.json
         where there is one, else vocab.json + merges.txt (the layout of facebook/opt-125m on the hub). BOS follows
         transformers' AutoTokenizer: where tokenizer_config.json sets add_bos_token (OPT: true, bos_token "</s>"),
         the bos token is prepended to every encoded text, so OPT's encodings all start with </s> = id 2; where it
         does not, the tokenizer.json's own post-processor decides (transformers' save_pretrained writes OPT's BOS
         there). Only the named special tokens (bos/eos/unk/pad, plus any added_tokens_decoder entries) are matched
         whole in text, as transformers does: "</s>" in a text encodes as id 2, "<unk>" as ordinary BPE pieces.
  bytes  The offline default, no files: id = UTF-8 byte value for 0..255, 256 = "</s>" (BOS and EOS, prepended to
         every encoded text as OPT does), 257 = "<pad>"; vocab_size 258. Text is never parsed for special tokens,
         so decode(encode(t)) == t for every string t.
  bpe    A byte-level BPE trained on the training split with `tokenizers` (ByteLevel pre-tokenizer without prefix
         space, as GPT-2/OPT; default vocab size 8192, merges need >= 2 occurrences). OPT's layout: <s>=0, <pad>=1,
         </s>=2, <unk>=3, then the 256 byte symbols and the merges; "</s>" prepended to every text. The four
         special names are matched whole in text (wikitext's tokens-version "<unk>" becomes id 3, which decode()
         drops unless skip_special=False). Training is deterministic (byte-level BPE has no hash-ordered subword
         ids; the same fingerprint from two processes on wikitext-2 valid). Saved as a tokenizer.json so that a
         rerun loads it instead of training again (`load_or_train_bpe`).

decode() drops special tokens by default (transformers' skip_special_tokens=True) and replaces malformed UTF-8
(OPT's errors="replace"). `fingerprint` is a short hash of everything that decides the ids, for cache keys.
"""
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from collapse_jax.errors import ConfigError

KINDS = ("hf", "bytes", "bpe")
DEFAULT_BPE_VOCAB = 8192
BYTE_EOS = 256      # the bytes tokenizer's "</s>", also its BOS
BYTE_PAD = 257
BYTE_VOCAB = 258
OPT_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")   # ids 0..3, as in OPT's vocabulary
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


class Tokenizer:
  """encode(text) -> ids (BOS first where the tokenizer adds one), decode(ids) -> text, and the ids that matter.

  Build one with `byte_tokenizer()`, `from_hf_folder(path)`, `train_bpe(texts)` or `load_or_train_bpe(...)`.
  """

  def __init__(self, kind: str, backend, *, bos_id: int | None, eos_id: int | None, pad_id: int | None,
               vocab_size: int, description: str):
    self.kind = kind
    self._backend = backend   # a tokenizers.Tokenizer; None for the bytes kind
    self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
    self.vocab_size = vocab_size
    self.description = description
    what = "bytes-v1" if backend is None else backend.to_str()
    self.fingerprint = hashlib.sha256(
        json.dumps([kind, what, bos_id, eos_id, pad_id, vocab_size]).encode()).hexdigest()[:16]

  def encode(self, text: str) -> list[int]:
    return self.encode_batch([text])[0]

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    texts = list(texts)
    if self._backend is None:
      return [[BYTE_EOS, *t.encode("utf-8")] for t in texts]
    # Offsets are not needed, and computing them is most of encode_batch's cost.
    return [e.ids for e in self._backend.encode_batch_fast(texts, add_special_tokens=True)]

  def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
    ids = [int(i) for i in np.ravel(ids)]   # lists, numpy or jax arrays alike
    if self._backend is not None:
      return self._backend.decode(ids, skip_special_tokens=skip_special)
    out = bytearray()
    for i in ids:
      if 0 <= i < 256:
        out.append(i)
      elif not skip_special:
        out += {BYTE_EOS: b"</s>", BYTE_PAD: b"<pad>"}.get(i, b"")
    return out.decode("utf-8", errors="replace")

  def save(self, path: str) -> None:
    """Writes a tokenizer.json (bpe and hf kinds) atomically: a crash leaves the old file or none, never half."""
    if self._backend is None:
      raise ConfigError(f"the bytes tokenizer has no file to save (asked to write {path})")
    atomic_write(path, self._backend.to_str().encode())

  def __repr__(self):
    return f"Tokenizer({self.description}, vocab_size={self.vocab_size}, fingerprint={self.fingerprint})"


def atomic_write(path: str, data: bytes) -> None:
  """Write to a temporary file beside `path`, flush it to disk, then rename over `path` (atomic on POSIX)."""
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=d, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    try:
      os.unlink(tmp)
    except OSError:
      pass
    raise


# --- bytes -------------------------------------------------------------------------------------------------------


def byte_tokenizer() -> Tokenizer:
  return Tokenizer("bytes", None, bos_id=BYTE_EOS, eos_id=BYTE_EOS, pad_id=BYTE_PAD, vocab_size=BYTE_VOCAB,
                   description="bytes (UTF-8 bytes 0..255, </s>=256 as BOS/EOS, <pad>=257)")


# --- Hugging Face folders ------------------------------------------------------------------------------------------


def _tokenizers():
  try:
    import tokenizers  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ConfigError("the hf and bpe tokenizers need the `tokenizers` package (pip install tokenizers), "
                      "or use the bytes tokenizer") from None
  return tokenizers


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    return {}
  try:
    with open(path, encoding="utf-8") as f:
      obj = json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigError(f"cannot read tokenizer file {path}: {e}") from None
  if not isinstance(obj, dict):
    raise ConfigError(f"tokenizer file {path} holds {type(obj).__name__}, expected a JSON object")
  return obj


def _token_text(value) -> str | None:
  """A special token as transformers writes it: a string, or an AddedToken dict {"content": ...}."""
  if isinstance(value, dict):
    value = value.get("content")
  return value if isinstance(value, str) else None


def from_hf_folder(path: str) -> Tokenizer:
  """The byte-level BPE of a Hugging Face folder (OPT's, GPT-2's), with transformers' BOS behaviour."""
  tk = _tokenizers()
  d = os.path.expanduser(path)
  if not os.path.isdir(d):
    raise ConfigError(f"no tokenizer directory {d} (expected tokenizer.json, or vocab.json + merges.txt)")
  config = {**_read_json(os.path.join(d, "special_tokens_map.json")),
            **_read_json(os.path.join(d, "tokenizer_config.json"))}
  specials = {k: _token_text(config.get(k)) for k in _SPECIAL_KEYS}
  tj, vocab, merges = (os.path.join(d, n) for n in ("tokenizer.json", "vocab.json", "merges.txt"))
  try:
    if os.path.isfile(tj):
      tok = tk.Tokenizer.from_file(tj)
      layout = "tokenizer.json"
    elif os.path.isfile(vocab) and os.path.isfile(merges):
      # What transformers' GPT2Tokenizer builds from these two files (OPT's tokenizer class).
      tok = tk.Tokenizer(tk.models.BPE.from_file(vocab, merges, dropout=None, continuing_subword_prefix="",
                                                 end_of_word_suffix="", fuse_unk=False))
      tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=bool(config.get("add_prefix_space", False)))
      tok.decoder = tk.decoders.ByteLevel()
      layout = "vocab.json + merges.txt"
    else:
      raise ConfigError(f"no tokenizer.json, nor vocab.json + merges.txt, in {d}")
  except ConfigError:
    raise
  except Exception as e:  # tokenizers raises its own Exception subclass for malformed files
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise ConfigError(f"cannot load the tokenizer in {d} ({first})") from None
  extra = [_token_text(v) for _, v in sorted((config.get("added_tokens_decoder") or {}).items(),
                                             key=lambda kv: int(kv[0]))]
  named = [t for t in (*specials.values(), *extra) if t]
  if named:
    # Special tokens are matched whole in text and never normalised, as transformers registers them.
    tok.add_special_tokens([tk.AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(named)])
  ids = {k: (tok.token_to_id(t) if t else None) for k, t in specials.items()}
  if "add_bos_token" in config or "add_eos_token" in config:
    # transformers rebuilds the post-processor from these flags whenever the config states one of them.
    tok.post_processor = _bos_eos_template(tk, specials, ids, bool(config.get("add_bos_token")),
                                           bool(config.get("add_eos_token")), d)
  return Tokenizer("hf", tok, bos_id=ids["bos_token"], eos_id=ids["eos_token"], pad_id=ids["pad_token"],
                   vocab_size=tok.get_vocab_size(with_added_tokens=True), description=f"hf {layout} from {d}")


def _bos_eos_template(tk, specials, ids, add_bos, add_eos, where):
  """transformers' update_post_processor: [bos] $A [eos] as the flags say."""
  for flag, key in ((add_bos, "bos_token"), (add_eos, "eos_token")):
    if flag and ids[key] is None:
      raise ConfigError(f"tokenizer_config.json in {where} sets add_{key[:3]}_token but its {key} "
                        f"{specials[key]!r} is not in the vocabulary")
  bos = [f"{specials['bos_token']}:0"] if add_bos else []
  eos = [f"{specials['eos_token']}:0"] if add_eos else []
  single = " ".join([*bos, "$A:0", *eos])
  known = [(specials[k], ids[k]) for k, flag in (("bos_token", add_bos), ("eos_token", add_eos)) if flag]
  return tk.processors.TemplateProcessing(single=single, pair=f"{single} $B:1",
                                          special_tokens=list(dict.fromkeys(known)))


# --- trained BPE -------------------------------------------------------------------------------------------------


def train_bpe(texts: Iterable[str], vocab_size: int = DEFAULT_BPE_VOCAB, min_frequency: int = 2) -> Tokenizer:
  """A byte-level BPE in OPT's layout, trained on `texts` (e.g. the training split's lines)."""
  if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < len(OPT_SPECIALS) + 256:
    raise ConfigError(f"bpe vocab_size must be an integer >= {len(OPT_SPECIALS) + 256} (specials + 256 bytes), "
                      f"got {vocab_size!r}")
  tk = _tokenizers()
  tok = tk.Tokenizer(tk.models.BPE())
  tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tk.decoders.ByteLevel()
  trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                   special_tokens=list(OPT_SPECIALS),
                                   initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(texts, trainer)
  tok.post_processor = tk.processors.TemplateProcessing(single="</s>:0 $A:0", pair="</s>:0 $A:0 $B:1",
                                                        special_tokens=[("</s>", 2)])
  return _bpe(tok, "bpe (trained)")


def _bpe(tok, description) -> Tokenizer:
  ids = [tok.token_to_id(t) for t in OPT_SPECIALS]
  if ids != [0, 1, 2, 3]:
    raise ConfigError(f"{description}: special tokens {OPT_SPECIALS} are at ids {ids}, expected 0..3")
  return Tokenizer("bpe", tok, bos_id=2, eos_id=2, pad_id=1, vocab_size=tok.get_vocab_size(with_added_tokens=True),
                   description=description)


def bpe_path(cache_dir: str, source_key: str, vocab_size: int = DEFAULT_BPE_VOCAB) -> str:
  """Where the BPE trained on a source's training split lives in the cache."""
  return os.path.join(os.path.expanduser(cache_dir), f"bpe-{vocab_size}-{source_key[:16]}.tokenizer.json")


def load_or_train_bpe(path: str, texts: Callable[[], Iterable[str]],
                      vocab_size: int = DEFAULT_BPE_VOCAB) -> Tokenizer:
  """The BPE saved at `path`, or one trained on texts() and saved there (atomically). An unreadable file is
  trained again and overwritten."""
  tk = _tokenizers()
  if os.path.isfile(path):
    try:
      return _bpe(tk.Tokenizer.from_file(path), f"bpe from {path}")
    except Exception:  # pylint: disable=broad-except  # a torn or foreign file: train again
      pass
  tok = train_bpe(texts(), vocab_size)
  tok.save(path)
  return _bpe(tok._backend, f"bpe {vocab_size} trained and saved at {path}")  # pylint: disable=protected-access


def make(kind: str, path: str | None = None) -> Tokenizer:
  """The hf or bytes tokenizer by name (bpe needs a training split: see collapse_jax.families.lm.text.tokenizer_for)."""
  if kind == "bytes":
    return byte_tokenizer()
  if kind == "hf":
    if not path:
      raise ConfigError("tokenizer kind hf needs a path: the Hugging Face folder (e.g. a copy of facebook/opt-125m)")
    return from_hf_folder(path)
  raise ConfigError(f"tokenizer kind must be one of {', '.join(KINDS)}, got {kind!r}"
                    + (" (bpe is trained per source: use text.tokenizer_for)" if kind == "bpe" else ""))
