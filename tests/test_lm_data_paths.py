"""The LM's data paths belong to the user: every text config reads lm.text.path (a directory of wiki.*.raw or
train/valid/test .txt files), none reads a path outside the project by default, and every bad path or length is
one line through the command line naming the field to set (`error: config.lm.<field>...`, exit status 2,
nothing written)."""
import os
import shutil

import numpy as np
import pytest

from collapse_jax import cli, config as config_lib
from collapse_jax.errors import ConfigError
from collapse_jax.families.lm import config as lm_config, data as lm_data, text as text_lib
from collapse_jax.families.lm.family import LMFamily
from tests import helpers
from tests.toy_text import TOY, tiny_opt_folder, toy_corpus


def _one_line_error(r, want: str, workdir) -> None:
  assert r.returncode == 2, r.stdout + r.stderr
  assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr
  assert r.stderr.startswith(want), r.stderr
  assert not os.path.exists(os.path.join(workdir, "checkpoints")), "ran before refusing"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp("paths")
  no_test = toy_corpus(root / "no_test")
  os.remove(os.path.join(no_test, "wiki.test.raw"))
  no_tok = tiny_opt_folder(root / "no_tok")
  for n in ("vocab.json", "merges.txt"):
    os.remove(os.path.join(no_tok, n))
  return dict(wiki=toy_corpus(root / "wiki"), no_test=no_test, opt=tiny_opt_folder(root / "opt"), no_tok=no_tok)


@pytest.mark.parametrize("args,want", [
    (["--config=lm:scratch_wikitext2"],
     "error: config.lm.text.path='' is not a directory: set it to a directory holding wiki.{train,valid,test}.raw "
     "(wikitext-2-raw) or train.txt / valid.txt / test.txt (--config.lm.text.path=DIR)"),
    (["--config=lm:scratch_wikitext2,real_fraction", "--config.lm.text.path=/nonexistent/wiki"],
     "error: config.lm.text.path='/nonexistent/wiki' is not a directory: set it to a directory holding"),
    (["--config=lm:scratch_wikitext2", "--config.lm.text.path={no_test}"],
     "error: config.lm.text.path: no test file in {no_test}: looked for wiki.test.raw, wiki.test.tokens, test.txt"),
    (["--config=lm:opt_wikitext2", "--config.lm.hf_path=/x", "--config.lm.text.path={wiki}"],
     "error: config.lm.hf_path='/x' is not a directory: set it to a local Hugging Face OPT folder (config.json + "
     "model.safetensors, e.g. from `huggingface-cli download facebook/opt-125m --local-dir DIR`)"),
    (["--config=lm:opt_wikitext2", "--config.lm.hf_path={no_tok}", "--config.lm.text.path={wiki}",
      "--config.lm.block_len=8"],
     "error: config.lm.hf_path: no tokenizer.json, nor vocab.json + merges.txt, in {no_tok}"),
    (["--config=lm:opt_wikitext2", "--config.lm.hf_path={opt}", "--config.lm.text.path={wiki}"],
     "error: config.lm.block_len=64 is too long: a block and its 64 new tokens need 128 positions and the model "
     "has 16; set config.lm.block_len <= 8 (the HF folder's config.json fixes the positions)"),
    (["--config=lm:ci", "--config.lm.block_len=64"],
     "error: config.lm.block_len=64 is too long: a block and its 64 new tokens need 128 positions and the model "
     "has 16; set config.lm.block_len <= 8 or config.lm.model_overrides.max_position_embeddings >= 128"),
    (["--config=lm:ci", "--config.lm.dropout=inf"], "error: config.lm.dropout must be in [0, 1], got inf"),
], ids=["no_text_path", "text_path_missing", "split_file_missing", "hf_path_missing", "hf_tokenizer_missing",
        "block_len_hf", "block_len_scratch", "dropout_inf"])
def test_cli_errors_name_the_field_to_set(folders, tmp_path, args, want):
  workdir = tmp_path / "run"
  def fill(text):
    for k, v in folders.items():
      text = text.replace("{" + k + "}", v)
    return text
  r = helpers.cli(*map(fill, args), f"--workdir={workdir}", timeout=300)
  _one_line_error(r, fill(want), workdir)


def test_no_config_reads_outside_the_project_by_default():
  def strings(d):
    for v in d.values():
      if isinstance(v, dict):
        yield from strings(v)
      elif isinstance(v, str):
        yield v
  for name, (_, variants) in cli.experiments().items():
    for v in ("",) + variants:  # placeholders: =N a count, =NAME an OPT size
      cfg = helpers.load_config(name, v.replace("=NAME", "=opt-1.3b").replace("=N", "=4") or None)
      paths = [s for s in strings(cfg.to_dict()) if "/" in s or ".." in s]
      assert not paths, (name, v, paths)


def _text_data(arg, **overrides):
  """data.py's reading of the text config `arg` (what load_data reads, without the samples.n check)."""
  cfg = helpers.load_config("lm", arg, **overrides)
  c = LMFamily.parse(config_lib.parse(cfg), cfg.lm)
  return lm_data._text(c, lm_config.translate(c).model)


@pytest.mark.parametrize("names", ["wiki.{}.raw", "{}.txt"])
def test_every_text_config_reads_either_layout_from_lm_text_path(tmp_path, names):
  wiki = toy_corpus(tmp_path / "wiki", names)
  opt = tiny_opt_folder(tmp_path / "opt")
  # The paper's config: each split from its own file, OPT's tokenizer from the HF folder.
  d = _text_data("opt_wikitext2", lm__hf_path=opt, lm__text__path=wiki, lm__text__train_blocks=0, lm__block_len=8)
  tok = d["tokenizer"]
  for split in ("train", "valid", "test"):  # rows as wikitext: a whitespace-only line is "" (BOS only)
    lines = [l + "\n" for l in TOY[split].split("\n")[:-1]]
    ids = [i for l in lines for i in tok.encode("" if not l.strip() else l)]
    want = np.asarray(ids[:len(ids) // 8 * 8]).reshape(-1, 8)
    np.testing.assert_array_equal(d[split], want, err_msg=split)
  # scratch_wikitext2: the valid split as the training text (its last 5% of blocks validate), the test split as
  # the test set; no train file needed (a copy of the shared valid.txt / test.txt is such a directory).
  os.remove(os.path.join(wiki, names.format("train")))
  s = _text_data("scratch_wikitext2", lm__text__path=wiki, lm__block_len=4, lm__text__holdout=0.25,
                 lm__model_overrides__max_position_embeddings=8)
  tok = s["tokenizer"]
  src = text_lib.wikitext(wiki)
  valid = text_lib.load_blocks(src, "valid", tok, 4)
  k = int(round(0.25 * len(valid)))
  np.testing.assert_array_equal(s["train"], valid[:-k])
  np.testing.assert_array_equal(s["valid"], valid[-k:])
  np.testing.assert_array_equal(s["test"], text_lib.load_blocks(src, "test", tok, 4))


def test_missing_split_of_a_files_config_names_its_field(tmp_path):
  shutil.copy(__file__, tmp_path / "train.txt")
  with pytest.raises(ConfigError, match=r"^config\.lm\.text\.test_files: cannot read text file /nope/test\.txt"):
    _text_data("ci", lm__data="text", lm__text__train_files=str(tmp_path / "train.txt"),
               lm__text__test_files="/nope/test.txt", lm__text__tokenizer="bytes")
