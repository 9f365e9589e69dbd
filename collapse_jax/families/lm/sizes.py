"""What an OPT is before any weights: its config (OPTConfig, checked by `validate`), the published sizes
(`SIZES`, `get_size`), and what a size costs (parameters, training FLOPs per token). model.py builds and runs it;
the LM family, the planner and the benchmarks size runs from here without building one."""
import dataclasses

import jax
import jax.numpy as jnp

from collapse_jax.errors import ConfigError

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class OPTConfig:
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  ffn_dim: int
  max_position_embeddings: int
  word_embed_proj_dim: int
  do_layer_norm_before: bool = True
  dropout: float = 0.1
  attention_dropout: float = 0.0
  pad_token_id: int = 1
  bos_token_id: int = 2
  eos_token_id: int = 2
  dtype: str = "bfloat16"
  scan_layers: bool = True     # layers as one lax.scan over stacked parameters: compile time flat in depth
  remat: str = "none"          # activation rematerialisation per layer in training: none | dots | full

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads


def _published(hidden, layers, heads, proj=None, pre_ln=True) -> OPTConfig:
  return OPTConfig(vocab_size=50272, hidden_size=hidden, num_layers=layers, num_heads=heads, ffn_dim=4 * hidden,
                   max_position_embeddings=2048, word_embed_proj_dim=proj or hidden, do_layer_norm_before=pre_ln)


SIZES: dict[str, OPTConfig] = {
    "tiny": OPTConfig(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, ffn_dim=256,
                      max_position_embeddings=256, word_embed_proj_dim=64),
    "opt-125m": _published(768, 12, 12),
    "opt-350m": _published(1024, 24, 16, proj=512, pre_ln=False),
    "opt-1.3b": _published(2048, 24, 32),
    "opt-2.7b": _published(2560, 32, 32),
    "opt-6.7b": _published(4096, 32, 32),
    "opt-13b": _published(5120, 40, 40),
    "opt-30b": _published(7168, 48, 56),
    "opt-66b": _published(9216, 64, 72),
}
REMAT = ("none", "dots", "full")


def validate(cfg: OPTConfig) -> None:
  for f in ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_dim", "max_position_embeddings",
            "word_embed_proj_dim"):
    v = getattr(cfg, f)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      raise ConfigError(f"OPTConfig.{f} must be a positive integer, got {v!r}")
  if cfg.hidden_size % cfg.num_heads:
    raise ConfigError(f"OPTConfig.hidden_size={cfg.hidden_size} is not a multiple of num_heads={cfg.num_heads}")
  for f in ("dropout", "attention_dropout"):
    v = getattr(cfg, f)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
      raise ConfigError(f"OPTConfig.{f} must be in [0, 1), got {v!r}")
  if cfg.dtype not in DTYPES:
    raise ConfigError(f"OPTConfig.dtype={cfg.dtype!r} is not one of {', '.join(DTYPES)}")
  for f in ("do_layer_norm_before", "scan_layers"):
    if not isinstance(getattr(cfg, f), bool):
      raise ConfigError(f"OPTConfig.{f} must be a bool, got {getattr(cfg, f)!r}")
  if cfg.remat not in REMAT:
    raise ConfigError(f"OPTConfig.remat={cfg.remat!r} is not one of {', '.join(REMAT)}")


def get_size(name: str, **overrides) -> OPTConfig:
  if name not in SIZES:
    raise ConfigError(f"unknown OPT size {name!r}; known sizes: {', '.join(SIZES)}")
  fields = {f.name for f in dataclasses.fields(OPTConfig)}
  for k in overrides:
    if k not in fields:
      raise ConfigError(f"OPTConfig has no field {k!r} (override of size {name!r})")
  cfg = dataclasses.replace(SIZES[name], **overrides)
  validate(cfg)
  return cfg


def count_params(params) -> int:
  return sum(int(leaf.size) for leaf in jax.tree.leaves(params))


def flops_per_token(cfg: OPTConfig, seq_len: int) -> float:
  """Training FLOPs per token (forward + backward = 3 x forward), PaLM's appendix-B convention:

    6 * N + 12 * num_layers * hidden_size * seq_len

  N counts the weights that take part in matmuls: every layer's kernels, project_in/out, and the token table
  once, as the tied LM head (its lookup is free). Biases, LayerNorms and the position table are left out (the
  position lookup is free; biases and norms are O(hidden) per token). The attention term is full (not
  causal-halved) attention: Q K^T and probs V are 2 * seq_len * hidden multiply-adds each per layer and token.
  """
  e, f, p = cfg.hidden_size, cfg.ffn_dim, cfg.word_embed_proj_dim
  per_layer = 4 * e * e + 2 * e * f
  n = cfg.num_layers * per_layer + cfg.vocab_size * p + (2 * e * p if p != e else 0)
  return 6.0 * n + 12.0 * cfg.num_layers * e * seq_len
