"""Flax NNX modules of the model families (the VAE; the LM lives in opt.py)."""
