"""Hugging Face OPT checkpoints <-> collapse_jax.families.lm.model parameters.

load_opt(path) reads a local folder as `save_pretrained` writes it, or as the HF hub cache holds it (either the
snapshot folder models--facebook--opt-125m/snapshots/<hash>/ or the models--* root, whose refs/main names the
snapshot): config.json plus model.safetensors, sharded *.safetensors with model.safetensors.index.json, or
(only where torch is installed) pytorch_model.bin. save_opt writes a folder transformers' OPTForCausalLM loads.

Every check (config fields, files, tensor names and shapes) runs on the host with numpy, so bad input is a
one-line ConfigError naming the file, tensor or field before anything is compiled.

Name mapping: HF prefixes OPTForCausalLM's tensors with "model.decoder." (OPTModel: "decoder.", OPTDecoder:
none); all three are accepted. lm_head.weight is tied to embed_tokens.weight: if present it must equal it.
HF's nn.Linear weights are [out, in]; ours are [in, out], with attention heads split into their own axis.
"""
import json
import os

import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from collapse_jax.errors import ConfigError
from collapse_jax.families.lm import model as opt

_PREFIXES = ("model.decoder.", "decoder.", "model.")
_HEAD = "lm_head.weight"
CONFIG_JSON = "config.json"
ST_FILE, ST_INDEX = "model.safetensors", "model.safetensors.index.json"
PT_FILE, PT_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"


# --- config ---------------------------------------------------------------------------------------------------
# Fields this implementation cannot honour, with the value it requires (HF's default where absent).
_REQUIRED = {"activation_function": "relu", "enable_bias": True, "layer_norm_elementwise_affine": True,
             "_remove_final_layer_norm": False, "tie_word_embeddings": True, "layerdrop": 0.0}


def config_from_hf(d: dict, source: str = CONFIG_JSON, dtype: str = "bfloat16") -> opt.OPTConfig:
  if d.get("model_type", "opt") != "opt":
    raise ConfigError(f"{source}: model_type={d['model_type']!r}, expected 'opt'")
  for field, want in _REQUIRED.items():
    if field in d and d[field] != want:
      raise ConfigError(f"{source}: {field}={d[field]!r} is not supported (only {want!r})")

  def get(field, default=None):
    if field not in d and default is None:
      raise ConfigError(f"{source}: missing field {field!r}")
    v = d.get(field, default)
    if isinstance(v, list):
      raise ConfigError(f"{source}: {field}={v!r} must be a single value")
    return v

  hidden = get("hidden_size")
  cfg = opt.OPTConfig(
      vocab_size=get("vocab_size"), hidden_size=hidden, num_layers=get("num_hidden_layers"),
      num_heads=get("num_attention_heads"), ffn_dim=get("ffn_dim"),
      max_position_embeddings=get("max_position_embeddings"),
      word_embed_proj_dim=d.get("word_embed_proj_dim") or hidden,
      do_layer_norm_before=get("do_layer_norm_before", True), dropout=float(get("dropout", 0.1)),
      attention_dropout=float(get("attention_dropout", 0.0)), pad_token_id=get("pad_token_id", 1),
      bos_token_id=get("bos_token_id", 2), eos_token_id=get("eos_token_id", 2), dtype=dtype)
  try:
    opt.validate(cfg)
  except ConfigError as e:
    raise ConfigError(f"{source}: {e}") from None
  return cfg


def config_to_hf(cfg: opt.OPTConfig) -> dict:
  return {
      "architectures": ["OPTForCausalLM"], "model_type": "opt", "torch_dtype": "float32", "dtype": "float32",
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads, "ffn_dim": cfg.ffn_dim,
      "max_position_embeddings": cfg.max_position_embeddings, "word_embed_proj_dim": cfg.word_embed_proj_dim,
      "do_layer_norm_before": cfg.do_layer_norm_before, "dropout": cfg.dropout,
      "attention_dropout": cfg.attention_dropout, "pad_token_id": cfg.pad_token_id,
      "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "init_std": opt.INIT_STD,
      **_REQUIRED,
  }


# --- tensor names and layouts --------------------------------------------------------------------------------
def _spec(cfg: opt.OPTConfig) -> dict:
  """HF name (no prefix) -> (our param path, layer index or None, HF shape, HF -> ours, ours -> HF). Our layers are
  stacked: layer i of a "layers" path is slice i of its leading axis."""
  e, h, d, f, p = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.ffn_dim, cfg.word_embed_proj_dim
  same = (lambda a: a, lambda a: a)
  transpose = (lambda a: a.T, lambda a: a.T)
  spec = {"embed_tokens.weight": (("embed_tokens",), None, (cfg.vocab_size, p)) + same,
          "embed_positions.weight": (("embed_positions",), None, (cfg.max_position_embeddings + opt.POS_OFFSET, e))
          + same}
  if p != e:
    spec["project_in.weight"] = (("project_in",), None, (e, p)) + transpose
    spec["project_out.weight"] = (("project_out",), None, (p, e)) + transpose
  if cfg.do_layer_norm_before:
    spec["final_layer_norm.weight"] = (("final_layer_norm", "scale"), None, (e,)) + same
    spec["final_layer_norm.bias"] = (("final_layer_norm", "bias"), None, (e,)) + same
  qkv_w = (lambda a: a.T.reshape(e, h, d), lambda a: a.reshape(e, e).T)
  heads_b = (lambda a: a.reshape(h, d), lambda a: a.reshape(e))
  out_w = (lambda a: a.T.reshape(h, d, e), lambda a: a.reshape(e, e).T)
  for i in range(cfg.num_layers):
    L = f"layers.{i}."
    for n in ("q_proj", "k_proj", "v_proj"):
      spec[f"{L}self_attn.{n}.weight"] = (("layers", "self_attn", n, "kernel"), i, (e, e)) + qkv_w
      spec[f"{L}self_attn.{n}.bias"] = (("layers", "self_attn", n, "bias"), i, (e,)) + heads_b
    spec[f"{L}self_attn.out_proj.weight"] = (("layers", "self_attn", "out_proj", "kernel"), i, (e, e)) + out_w
    spec[f"{L}self_attn.out_proj.bias"] = (("layers", "self_attn", "out_proj", "bias"), i, (e,)) + same
    for n in ("self_attn_layer_norm", "final_layer_norm"):
      spec[f"{L}{n}.weight"] = (("layers", n, "scale"), i, (e,)) + same
      spec[f"{L}{n}.bias"] = (("layers", n, "bias"), i, (e,)) + same
    spec[f"{L}fc1.weight"] = (("layers", "fc1", "kernel"), i, (f, e)) + transpose
    spec[f"{L}fc1.bias"] = (("layers", "fc1", "bias"), i, (f,)) + same
    spec[f"{L}fc2.weight"] = (("layers", "fc2", "kernel"), i, (e, f)) + transpose
    spec[f"{L}fc2.bias"] = (("layers", "fc2", "bias"), i, (e,)) + same
  return spec


def _strip(name: str) -> str:
  for prefix in _PREFIXES:
    if name.startswith(prefix):
      return name[len(prefix):]
  return name


def params_from_hf(cfg: opt.OPTConfig, tensors: dict, source: str = "checkpoint") -> dict:
  """HF tensors (any of its name prefixes) -> our pure param dict (float32), every name and shape checked."""
  spec = _spec(cfg)
  found, head = {}, None
  for name, a in tensors.items():
    if name == _HEAD:
      head = a
      continue
    short = _strip(name)
    if short not in spec:
      raise ConfigError(f"{source}: unexpected tensor {name!r} (not in an OPT model of this config.json)")
    if short in found:
      raise ConfigError(f"{source}: tensor {name!r} appears twice (under two name prefixes)")
    want = spec[short][2]
    if tuple(a.shape) != want:
      raise ConfigError(f"{source}: tensor {name!r} has shape {tuple(a.shape)}, config.json implies {want}")
    found[short] = a
  missing = [n for n in spec if n not in found]
  if missing:
    raise ConfigError(f"{source}: missing tensor {'model.decoder.' + missing[0]!r} ({len(missing)} missing)")
  if head is not None and (head.shape != found["embed_tokens.weight"].shape
                           or not np.array_equal(head, found["embed_tokens.weight"])):
    raise ConfigError(f"{source}: {_HEAD} {tuple(head.shape)} differs from the embed_tokens.weight it is tied to")
  params, stacks = {}, {}
  for short, (path, layer, _, to_ours, _) in spec.items():
    value = to_ours(np.asarray(found[short], np.float32))
    if layer is not None:  # stacked below, in layer order
      stacks.setdefault(path, []).append(value)
      continue
    _put(params, path, jnp.asarray(value))
  for path, values in stacks.items():
    _put(params, path, jnp.asarray(np.stack(values)))
  return params


def _put(tree: dict, path, value) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def params_to_hf(cfg: opt.OPTConfig, params) -> dict:
  """Our params -> {HF OPTForCausalLM name: float32 array} (lm_head left to the tie, as save_pretrained does)."""
  out = {}
  for short, (path, layer, want, _, to_hf) in _spec(cfg).items():
    node = params
    for k in path:
      if k not in node:
        raise ConfigError(f"params lack {'/'.join(map(str, path))} (HF {short}) for this OPTConfig")
      node = node[k]
    node = np.asarray(node, np.float32)
    if layer is not None:
      if node.shape[:1] != (cfg.num_layers,):
        raise ConfigError(f"params {'/'.join(path)} of shape {node.shape} do not stack {cfg.num_layers} layers")
      node = node[layer]
    a = np.ascontiguousarray(to_hf(node))
    if a.shape != want:
      raise ConfigError(f"params {'/'.join(map(str, path))} gives shape {a.shape} for {short}, expected {want}")
    out["model.decoder." + short] = a
  return out


# --- files -----------------------------------------------------------------------------------------------------
def resolve_dir(path: str) -> str:
  """A save_pretrained folder or HF cache snapshot as is; a models--* cache root via refs/main."""
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise ConfigError(f"{path}: no such checkpoint directory")
  if os.path.isfile(os.path.join(path, CONFIG_JSON)):
    return path
  snaps = os.path.join(path, "snapshots")
  if os.path.isdir(snaps):
    ref = os.path.join(path, "refs", "main")
    if os.path.isfile(ref):
      with open(ref) as fh:
        chosen = os.path.join(snaps, fh.read().strip())
      if not os.path.isdir(chosen):
        raise ConfigError(f"{ref} names snapshot {os.path.basename(chosen)!r}, which is not in {snaps}")
      return chosen
    hashes = sorted(os.listdir(snaps))
    if len(hashes) == 1:
      return os.path.join(snaps, hashes[0])
    raise ConfigError(f"{path}: no refs/main and {len(hashes)} snapshots; pass the snapshot folder itself")
  raise ConfigError(f"{path}: no {CONFIG_JSON} (neither a save_pretrained folder nor an HF cache models--* folder)")


def _read_safetensors(file: str) -> dict:
  if not os.path.isfile(file):
    raise ConfigError(f"{file}: missing safetensors file")
  try:
    with safe_open(file, framework="np") as fh:
      return {k: fh.get_tensor(k) for k in fh.keys()}
  except (SafetensorError, OSError, ValueError) as e:
    raise ConfigError(f"{file}: unreadable safetensors file (truncated or corrupt: {str(e).splitlines()[0]})") from None


def _read_torch(file: str) -> dict:
  try:
    import torch
  except ImportError:
    raise ConfigError(f"{file}: pytorch_model.bin needs torch, which is not installed; convert it once where "
                      "torch is, e.g. transformers' from_pretrained(...).save_pretrained(dir, "
                      "safe_serialization=True)") from None
  if not os.path.isfile(file):
    raise ConfigError(f"{file}: missing checkpoint file")
  try:
    state = torch.load(file, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises many types for a bad file
    raise ConfigError(f"{file}: unreadable torch checkpoint ({type(e).__name__})") from None
  return {k: v.float().numpy() for k, v in state.items()}


def _read_sharded(folder: str, index: str, reader) -> dict:
  with open(os.path.join(folder, index)) as fh:
    weight_map = json.load(fh).get("weight_map")
  if not isinstance(weight_map, dict):
    raise ConfigError(f"{os.path.join(folder, index)}: no weight_map")
  tensors = {}
  for shard in sorted(set(weight_map.values())):
    tensors.update(reader(os.path.join(folder, shard)))
  absent = [n for n in weight_map if n not in tensors]
  if absent:
    raise ConfigError(f"{os.path.join(folder, weight_map[absent[0]])}: lacks tensor {absent[0]!r} named by {index}")
  return tensors


def read_tensors(folder: str) -> tuple[dict, str]:
  """All tensors of the checkpoint in `folder` and a description of where they came from."""
  if os.path.isfile(os.path.join(folder, ST_INDEX)):
    return _read_sharded(folder, ST_INDEX, _read_safetensors), os.path.join(folder, ST_INDEX)
  if os.path.isfile(os.path.join(folder, ST_FILE)):
    file = os.path.join(folder, ST_FILE)
    return _read_safetensors(file), file
  if os.path.isfile(os.path.join(folder, PT_INDEX)):
    return _read_sharded(folder, PT_INDEX, _read_torch), os.path.join(folder, PT_INDEX)
  if os.path.isfile(os.path.join(folder, PT_FILE)):
    file = os.path.join(folder, PT_FILE)
    return _read_torch(file), file
  raise ConfigError(f"{os.path.join(folder, ST_FILE)}: missing safetensors file (nor {ST_INDEX} or {PT_FILE})")


def load_opt(path: str, dtype: str = "bfloat16") -> tuple[opt.OPTConfig, dict]:
  """(OPTConfig, float32 params) from a local HF OPT checkpoint; `dtype` is the compute dtype of the config."""
  folder = resolve_dir(path)
  cfg_file = os.path.join(folder, CONFIG_JSON)
  try:
    with open(cfg_file) as fh:
      cfg_dict = json.load(fh)
  except (OSError, json.JSONDecodeError) as e:
    raise ConfigError(f"{cfg_file}: unreadable ({type(e).__name__})") from None
  cfg = config_from_hf(cfg_dict, cfg_file, dtype)
  tensors, source = read_tensors(folder)
  return cfg, params_from_hf(cfg, tensors, source)


def save_opt(cfg: opt.OPTConfig, params, out_dir: str) -> None:
  """config.json + model.safetensors (float32) that OPTForCausalLM.from_pretrained(out_dir) loads."""
  opt.validate(cfg)
  tensors = params_to_hf(cfg, params)
  os.makedirs(out_dir, exist_ok=True)
  save_file(tensors, os.path.join(out_dir, ST_FILE), metadata={"format": "pt"})
  with open(os.path.join(out_dir, CONFIG_JSON), "w") as fh:
    json.dump(config_to_hf(cfg), fh, indent=2, sort_keys=True)
