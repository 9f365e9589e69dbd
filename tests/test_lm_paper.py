"""The paper's configuration end to end, as a user runs it: `lm:opt_wikitext2` through the command line for 2
generations (replace and real_fraction) on a tiny Hugging Face OPT folder with its tokenizer
(toy_text.tiny_opt_folder, made of the committed fixtures) and tiny wiki.{train,valid,test}.raw files, so the
paper's HF-init, HF-tokenizer and wikitext paths all run; then `collapse-jax export` writes a generation's model as
an HF folder, read back here by hf.load_opt and, where transformers is installed, by OPTForCausalLM itself."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from collapse_jax.errors import ConfigError
from collapse_jax.families.lm import export, hf
from collapse_jax.families.lm import model as opt
from collapse_jax.metrics import read_jsonl
from tests import helpers
from tests.toy_text import TOY, tiny_opt_folder

# The paper's config made tiny: 8+8 tokens (the fixture model has 16 positions), 16 training blocks, 2 beams.
TINY = ("--config.generations=2", "--config.lm.block_len=8", "--config.lm.text.train_blocks=16",
        "--config.samples.n=16", "--config.lm.batch_size=8", "--config.lm.eval_batch=8", "--config.lm.decode_batch=8",
        "--config.lm.decode.num_beams=2", "--config.lm.text_samples=2", "--config.lm.epochs=1")
REGIMES = {"replace": "lm:opt_wikitext2", "real_fraction": "lm:opt_wikitext2,real_fraction"}


def _rows(body: str) -> list[str]:
  """wikitext's rows of a file: its lines, a whitespace-only one as "" (what datasets' wikitext yields)."""
  return ["" if not line.strip() else line + "\n" for line in body.split("\n")[:-1]]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("paper")
  opt_dir = tiny_opt_folder(root / "opt")
  wiki = root / "wiki"
  wiki.mkdir()
  for split, body in TOY.items():
    (wiki / f"wiki.{split}.raw").write_text(body * (2 if split == "train" else 1), encoding="utf-8")
  procs = {}
  for regime, config in REGIMES.items():  # both at once: each is mostly one core's compile
    procs[regime] = helpers.cli(f"--config={config}", f"--workdir={root / regime}", f"--config.lm.hf_path={opt_dir}",
                                f"--config.lm.text.path={wiki}", *TINY, background=True)
  out = {regime: p.communicate(timeout=600)[0] for regime, p in procs.items()}
  for regime, p in procs.items():
    assert p.returncode == 0, out[regime]
  return dict(root=root, opt=opt_dir, wiki=str(wiki), **{r: str(root / r) for r in REGIMES})


def _samples(workdir: str, g: int) -> list[tuple[str, str]]:
  """(prompt, continuation) texts of samples/gen_g.txt (outputs.write_texts' layout)."""
  text = open(os.path.join(workdir, "samples", f"gen_{g:04d}.txt"), encoding="utf-8").read()
  out = []
  for part in text.split("=== prompt ")[1:]:
    prompt, cont = part.split(" ===\n", 1)[1].split(f"\n--- generation {g} continues ---\n", 1)
    out.append((prompt, cont[:-2] if cont.endswith("\n\n") else cont[:-1]))
  return out


@pytest.mark.parametrize("regime", REGIMES)
def test_paper_config_runs_through_the_cli(runs, regime):
  wd = runs[regime]
  cfg = json.load(open(os.path.join(wd, "config.json")))
  lm = cfg["lm"]
  assert (lm["init"], lm["text"]["kind"], lm["text"]["tokenizer"], cfg["regime"]["name"]) == (
      "hf", "wikitext", "hf", regime)
  rows = read_jsonl(os.path.join(wd, "metrics.jsonl"))
  assert [r["generation"] for r in rows] == [0, 1]
  assert all(np.isfinite(r["test_ppl"]) and r["test_ppl"] > 1 for r in rows), rows
  # The fixed prompts are the test split's first two blocks, decoded by the folder's OPT tokenizer: together they
  # are the start of the test file's text as wikitext rows (the BOS before every row decodes to nothing).
  text = "".join(_rows(TOY["test"]))
  for g in (0, 1):
    samples = _samples(wd, g)
    assert len(samples) == 2, samples
    (p0, _), (p1, _) = samples
    assert p0 and p1 and text.startswith(p0 + p1), (p0, p1, text[:40])


def _restore(workdir: str, step: int):
  mgr = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")))
  try:
    return mgr.restore(step, args=ocp.args.StandardRestore())["carry"]
  finally:
    mgr.close()


def test_export_writes_the_generations_model(runs, tmp_path):
  wd = runs["replace"]
  out1 = str(tmp_path / "gen1")
  r = _export_cli(wd, "--out", out1, "--generation", "1")
  assert r.returncode == 0 and "wrote generation 1's model" in r.stdout, r.stdout + r.stderr
  carry2, carry1 = _restore(wd, 2), _restore(wd, 1)
  # After checkpoint step 2 the carry's previous model is generation 1's; generation 0's rides in every step.
  for out, want in ((out1, carry2["prev"]["params"]), (None, carry1["model0"]["params"])):
    if out is None:
      out = str(tmp_path / "gen0")
      assert export.export(wd, out, 0) == 0
    _, got = hf.load_opt(out, dtype="float32")
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.array_equal(carry2["prev"]["params"]["embed_tokens"], carry1["model0"]["params"]["embed_tokens"])
  # The default is the last generation finished; the run's tokenizer files come along.
  assert export.export(wd, str(tmp_path / "last")) == 1
  for name in ("model.safetensors", "config.json"):
    assert open(os.path.join(out1, name), "rb").read() == open(os.path.join(tmp_path, "last", name), "rb").read()
  for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
    assert open(os.path.join(out1, name), "rb").read() == open(os.path.join(runs["opt"], name), "rb").read()
  with pytest.raises(ConfigError, match=r"^generation 2 is not in .*checkpoints: its checkpoints hold generations "
                     r"0, 1 \(a run keeps its last config\.keep_checkpoints=3 checkpoints; set it higher"):
    export.export(wd, str(tmp_path / "none"), 2)
  assert not os.path.exists(tmp_path / "none")
  r = _export_cli(str(tmp_path), "--out", str(tmp_path / "x"))
  assert r.returncode == 2 and r.stderr == f"error: {tmp_path}/config.json: no such file; WORKDIR must be the " \
      "--workdir of a run\n", r.stderr


def _export_cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=helpers.REPO)
  return subprocess.run([sys.executable, "-m", "collapse_jax.main", "export", *args], cwd=helpers.REPO,
                        env=env, capture_output=True, text=True, timeout=300)


def test_exported_model_is_transformers_opt_with_our_logits_and_continuations(runs, tmp_path):
  transformers = pytest.importorskip(
      "transformers", reason="transformers is not installed here (pip install -e '.[bench]' brings it)")
  import torch

  wd, out = runs["replace"], str(tmp_path / "gen1")
  export.export(wd, out, 1)
  model = transformers.OPTForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
  tok = transformers.AutoTokenizer.from_pretrained(out)
  # The test split as transformers tokenises it (each wikitext row with OPT's BOS, concatenated): its first two
  # 8-token blocks are the run's fixed prompts.
  ids = [i for row in _rows(TOY["test"]) for i in tok(row)["input_ids"]]
  prompts = np.asarray(ids[:16]).reshape(2, 8)
  cfg, _ = hf.load_opt(out, dtype="float32")
  params = _restore(wd, 2)["prev"]["params"]  # generation 1's model, from the checkpoint itself
  x = np.asarray(ids[:24]).reshape(2, 12)
  ours = np.asarray(opt.apply(cfg, params, x, np.ones_like(x)))
  with torch.no_grad():
    theirs = model(input_ids=torch.from_numpy(x).long()).logits.numpy()
  assert np.abs(ours - theirs).max() <= helpers.opt_logit_tol(cfg, x.shape[1]) * np.abs(theirs).max()
  # samples/gen_0001.txt holds generation 1's continuations of those prompts: HF generate with the run's decoder
  # (2 beams, repetition penalty 3, exactly 8 new tokens) on the exported model, decoded by HF's tokenizer.
  with torch.no_grad():
    new = model.generate(torch.from_numpy(prompts).long(), attention_mask=torch.ones(2, 8, dtype=torch.long),
                         num_beams=2, repetition_penalty=3.0, min_new_tokens=8, max_new_tokens=8, do_sample=False,
                         early_stopping=False, length_penalty=1.0)[:, 8:]
  want = [tok.decode(r, skip_special_tokens=True, clean_up_tokenization_spaces=False) for r in new]
  assert [c for _, c in _samples(wd, 1)] == want


def test_export_to_a_bucket_is_refused_before_reading_the_run(tmp_path):
  with pytest.raises(ConfigError, match=r"--out gs://b/opt: an HF folder is written locally"):
    export.export(str(tmp_path / "no_run_here"), "gs://b/opt")
  assert not os.path.exists("gs:")
