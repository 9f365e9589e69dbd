"""collapse_jax: model-collapse experiments (Shumailov et al., Nature 2024) in JAX + Flax."""

__version__ = "0.1.0"
