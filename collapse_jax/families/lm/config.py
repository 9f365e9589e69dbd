"""config.lm as frozen dataclasses (the shared field checks of collapse_jax/fields.py), and its one translation
into what the parts take: the model's OPTConfig, the trainer's TrainConfig and the decoder's DecodeConfig.

Every rule about config.lm lives here once: a field's own in its declaration, rules joining fields of the
section in `__post_init__`, rules joining it with the loop-level fields in `check` (LMFamily.check). What needs
the mesh (batch sizes against its batch shards) is checked by the family's constructor, what needs the data
(block counts, token ids, the tokenizer's size, a warmup as long as the run) by data.py. The language's own rules
(vocab, branching, exponent, concentration) are markov.make_source's, whose messages name config.lm.markov.*:
this section only types those fields. DecodeConfig.validate (decode.py's guard for its direct callers) is called
once, by `translate`, for the rule only it knows: prompt + new tokens within the model's positions; it re-checks
the decode fields this section has already checked.
"""
import dataclasses
import json
import os
from typing import NamedTuple

from collapse_jax import fields
from collapse_jax.errors import ConfigError
from collapse_jax.families.lm import decode
from collapse_jax.families.lm import model as opt_model
from collapse_jax.families.lm import sizes
from collapse_jax.families.lm import train as lm_train
from collapse_jax.families.lm.tokenizer import OPT_SPECIALS

DATA, INITS, STARTS, PROMPTS = ("markov", "text"), ("scratch", "hf"), ("initial", "previous"), ("own", "real")
TEXT_KINDS, TOKENIZERS = ("wikitext", "files"), ("hf", "bytes", "bpe")
SPLITS = ("train", "valid", "test")
# What a text directory (lm.text.path) holds, and where an OPT folder (lm.hf_path) comes from: the messages' advice.
TEXT_DIR = "a directory holding wiki.{train,valid,test}.raw (wikitext-2-raw) or train.txt / valid.txt / test.txt"
HF_DIR = ("a local Hugging Face OPT folder (config.json + model.safetensors, e.g. from `huggingface-cli download "
          "facebook/opt-125m --local-dir DIR`)")
# The byte tokenizer's specials (tokenizer.py): a model trained from scratch on bytes must stop and pad with them.
_BYTE_IDS = dict(bos_token_id=256, eos_token_id=256, pad_token_id=257)


@dataclasses.dataclass(frozen=True)
class Decode:
  method: str = fields.choice(decode.METHODS)
  num_beams: int = fields.integer(lo=1)
  repetition_penalty: float = fields.number(lo=0.0, lo_open=True)
  min_new_tokens: int = fields.integer(lo=-1, why="-1: block_len")
  temperature: float = fields.number(lo=0.0, lo_open=True)
  top_k: int = fields.integer(lo=0, why="0: off")
  top_p: float = fields.number(0.0, 1.0, lo_open=True)
  length_penalty: float = fields.number()
  # decode.py also takes HF's 'never'; configs/lm.py's default types the field bool (ConfigDict keeps it so).
  early_stopping: bool = fields.boolean()


@dataclasses.dataclass(frozen=True)
class Markov:
  vocab: int = fields.integer()             # >= 3, and the rest of the language's rules: markov.make_source
  branching: int = fields.integer()
  zipf_exponent: float = fields.number()
  seed: int = fields.integer()
  concentration: float = fields.number()
  data_seed: int = fields.integer(lo=0)
  train_blocks: int = fields.integer(lo=1)
  valid_blocks: int = fields.integer(lo=1)
  test_blocks: int = fields.integer(lo=1)
  tail_fraction: float = fields.number(0.0, 1.0, lo_open=True)  # read while tracing: checked here, up front


@dataclasses.dataclass(frozen=True)
class Text:
  kind: str = fields.choice(TEXT_KINDS)
  path: str = fields.text()
  train_split: str = fields.choice(("train", "valid"))  # wikitext: the split trained on (valid: no valid split)
  train_files: str = fields.text()
  valid_files: str = fields.text()
  test_files: str = fields.text()
  tokenizer: str = fields.choice(TOKENIZERS)
  tokenizer_path: str = fields.text()
  bpe_vocab: int = fields.integer(lo=len(OPT_SPECIALS) + 256, why="OPT's specials + 256 bytes")
  cache_dir: str = fields.text()
  holdout: float = fields.number(0.0, 1.0)
  train_blocks: int = fields.integer(lo=0, why="0: all")
  valid_blocks: int = fields.integer(lo=0, why="0: read the files")
  test_blocks: int = fields.integer(lo=0, why="0: read the files")

  def __post_init__(self):
    if self.kind != "wikitext" and self.train_split != "train":
      raise fields.bad("lm.text.train_split", "'train' for text.kind='files' (which names its files per split)",
                       self.train_split)

  def files(self, split: str) -> list[str]:
    return [p for p in getattr(self, f"{split}_files").split(",") if p]


@dataclasses.dataclass(frozen=True)
class LMConfig:
  data: str = fields.choice(DATA)
  block_len: int = fields.integer(lo=2, why="next-token prediction needs 2 tokens")
  init: str = fields.choice(INITS)
  model: str = fields.text(nonempty=True)
  model_overrides: dict = fields.mapping()
  hf_path: str = fields.text()
  dtype: str = fields.choice(tuple(opt_model.DTYPES))
  dropout: float = fields.number(0.0, 1.0)
  init_seed: int = fields.integer(lo=0)
  start: str = fields.choice(STARTS)
  prompts: str = fields.choice(PROMPTS)
  epochs: int = fields.integer(lo=1)
  batch_size: int = fields.integer(lo=1)
  eval_batch: int = fields.integer(lo=1)
  lr: float = fields.number(lo=0.0, lo_open=True)
  end_lr: float = fields.number(lo=0.0)
  warmup_steps: int = fields.integer(lo=0)
  weight_decay: float = fields.number(lo=0.0)
  grad_clip: float = fields.number(lo=0.0)
  decode: Decode = fields.section(Decode)
  decode_batch: int = fields.integer(lo=1)
  text_samples: int = fields.integer(lo=0)
  mesh_fsdp: int = fields.integer(lo=1)
  mesh_tensor: int = fields.integer(lo=1)
  remat: str = fields.choice(sizes.REMAT)
  scan_layers: bool = fields.boolean()
  markov: Markov = fields.section(Markov)
  text: Text = fields.section(Text)

  def __post_init__(self):
    if self.init == "scratch" and self.model not in sizes.SIZES:
      raise fields.bad("lm.model", f"an OPT size ({', '.join(sizes.SIZES)}) for init='scratch'", self.model)
    if self.decode.min_new_tokens > self.block_len:  # every block is continued by block_len new tokens
      raise fields.bad("lm.decode.min_new_tokens", f"-1 or at most config.lm.block_len={self.block_len}",
                       self.decode.min_new_tokens)

  @property
  def markov_data(self) -> bool:
    return self.data == "markov"


def check(run, c: LMConfig) -> None:
  """The rules joining config.lm with the loop-level fields (run: config.Run)."""
  if run.samples.schedule != "fixed":
    raise ConfigError(f"config.samples.schedule={run.samples.schedule!r}: the LM continues samples.n blocks "
                      "every generation, so only 'fixed' can run")
  if c.markov_data:  # the block count is the config's: known without drawing the data (text: data.py)
    check_counts(run, c.markov.train_blocks)


def check_counts(run, n_train: int) -> None:
  """n_real and samples.n against the number of training blocks, once it is known."""
  if run.n_real and run.n_real != n_train:
    raise ConfigError(f"config.n_real={run.n_real} but the LM data give {n_train} training blocks; leave it at 0")
  if run.samples.n != n_train:
    raise ConfigError(f"config.samples.n={run.samples.n} but the LM continues each of its {n_train} training "
                      f"blocks into one new block: set config.samples.n={n_train}")


# --- the one translation ------------------------------------------------------------------------------------------
class Parts(NamedTuple):
  model: opt_model.OPTConfig
  train: lm_train.TrainConfig
  decode: decode.DecodeConfig


def translate(c: LMConfig, abstract: bool = False) -> Parts:
  """config.lm as the model's, the trainer's and the decoder's configs. abstract (plan mode): an HF model may be
  planned without its folder, from the published size's shapes. Decoding continues every block by exactly
  block_len new tokens unless lm.decode.min_new_tokens lets it stop earlier."""
  mcfg = model_config(c, abstract)
  tcfg = lm_train.TrainConfig(lr=c.lr, end_lr=c.end_lr, warmup_steps=c.warmup_steps, weight_decay=c.weight_decay,
                              grad_clip=c.grad_clip, batch_size=c.batch_size, epochs=c.epochs,
                              eval_batch=c.eval_batch, verbose=False)
  d = c.decode
  dcfg = decode.DecodeConfig(method=d.method, max_new_tokens=c.block_len,
                             min_new_tokens=c.block_len if d.min_new_tokens < 0 else d.min_new_tokens,
                             num_beams=d.num_beams, temperature=d.temperature, top_k=d.top_k, top_p=d.top_p,
                             repetition_penalty=d.repetition_penalty, length_penalty=d.length_penalty,
                             early_stopping=d.early_stopping)
  positions = mcfg.max_position_embeddings
  if 2 * c.block_len > positions:  # a block and its block_len new tokens share the model's positions
    raise ConfigError(
        f"config.lm.block_len={c.block_len} is too long: a block and its {c.block_len} new tokens need "
        f"{2 * c.block_len} positions and the model has {positions}; set config.lm.block_len <= {positions // 2}"
        + (" (the HF folder's config.json fixes the positions)" if c.init == "hf" else
           f" or config.lm.model_overrides.max_position_embeddings >= {2 * c.block_len}"))
  dcfg.validate(prompt_len=c.block_len, cache_len=positions)
  return Parts(mcfg, tcfg, dcfg)


def hf_folder(c: LMConfig) -> str:
  """lm.hf_path as the folder holding config.json (a models--* cache root resolved), or a one-line error naming
  the field."""
  from collapse_jax.families.lm import hf
  if not c.hf_path or not os.path.isdir(c.hf_path):
    raise ConfigError(f"config.lm.hf_path={c.hf_path!r} is not a directory: set it to {HF_DIR}")
  try:
    return hf.resolve_dir(c.hf_path)
  except ConfigError as e:
    raise ConfigError(f"config.lm.hf_path: {e}") from None


def model_config(c: LMConfig, abstract: bool = False) -> opt_model.OPTConfig:
  """The OPTConfig: an HF folder's config.json (its weights are read by data.init_params), or an OPT size with
  lm.model_overrides; the run's dtype, dropout, remat and layer scan on top."""
  run = dict(dropout=float(c.dropout), scan_layers=c.scan_layers, remat=c.remat)
  if c.init == "hf" and not c.hf_path and not (abstract and c.model in sizes.SIZES):
    raise fields.bad("lm.hf_path", f"{HF_DIR} for init='hf'", c.hf_path)
  if c.init == "hf" and c.hf_path:
    from collapse_jax.families.lm import hf
    path = os.path.join(hf_folder(c), hf.CONFIG_JSON)
    try:
      with open(path) as fh:
        mc = hf.config_from_hf(json.load(fh), path, c.dtype)
    except (OSError, ValueError) as e:
      raise ConfigError(f"config.lm.hf_path: {path} is unreadable ({type(e).__name__})") from None
    except ConfigError as e:
      raise ConfigError(f"config.lm.hf_path: {e}") from None
    return dataclasses.replace(mc, **run)
  if c.init == "hf":  # planning without the folder: the published size has HF's config.json's shapes
    return sizes.get_size(c.model, dtype=c.dtype, **run)
  over = dict(c.model_overrides)
  if c.markov_data:  # the vocabulary is the language's plus OPT's four specials
    over["vocab_size"] = c.markov.vocab + len(OPT_SPECIALS)
  else:
    if "vocab_size" not in over:  # from scratch on text: the tokenizer's size (a trained BPE may use fewer)
      over["vocab_size"] = {"bytes": 258, "bpe": c.text.bpe_vocab}.get(c.text.tokenizer, 50272)
    if c.text.tokenizer == "bytes":  # its BOS/EOS and pad are not OPT's ids (data.py checks every tokenizer's)
      over = {**_BYTE_IDS, **over}
  try:
    return sizes.get_size(c.model, dtype=c.dtype, **run, **over)
  except ConfigError as e:
    raise ConfigError(f"config.lm.model_overrides: {e}") from None
