"""Family name -> class. Imported lazily so a GMM run never imports the VAE's Flax modules, and vice versa."""
import importlib

from collapse_jax.config import ConfigError

FAMILIES = {
    "gaussian": "collapse_jax.gaussian:GaussianFamily",
    "gmm": "collapse_jax.gmm:GMMFamily",
    "vae": "collapse_jax.vae:VAEFamily",
    "lm": "collapse_jax.lm:LMFamily",
}


def family_class(name: str):
  if name not in FAMILIES:
    raise ConfigError(f"config.family={name!r} is not one of {', '.join(FAMILIES)}")
  module, cls = FAMILIES[name].split(":")
  return getattr(importlib.import_module(module), cls)
