"""`collapse-jax export WORKDIR --out DIR [--generation G]`: one generation's LM as a Hugging Face OPT folder
(config.json + model.safetensors, hf.save_opt; plus the tokenizer's files where the run used an HF tokenizer), which
transformers' OPTForCausalLM.from_pretrained(DIR) loads.

The model comes from the run's checkpoints: after checkpoint step e the carry's "prev" is generation e-1's model and
"model0" is generation 0's, so the generations on disk are 0 and e-1 for every kept step e (config.keep_checkpoints
says how many steps a run keeps). The run's config.json rebuilds its Experiment, whose abstract carry restores them
(nothing is compiled); it reads the data and initial weights as the run did, so the files that config.lm.hf_path and
config.lm.text.* name must still be there. The models are restored onto one device (config.num_devices=1, no fsdp or
tensor split: the carry's shapes do not depend on the mesh), so any machine with the host memory can export.
"""
import argparse
import json
import os
import shutil

from collapse_jax import checkpoint, config as config_lib, paths
from collapse_jax.errors import ConfigError

# What transformers' AutoTokenizer reads from an OPT folder (whichever of them the run's folder has).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "added_tokens.json")


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="collapse-jax export", description=__doc__.split("\n\n")[0])
  p.add_argument("workdir", help="the run's --workdir (local or gs://)")
  p.add_argument("--out", required=True, help="the folder to write (local; created if missing)")
  p.add_argument("--generation", type=int, default=None,
                 help="which generation's model (default: the last one finished)")
  return p


def generations_on_disk(steps) -> dict[int, tuple[int, str]]:
  """generation -> (checkpoint step, carry key) for the models the kept checkpoint steps hold."""
  have = {e - 1: (e, "prev") for e in steps}
  if steps:
    have.setdefault(0, (max(steps), "model0"))
  return have


def _run_config(workdir: str):
  path = os.path.join(workdir, "config.json")
  if not paths.exists(path):
    raise ConfigError(f"{path}: no such file; WORKDIR must be the --workdir of a run")
  saved = json.loads(paths.read_text(path))
  if saved.get("family") != "lm":
    raise ConfigError(f"{workdir} holds a {saved.get('family')!r} run; export writes LM models only")
  # The run's values over today's defaults: a field added since the run (none of which changes a stored shape)
  # takes its default instead of failing the rebuild.
  cfg = config_lib.load("lm")
  cfg.update(saved)
  cfg.num_devices, cfg.lm.mesh_fsdp, cfg.lm.mesh_tensor = 1, 1, 1
  return cfg


def export(workdir: str, out: str, generation: int | None = None) -> int:
  """Writes the generation's model (default: the last finished) to `out`; returns the generation written."""
  if paths.is_remote(out):  # hf.save_opt writes local files; a gs:// name would become a local "gs:" folder
    raise ConfigError(f"--out {out}: an HF folder is written locally; export there and copy it to the bucket")
  cfg = _run_config(workdir)
  if os.path.exists(out) and not os.path.isdir(out):
    raise ConfigError(f"--out {out} is a file, not a folder")
  ckpts = checkpoint.Checkpoints(workdir, cfg.keep_checkpoints)
  try:
    have = generations_on_disk(ckpts.steps())
    if not have:
      raise ConfigError(f"{ckpts.directory} holds no checkpoint: the run has not finished a generation")
    g = max(have) if generation is None else generation
    if g not in have:
      raise ConfigError(f"generation {g} is not in {ckpts.directory}: its checkpoints hold generations "
                        f"{', '.join(map(str, sorted(have)))} (a run keeps its last config.keep_checkpoints="
                        f"{cfg.keep_checkpoints} checkpoints; set it higher to keep more)")
    from collapse_jax import loop  # JAX only past the checks above
    exp = loop.Experiment(cfg)
    step, which = have[g]
    carry = ckpts.restore_part(step, {"carry": exp.stored_carry_abstract()})["carry"]
  finally:
    ckpts.close()
  import jax
  from collapse_jax.families.lm import config as lm_config, hf
  fam = exp.family
  hf.save_opt(fam.model_cfg, jax.device_get(carry[which]["params"]), out)
  c = fam.c
  if c.data == "text" and c.text.tokenizer == "hf":  # the run's tokenizer, so the folder is used as it was trained
    src = c.text.tokenizer_path or lm_config.hf_folder(c)
    for name in TOKENIZER_FILES:
      if os.path.isfile(os.path.join(src, name)):
        shutil.copyfile(os.path.join(src, name), os.path.join(out, name))
  return g


def main(argv) -> int:
  args = _parser().parse_args(argv)
  g = export(args.workdir, args.out, args.generation)
  print(f"wrote generation {g}'s model of {args.workdir} to {args.out} "
        f"(transformers.OPTForCausalLM.from_pretrained({args.out!r}))")
  return 0
