"""The LM's config (collapse_jax/families/lm/config.py): every variant of configs/lm.py parses into the typed
section, and bad input is refused in one line naming the field, before anything is compiled: a field's own rule,
rules joining fields, the run's fields, the mesh and the data."""
import ml_collections
import pytest

from collapse_jax import config as config_lib, loop
from collapse_jax.errors import ConfigError
from collapse_jax.families.lm.family import LMFamily
from tests.helpers import load_config, refused_before_compilation


def _parse(cfg):
  return LMFamily.parse(config_lib.parse(cfg), cfg.get("lm"))


def _cfg(**kw):
  return load_config("lm", "ci", **{"generations": 3, "checkpoint_min_seconds": 0, **kw})


def test_configs_validate_and_combine():
  for arg in ("markov", "ci", "scratch_wikitext2", "real_fraction", "accumulate", "scratch_wikitext2,real_fraction"):
    _parse(load_config("lm", arg))
  # The paper's setting needs the two local folders, named on the command line.
  _parse(load_config("lm", "opt_wikitext2", lm__hf_path="OPT", lm__text__path="WIKI"))
  c = load_config("lm", "scratch_wikitext2,real_fraction")
  assert (c.regime.name, c.regime.real_fraction, c.lm.epochs, c.lm.data) == ("real_fraction", 0.1, 10, "text")
  p = load_config("lm", "opt_wikitext2")
  assert (p.lm.epochs, p.lm.batch_size, p.lm.lr, p.lm.block_len) == (5, 128, 2e-5, 64)
  assert (p.lm.decode.num_beams, p.lm.decode.repetition_penalty, p.samples.n) == (5, 3.0, p.lm.text.train_blocks)
  with pytest.raises(ConfigError, match=r"^unknown config variant 'bogus' \(known: markov, ci, "):
    load_config("lm", "bogus")
  # The typed section holds the config's values, sub-sections included.
  t = _parse(load_config("lm", "ci"))
  assert (t.block_len, t.decode.num_beams, t.decode.early_stopping, t.markov.train_blocks) == (8, 2, False, 28)
  assert t.model_overrides["hidden_size"] == 32


@pytest.mark.parametrize("kw,match", [
    (dict(samples__schedule="linear", samples__growth=2.0), r"^config\.samples\.schedule='linear': the LM"),
    (dict(lm__decode__method="nucleus"), r"^config\.lm\.decode\.method='nucleus' is not one of greedy"),
    (dict(lm__decode__num_beams=0), r"^config\.lm\.decode\.num_beams must be a positive integer, got 0$"),
    (dict(lm__decode__top_p=0.0), r"^config\.lm\.decode\.top_p must be in \(0, 1\], got 0\.0$"),
    (dict(lm__decode__min_new_tokens=9),
     r"^config\.lm\.decode\.min_new_tokens must be -1 or at most config\.lm\.block_len=8, got 9$"),
    (dict(samples__n=27), r"^config\.samples\.n=27 but the LM continues each of its 28 training blocks .*config\.samples\.n=28$"),
    (dict(n_real=20), r"^config\.n_real=20 but the LM data give 28 training blocks; leave it at 0$"),
    (dict(lm__block_len=12), r"^config\.lm\.block_len=12 is too long: a block and its 12 new tokens need 24 "
     r"positions and the model has 16; set config\.lm\.block_len <= 8 or config\.lm\.model_overrides\."
     r"max_position_embeddings >= 24$"),
    (dict(lm__init="hf", lm__hf_path="/nonexistent/opt"),
     r"^config\.lm\.hf_path='/nonexistent/opt' is not a directory: set it to a local Hugging Face OPT folder"),
    (dict(lm__init="hf"), r"^config\.lm\.hf_path must be a local Hugging Face OPT folder .* for init='hf'"),
    (dict(lm__data="text", lm__text__train_files="/nope/train.txt", lm__text__test_files="/nope/test.txt"),
     r"^config\.lm\.text\.train_files: cannot read text file /nope/train\.txt"),
    (dict(lm__data="text", lm__text__train_files="/nope/a.txt", lm__text__test_files="/nope/b.txt",
          lm__model_overrides__pad_token_id=0),
     r"^config\.lm\.text\.tokenizer='bytes' has EOS / pad ids 256 / 257 but the model 256 / 0 \(set "
     r"config\.lm\.model_overrides\.eos_token_id=256 and pad_token_id=257\)$"),
    (dict(lm__data="text", lm__text__kind="wikitext"), r"^config\.lm\.text\.path='' is not a directory: set it "
     r"to a directory holding wiki\.\{train,valid,test\}\.raw .* \(--config\.lm\.text\.path=DIR\)$"),
    (dict(lm__data="text", lm__text__train_split="valid", lm__text__train_files="a.txt"),
     r"^config\.lm\.text\.train_split must be 'train' for text\.kind='files'"),
    (dict(lm__data="text"), r"^config\.lm\.text\.train_files must be comma-separated text files"),
    (dict(num_devices=8, lm__mesh_fsdp=3), r"^config\.lm\.mesh_fsdp=3 x config\.lm\.mesh_tensor=1 does not divide the 8 devices"),
    (dict(num_devices=8, lm__batch_size=12), r"^config\.lm\.batch_size=12 must be a multiple of the 8 batch"),
    (dict(num_devices=8, lm__decode_batch=4), r"^config\.lm\.decode_batch=4 must be a multiple of the 8 batch"),
    (dict(lm__start="middle"), r"^config\.lm\.start='middle' is not one of initial, previous$"),
    (dict(lm__lr=0.0), r"^config\.lm\.lr must be a finite number > 0, got 0\.0$"),
    (dict(lm__epochs=0), r"^config\.lm\.epochs must be a positive integer, got 0$"),
    (dict(lm__grad_clip=-1.0), r"^config\.lm\.grad_clip must be a finite number >= 0, got -1\.0$"),
    (dict(lm__model="opt-7b"), r"^config\.lm\.model must be an OPT size \(tiny, .*\) for init='scratch', got 'opt-7b'$"),
    (dict(lm__model_overrides__num_heads=3), r"^config\.lm\.model_overrides: OPTConfig\.hidden_size=32 is not a multiple"),
    (dict(lm__markov__tail_fraction=0.0), r"^config\.lm\.markov\.tail_fraction must be in \(0, 1\], got 0\.0$"),
    (dict(lm__markov__branching=2), r"^config\.lm\.markov\.branching must be an integer >= 3, got 2$"),
    (dict(lm__text_samples=9), r"^config\.lm\.text_samples must be <= the 8 test blocks, got 9$"),
    # ci: 28 blocks in batches of 8 for 2 epochs.
    (dict(lm__warmup_steps=8), r"^config\.lm\.warmup_steps must be < the run's 8 steps, got 8$"),
    (dict(lm__epochz=3), r"^unknown config field lm\.epochz \(did you mean lm\.epochs\?\)$"),
])
def test_bad_input_refused_before_compiling(tmp_path, monkeypatch, kw, match):
  monkeypatch.setattr(loop.Experiment, "chunk_fn", lambda *a: pytest.fail("compiled before refusing"))
  wd = tmp_path / "run"
  with pytest.raises(ConfigError, match=match) as err:
    loop.run(_cfg(**kw), str(wd))
  assert "\n" not in str(err.value)
  assert not (wd / "config.json").exists()


def test_missing_lm_section_is_refused():
  with pytest.raises(ConfigError, match=r"config\.lm is missing"):
    _parse(ml_collections.ConfigDict(load_config("gaussian").to_dict()))


def test_tokenizer_larger_than_the_model_vocab_is_refused_before_compiling(tmp_path, monkeypatch):
  for split in ("train", "test"):
    (tmp_path / f"{split}.txt").write_text("a small text corpus for the bytes tokenizer\n" * 40)
  cfg = load_config("lm", "ci", lm__data="text", samples__n=4)
  cfg.lm.text.update(kind="files", tokenizer="bytes", train_files=str(tmp_path / "train.txt"),
                     test_files=str(tmp_path / "test.txt"), cache_dir=str(tmp_path / "cache"))
  cfg.lm.model_overrides.vocab_size = 100  # the bytes tokenizer has 258 ids
  refused_before_compilation(tmp_path, monkeypatch, cfg,
                             r"config\.lm\.text\.tokenizer gives 258 ids but the model has vocab_size 100")
