"""A tiny wikitext-2-raw-shaped corpus and the one-line-error check, for the text and tokenizer tests
(tests/test_text.py, tests/test_tokenizer.py) and tests of other modules."""
import os

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")

TOY = {  # wikitext-2-raw's shape: heading lines, blank lines, " @-@ ", non-ASCII
    "train": " \n = Valkyria Chronicles III = \n \n Senjō no Valkyria 3 is a tactical role @-@ playing game .\n"
             " It was released in January 2011 in Japan .\n \n = = Gameplay = = \n \n The game is café-like — 😀 .\n",
    "valid": " \n = Homarus gammarus = \n \n Homarus gammarus is a species of lobster .\n",
    "test": " \n = Robert Boulter = \n \n Robert Boulter is an English film , television and theatre actor .\n",
}


def toy_corpus(directory, names="wiki.{}.raw") -> str:
  """A tiny wikitext-2-raw-shaped corpus (train/valid/test) in `directory`; for tests of other modules too."""
  os.makedirs(directory, exist_ok=True)
  for split, body in TOY.items():
    with open(os.path.join(directory, names.format(split)), "w", encoding="utf-8") as f:
      f.write(body)
  return str(directory)


def one_line_error(excinfo, *needles):
  msg = str(excinfo.value)
  assert "\n" not in msg, msg
  for n in needles:
    assert str(n) in msg, (n, msg)


def tiny_opt_folder(directory) -> str:
  """A Hugging Face OPT folder as the paper's run reads one (config.json, model.safetensors and OPT's tokenizer
  files), made of the committed fixtures: tests/fixtures/opt_preln's model (pre-LN, 3 layers, hidden 24, 16
  positions) with its embedding grown to the 355 ids of tests/fixtures/tok_opt_vocab's byte-level BPE (the new
  rows drawn at the fixture's O(1) scale, seeded), and that tokenizer's files."""
  import json
  import shutil

  import numpy as np
  from safetensors.numpy import load_file, save_file

  os.makedirs(directory, exist_ok=True)
  tok = os.path.join(FIXTURES, "tok_opt_vocab")
  with open(os.path.join(tok, "vocab.json")) as fh:
    vocab = len(json.load(fh))
  with open(os.path.join(FIXTURES, "opt_preln", "config.json")) as fh:
    cfg = dict(json.load(fh), vocab_size=vocab)
  with open(os.path.join(directory, "config.json"), "w") as fh:
    json.dump(cfg, fh)
  tensors = load_file(os.path.join(FIXTURES, "opt_preln", "model.safetensors"))
  name = "model.decoder.embed_tokens.weight"
  e = tensors[name]
  grown = np.random.default_rng(0).standard_normal((vocab - len(e), e.shape[1])).astype(np.float32)
  tensors = {k: v for k, v in tensors.items() if k != "lm_head.weight"}  # tied: save_pretrained leaves it out
  tensors[name] = np.concatenate([e, grown])
  save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
  for n in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
    shutil.copy(os.path.join(tok, n), directory)
  return str(directory)
