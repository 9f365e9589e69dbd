"""The LM's data, read once on the host before anything is compiled (LMFamily.load_data): train/valid/test blocks
of block_len token ids from the synthetic Markov language (drawn on device by fixed keys) or from text files
through a tokenizer, the fixed text prompts (the first lm.text_samples test blocks), and the initial weights.
Whatever only the data can refuse is refused here, naming the field: counts against config.samples.n and
config.n_real, the tokenizer against the model's vocabulary, and lm_train.validate's checks of the blocks.
"""
import contextlib
import os
from typing import NamedTuple

import jax
import numpy as np

from collapse_jax import fields
from collapse_jax.errors import ConfigError
from collapse_jax.families.lm import config as lm_config
from collapse_jax.families.lm import model as opt_model
from collapse_jax.families.lm import train as lm_train


class Counts(NamedTuple):
  train: int
  valid: int
  test: int


def config_counts(c) -> Counts | None:
  """The block counts where the config gives them (the Markov language; text with lm.text.train_blocks /
  valid_blocks / test_blocks all set: plan mode without the files), else None: the data must be read."""
  if c.markov_data:
    return Counts(c.markov.train_blocks, c.markov.valid_blocks, c.markov.test_blocks)
  t = c.text
  return Counts(t.train_blocks, t.valid_blocks, t.test_blocks) if t.train_blocks and t.valid_blocks and \
      t.test_blocks else None


def load(run, c, parts) -> dict:
  """{'train', 'valid', 'test', 'prompts': int32 [N, block_len] host arrays, and 'source' (the Markov language) or
  'tokenizer' (text)}, checked against the config (run: config.Run, c: LMConfig, parts: config.Parts)."""
  d = _markov(c) if c.markov_data else _text(c, parts.model)
  n = len(d["train"])
  if not c.markov_data:  # the Markov language's counts are the config's: config.check has them
    lm_config.check_counts(run, n)
  if c.text_samples > len(d["test"]):
    raise fields.bad("lm.text_samples", f"<= the {len(d['test'])} test blocks", c.text_samples)
  lm_train.validate(parts.train, parts.model, lm_train.as_blocks(d["train"], "train blocks"),
                    lm_train.as_blocks(d["valid"], "valid blocks"), name="config.lm")
  return dict(d, prompts=d["test"][:c.text_samples])


def counts(d: dict) -> Counts:
  return Counts(len(d["train"]), len(d["valid"]), len(d["test"]))


def _markov(c) -> dict:
  from collapse_jax.families.lm import markov
  m = c.markov
  src = markov.make_source(m.vocab, m.branching, m.zipf_exponent, m.seed, m.concentration)
  key = jax.random.PRNGKey(m.data_seed)
  draw = jax.jit(markov.sample_blocks, static_argnums=(1, 2))
  out = {s: np.asarray(draw(src, getattr(m, f"{s}_blocks"), c.block_len, jax.random.fold_in(key, i)))
         for i, s in enumerate(lm_config.SPLITS)}
  return dict(out, source=src)


@contextlib.contextmanager
def _field(name: str):
  """A reader's ConfigError as the field the user sets: `config.NAME: message` (unless it names one already)."""
  try:
    yield
  except ConfigError as e:
    msg = str(e)
    raise ConfigError(msg if msg.startswith("config.") else f"config.{name}: {msg}") from None


def _text(c, model_cfg) -> dict:
  from collapse_jax.families.lm import text as text_lib
  t = c.text
  if t.kind == "wikitext":
    if not t.path or not os.path.isdir(os.path.expanduser(t.path)):
      raise ConfigError(f"config.lm.text.path={t.path!r} is not a directory: set it to {lm_config.TEXT_DIR} "
                        "(--config.lm.text.path=DIR)")
    source = text_lib.wikitext(t.path)
    # Ours -> the directory's split: train_split='valid' trains on the valid file, whose last blocks validate.
    read = {"train": t.train_split, "test": "test"}
    if t.train_split == "train":
      read["valid"] = "valid"
    field = {s: "lm.text.path" for s in lm_config.SPLITS}
    for theirs in read.values():  # every file found before any is tokenised
      with _field("lm.text.path"):
        text_lib.wikitext_file(t.path, theirs)
  else:
    files = {s: t.files(s) for s in lm_config.SPLITS}
    for s in ("train", "test"):
      if not files[s]:
        raise fields.bad(f"lm.text.{s}_files", "comma-separated text files for text.kind='files'",
                         getattr(t, f"{s}_files"))
    source = text_lib.TextSource("files", files={k: v for k, v in files.items() if v})
    read = {s: s for s in lm_config.SPLITS if files[s]}
    field = {s: f"lm.text.{s}_files" for s in lm_config.SPLITS}
  tok = _tokenizer(c, text_lib, source, read["train"], field["train"])
  if tok.vocab_size > model_cfg.vocab_size:
    raise ConfigError(f"config.lm.text.tokenizer gives {tok.vocab_size} ids but the model has vocab_size "
                      f"{model_cfg.vocab_size} (set config.lm.model_overrides.vocab_size)")
  if (tok.eos_id, tok.pad_id) != (model_cfg.eos_token_id, model_cfg.pad_token_id):  # decoding stops and pads
    fix = ("config.lm.hf_path's config.json and tokenizer files disagree" if c.init == "hf" else
           f"set config.lm.model_overrides.eos_token_id={tok.eos_id} and pad_token_id={tok.pad_id}")
    raise ConfigError(f"config.lm.text.tokenizer={t.tokenizer!r} has EOS / pad ids {tok.eos_id} / {tok.pad_id} but "
                      f"the model {model_cfg.eos_token_id} / {model_cfg.pad_token_id} ({fix})")
  d = {}
  for ours, theirs in read.items():
    with _field(field[ours]):
      d[ours] = text_lib.load_blocks(source, theirs, tok, c.block_len, t.cache_dir or None)
  if "valid" not in d:  # no validation split: hold out the training split's last blocks
    k = max(1, int(round(t.holdout * len(d["train"]))))
    d["train"], d["valid"] = d["train"][:-k], d["train"][-k:]
  if t.train_blocks:
    if t.train_blocks > len(d["train"]):
      raise fields.bad("lm.text.train_blocks", f"<= the {len(d['train'])} training blocks", t.train_blocks)
    d["train"] = d["train"][:t.train_blocks]
  return dict(d, tokenizer=tok)


def _tokenizer(c, text_lib, source, train_split: str, train_field: str):
  """The run's tokenizer, its errors named by the field that would fix them."""
  t = c.text
  if t.tokenizer == "bpe":  # trained on the text the run trains on
    with _field(train_field):
      return text_lib.tokenizer_for("bpe", source, cache_dir=t.cache_dir or None, vocab_size=t.bpe_vocab,
                                    split=train_split)
  if t.tokenizer == "hf" and not t.tokenizer_path and c.init == "hf":  # OPT's files sit beside its weights
    with _field("lm.hf_path"):
      return text_lib.tokenizer_for("hf", path=lm_config.hf_folder(c))
  with _field("lm.text.tokenizer_path"):
    return text_lib.tokenizer_for(t.tokenizer, path=t.tokenizer_path or None)


def init_params(c, model_cfg) -> dict:
  """The initial model's parameters: the HF folder's weights, or OPT's init from lm.init_seed."""
  if c.init == "hf":
    from collapse_jax.families.lm import hf
    with _field("lm.hf_path"):
      return hf.load_opt(lm_config.hf_folder(c), c.dtype)[1]
  return opt_model.init_params(model_cfg, jax.random.PRNGKey(c.init_seed))
