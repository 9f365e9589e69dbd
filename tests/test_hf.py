"""HF interop: loading save_pretrained / HF-cache / sharded folders, export -> re-import, the transformers round
trip (only where transformers is installed), and one-line errors raised before any compilation."""
import contextlib
import functools
import json
import os
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from collapse_jax.families.lm import hf
from collapse_jax.errors import ConfigError
from collapse_jax.families.lm import model as opt
from collapse_jax.families.lm import sizes
from tests import helpers

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
PRELN, POSTLN = os.path.join(FIXTURES, "opt_preln"), os.path.join(FIXTURES, "opt_postln")

_compiles = []
_listening = [False]
jax.monitoring.register_event_duration_secs_listener(
    lambda name, secs, **kw: _compiles.append(name) if _listening[0] and "backend_compile" in name else None)


@contextlib.contextmanager
def raises_before_compiling(match):
  """ConfigError matching `match`, on one line, with no XLA compilation on the way."""
  _compiles.clear()
  _listening[0] = True
  try:
    with pytest.raises(ConfigError, match=match) as e:
      yield e
  finally:
    _listening[0] = False
  assert "\n" not in str(e.value), str(e.value)
  assert not _compiles, f"compiled {len(_compiles)} programs before refusing"


def copy_fixture(src, dst):
  os.makedirs(dst, exist_ok=True)
  for name in ("config.json", "model.safetensors"):
    shutil.copy(os.path.join(src, name), dst)
  return dst


def assert_same_params(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@functools.lru_cache(maxsize=None)
def reference(path=PRELN):
  return hf.load_opt(path, dtype="float32")


def test_params_layout_matches_init_params():
  for path in (PRELN, POSTLN):
    cfg, params = reference(path)
    shapes = jax.eval_shape(lambda cfg=cfg: opt.init_params(cfg, jax.random.key(0)))
    assert jax.tree.structure(shapes) == jax.tree.structure(params)
    assert all(s.shape == p.shape and p.dtype == np.float32
               for s, p in zip(jax.tree.leaves(shapes), jax.tree.leaves(params)))


def test_load_from_hf_cache_layout(tmp_path):
  """models--org--name/{blobs, refs/main, snapshots/<hash>} with the snapshot's files symlinked into blobs, and
  a stale second snapshot refs/main does not name: the root and the snapshot folder both load the right one."""
  root = tmp_path / "hub" / "models--facebook--opt-fixture"
  (root / "blobs").mkdir(parents=True)
  (root / "refs").mkdir()
  (root / "refs" / "main").write_text("c0ffee\n")
  for snap in ("c0ffee", "0ld"):
    (root / "snapshots" / snap).mkdir(parents=True)
  for name in ("config.json", "model.safetensors"):
    blob = root / "blobs" / ("sha-" + name)
    shutil.copy(os.path.join(PRELN, name), blob)
    os.symlink(os.path.join("..", "..", "blobs", blob.name), root / "snapshots" / "c0ffee" / name)
  shutil.copy(os.path.join(POSTLN, "config.json"), root / "snapshots" / "0ld" / "config.json")
  cfg, params = reference()
  for path in (root, root / "snapshots" / "c0ffee"):
    got_cfg, got = hf.load_opt(str(path), dtype="float32")
    assert got_cfg == cfg
    assert_same_params(got, params)
  (root / "refs" / "main").write_text("missing")
  with raises_before_compiling("refs/main names snapshot 'missing'"):
    hf.load_opt(str(root))


def test_export_then_reimport_identical(tmp_path):
  for path in (PRELN, POSTLN):
    cfg, params = reference(path)
    out = str(tmp_path / os.path.basename(path))
    hf.save_opt(cfg, params, out)
    with open(os.path.join(out, "config.json")) as fh:
      saved = json.load(fh)
    assert saved["architectures"] == ["OPTForCausalLM"] and saved["model_type"] == "opt"
    assert saved["torch_dtype"] == "float32"
    # The exported tensors are the HF ones, bit for bit, under HF's names.
    want = load_file(os.path.join(path, "model.safetensors"))
    got = load_file(os.path.join(out, "model.safetensors"))
    assert sorted(got) == sorted(want)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
    cfg2, params2 = hf.load_opt(out, dtype="float32")
    assert cfg2 == cfg
    assert_same_params(params2, params)
  z = np.load(os.path.join(POSTLN, "logits.npz"))
  f = jax.jit(functools.partial(opt.apply, cfg))
  np.testing.assert_array_equal(np.asarray(f(params2, z["padded_ids"], z["padded_mask"])),
                                np.asarray(f(params, z["padded_ids"], z["padded_mask"])))


def test_sharded_and_prefix_variants(tmp_path):
  cfg, params = reference()
  tensors = load_file(os.path.join(PRELN, "model.safetensors"))
  names = sorted(tensors)
  # Two shards with an index, the second under OPTModel's "decoder." prefix, plus a tied lm_head.
  shards = {"model-00001-of-00002.safetensors": names[:10], "model-00002-of-00002.safetensors": names[10:]}
  weight_map = {}
  for i, (shard, keys) in enumerate(shards.items()):
    part = {(k[len("model."):] if i else k): tensors[k] for k in keys}
    if i:
      part["lm_head.weight"] = tensors["model.decoder.embed_tokens.weight"]
    save_file(part, str(tmp_path / shard))
    weight_map.update({k: shard for k in part})
  shutil.copy(os.path.join(PRELN, "config.json"), tmp_path)
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
  assert_same_params(hf.load_opt(str(tmp_path), dtype="float32")[1], params)
  # Bare OPTDecoder names, and an untied lm_head.
  bare = {k[len("model.decoder."):]: v for k, v in tensors.items()}
  assert_same_params(hf.params_from_hf(cfg, bare), params)
  with raises_before_compiling("lm_head.weight .* differs"):
    hf.params_from_hf(cfg, {**bare, "lm_head.weight": bare["embed_tokens.weight"] + 1})
  os.remove(tmp_path / "model-00002-of-00002.safetensors")
  with raises_before_compiling("model-00002-of-00002.safetensors: missing safetensors file"):
    hf.load_opt(str(tmp_path))


def test_bad_checkpoints_raise_one_line_before_compiling(tmp_path):
  d = copy_fixture(PRELN, str(tmp_path / "ckpt"))
  st = os.path.join(d, "model.safetensors")
  good = load_file(st)
  with raises_before_compiling("no such checkpoint directory"):
    hf.load_opt(str(tmp_path / "nowhere"))
  os.rename(st, st + ".away")
  with raises_before_compiling(r"ckpt/model.safetensors: missing safetensors file"):
    hf.load_opt(d)
  with open(st + ".away", "rb") as fh:
    data = fh.read()
  for cut in (len(data) - 100, 20, 4):  # inside the tensor data, inside the header, inside its length
    with open(st, "wb") as fh:
      fh.write(data[:cut])
    with raises_before_compiling(r"ckpt/model.safetensors: unreadable safetensors file"):
      hf.load_opt(d)
  name = "model.decoder.layers.1.self_attn.k_proj.weight"
  cases = [
      ({**good, name: good[name][:, :-1]}, rf"{name}' has shape \(24, 23\), config.json implies \(24, 24\)"),
      ({k: v for k, v in good.items() if k != name}, f"missing tensor '{name}'"),
      ({**good, "model.decoder.layers.3.fc1.bias": good["model.decoder.layers.0.fc1.bias"]},
       "unexpected tensor 'model.decoder.layers.3.fc1.bias'"),
  ]
  for tensors, match in cases:
    save_file(tensors, st)
    with raises_before_compiling(match):
      hf.load_opt(d)
  save_file(good, st)
  with open(os.path.join(d, "config.json")) as fh:
    cfg_json = json.load(fh)
  for field, value, match in (("activation_function", "gelu", "activation_function='gelu' is not supported"),
                              ("num_attention_heads", 5, "hidden_size=24 is not a multiple of num_heads=5"),
                              ("model_type", "gpt2", "model_type='gpt2'")):
    with open(os.path.join(d, "config.json"), "w") as fh:
      json.dump({**cfg_json, field: value}, fh)
    with raises_before_compiling(f"config.json: .*{match}"):
      hf.load_opt(d)
  with open(os.path.join(d, "config.json"), "w") as fh:
    json.dump({k: v for k, v in cfg_json.items() if k != "ffn_dim"}, fh)
  with raises_before_compiling("config.json: missing field 'ffn_dim'"):
    hf.load_opt(d)
  with raises_before_compiling("unknown OPT size 'opt-66m'"):
    sizes.get_size("opt-66m")


def test_pytorch_bin(tmp_path):
  """pytorch_model.bin: a one-line conversion hint without torch; the same params through torch with it."""
  d = str(tmp_path)
  shutil.copy(os.path.join(PRELN, "config.json"), d)
  try:
    import torch
  except ImportError:
    open(os.path.join(d, "pytorch_model.bin"), "wb").close()
    with raises_before_compiling("pytorch_model.bin needs torch.*convert"):
      hf.load_opt(d)
    return
  tensors = load_file(os.path.join(PRELN, "model.safetensors"))
  torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, os.path.join(d, "pytorch_model.bin"))
  assert_same_params(hf.load_opt(d, dtype="float32")[1], reference()[1])


@pytest.mark.parametrize("path", [PRELN, POSTLN], ids=["preln", "postln"])
def test_transformers_round_trip(path, tmp_path):
  transformers = pytest.importorskip(
      "transformers", reason="transformers is not installed here (the round trip runs in an env that has it, "
      "after pip install -e '.[bench]')")
  import torch

  cfg, params = reference(path)
  # New values (not the fixture's own tensors), so this checks our export, not HF re-reading its own file.
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: np.asarray(a) + 0.1 * rng.standard_normal(a.shape).astype(np.float32), params)
  hf.save_opt(cfg, params, str(tmp_path))
  model = transformers.OPTForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
  z = np.load(os.path.join(path, "logits.npz"))
  with torch.no_grad():
    want = model(input_ids=torch.from_numpy(z["padded_ids"]).long(),
                 attention_mask=torch.from_numpy(z["padded_mask"]).long()).logits.numpy()
  got = np.asarray(jax.jit(functools.partial(opt.apply, cfg))(params, z["padded_ids"], z["padded_mask"]))
  real = z["padded_mask"].astype(bool)
  # float32 torch vs XLA, as tests/test_opt.py's fixture parity: the forward pass's probabilistic rounding bound.
  tol = helpers.opt_logit_tol(cfg, z["padded_ids"].shape[1])
  assert np.abs(got[real] - want[real]).max() <= tol * np.abs(want[real]).max()
