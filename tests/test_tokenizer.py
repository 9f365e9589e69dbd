"""collapse_jax.families.lm.tokenizer (through text.tokenizer_for), offline: Hugging Face folders against
transformers' own ids (a committed fixture made by tests/fixtures/make_tokenizer_fixture.py), the bytes tokenizer
by hand, the trained BPE's layout, determinism, save and cache, and error paths."""
import json
import os
import shutil

import numpy as np
import pytest

from collapse_jax.errors import ConfigError
from collapse_jax.families.lm import text
from collapse_jax.families.lm import tokenizer as tok_lib
from tests.toy_text import FIXTURES, TOY, one_line_error, toy_corpus

HF_FOLDERS = ("tok_opt_vocab", "tok_opt_json")


def hf_cases(folder):
  with open(os.path.join(FIXTURES, folder, "hf_encodings.json"), encoding="utf-8") as f:
    return json.load(f)


@pytest.mark.parametrize("folder", HF_FOLDERS)
def test_hf_folder_matches_transformers(folder):
  ref = hf_cases(folder)
  tok = text.tokenizer_for("hf", path=os.path.join(FIXTURES, folder))
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (
      ref["bos_token_id"], ref["eos_token_id"], ref["pad_token_id"], ref["len"]) == (2, 2, 1, ref["len"])
  texts = [c["text"] for c in ref["cases"]]
  assert "" in texts and any("\n" in t for t in texts) and any(ord(ch) > 0xFFFF for t in texts for ch in t)
  for c in ref["cases"]:
    assert tok.encode(c["text"]) == c["ids"], c["text"]
    assert tok.decode(c["ids"]) == c["decoded"], c["text"]
    assert tok.decode(np.asarray(c["ids"], np.int32)) == c["decoded"]
  assert tok.encode_batch(texts) == [c["ids"] for c in ref["cases"]]
  # Round trip wherever the text holds no special-token text (decode drops "</s>", as transformers does).
  for t in texts:
    if "</s>" not in t:
      assert tok.decode(tok.encode(t)) == t


def test_hf_fingerprint_is_stable_and_tells_tokenizers_apart():
  a = [tok_lib.from_hf_folder(os.path.join(FIXTURES, f)) for f in HF_FOLDERS]
  b = [tok_lib.from_hf_folder(os.path.join(FIXTURES, f)) for f in HF_FOLDERS]
  assert [t.fingerprint for t in a] == [t.fingerprint for t in b]
  assert len({a[0].fingerprint, tok_lib.byte_tokenizer().fingerprint}) == 2


def test_hf_add_bos_token_false_is_honoured(tmp_path):
  # The same vocabulary with OPT's flag turned off: transformers' ids without the leading </s>.
  folder = tmp_path / "tok"
  shutil.copytree(os.path.join(FIXTURES, "tok_opt_vocab"), folder)
  cfg = json.loads((folder / "tokenizer_config.json").read_text())
  (folder / "tokenizer_config.json").write_text(json.dumps({**cfg, "add_bos_token": False}))
  tok = tok_lib.from_hf_folder(str(folder))
  for c in hf_cases("tok_opt_vocab")["cases"]:
    assert tok.encode(c["text"]) == c["ids"][1:]
  assert tok.fingerprint != tok_lib.from_hf_folder(os.path.join(FIXTURES, "tok_opt_vocab")).fingerprint


def test_hf_folder_errors(tmp_path):
  with pytest.raises(ConfigError) as e:
    tok_lib.from_hf_folder(str(tmp_path / "nowhere"))
  one_line_error(e, tmp_path / "nowhere")
  with pytest.raises(ConfigError) as e:
    tok_lib.from_hf_folder(str(tmp_path))
  one_line_error(e, tmp_path, "vocab.json + merges.txt")
  (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": 5}}')
  with pytest.raises(ConfigError) as e:
    tok_lib.from_hf_folder(str(tmp_path))
  one_line_error(e, tmp_path)
  with pytest.raises(ConfigError, match="tokenizer kind must be one of"):
    text.tokenizer_for("sentencepiece")
  with pytest.raises(ConfigError, match="needs a path"):
    text.tokenizer_for("hf")


def test_bytes_tokenizer_layout_and_round_trip():
  tok = text.tokenizer_for("bytes")
  assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (258, 256, 256, 257)
  assert tok.encode("") == [256]
  assert tok.encode("aé\n") == [256, 97, 0xC3, 0xA9, 10]
  for t in ["", " ", "line one\nline two\n", "Naïve café — 東京 😀!", "a </s> b <pad>", "\x00\t\r"]:
    assert tok.decode(tok.encode(t)) == t
  assert tok.decode([256, 104, 105, 257]) == "hi"
  assert tok.decode([256, 104, 105, 257], skip_special=False) == "</s>hi<pad>"
  assert tok.decode([0xC3]) == "\ufffd"   # a cut multi-byte character: replaced, as OPT's errors="replace"
  with pytest.raises(ConfigError, match="nothing to save|no file to save"):
    tok.save("/tmp/never-written.json")


def test_trained_bpe_layout_determinism_and_save(tmp_path):
  rows = text.split_lines(TOY["train"] * 3, blank_to_empty=True)
  tok = tok_lib.train_bpe(rows, vocab_size=300)
  assert tok.vocab_size == 300 and (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 2, 1)
  assert [tok.encode(s)[0] for s in ("<s>", "<pad>", "</s>", "<unk>")] == [2, 2, 2, 2]
  assert [tok.encode(s)[1:] for s in ("<s>", "<pad>", "</s>", "<unk>")] == [[0], [1], [2], [3]]
  # Words seen often merge into fewer tokens than their bytes; unseen text still encodes (byte-level).
  assert len(tok.encode(" Valkyria")) < 1 + len(" Valkyria")
  for t in ["", " Valkyria game .\n", "unseen Zürich 東京 😀", "  two  spaces\t"]:
    assert tok.decode(tok.encode(t)) == t
  assert tok_lib.train_bpe(rows, vocab_size=300).fingerprint == tok.fingerprint
  path = str(tmp_path / "bpe.json")
  tok.save(path)
  again = tok_lib.load_or_train_bpe(path, lambda: pytest.fail("a saved BPE must not be trained again"), 300)
  assert again.fingerprint == tok.fingerprint and again.encode(TOY["valid"]) == tok.encode(TOY["valid"])
  with pytest.raises(ConfigError, match="vocab_size"):
    tok_lib.train_bpe(rows, vocab_size=100)


def test_bpe_from_source_is_trained_once_and_saved_in_the_cache(tmp_path, monkeypatch):
  src = text.wikitext(toy_corpus(tmp_path / "wt"))
  cache = tmp_path / "cache"
  tok = text.tokenizer_for("bpe", src, cache_dir=str(cache), vocab_size=300)
  saved = list(cache.iterdir())
  assert len(saved) == 1 and saved[0].name.startswith("bpe-300-")
  monkeypatch.setattr(tok_lib, "train_bpe", lambda *a, **k: pytest.fail("the saved BPE must be reused"))
  assert text.tokenizer_for("bpe", src, cache_dir=str(cache), vocab_size=300).fingerprint == tok.fingerprint
  monkeypatch.undo()
  saved[0].write_text("{ torn")   # a corrupt file is trained again, not fatal
  assert text.tokenizer_for("bpe", src, cache_dir=str(cache), vocab_size=300).fingerprint == tok.fingerprint
  assert json.loads(saved[0].read_text())["model"]["type"] == "BPE"
  text.tokenizer_for("bpe", src, cache_dir=str(cache), vocab_size=280)   # another size is another file
  assert len(list(cache.iterdir())) == 2
  with pytest.raises(ConfigError, match="train split"):
    text.tokenizer_for("bpe")
