"""Family name -> class, and the one way a family is built from a config. Classes are imported lazily so a GMM
run never imports the VAE's Flax modules, and vice versa."""
import importlib

from collapse_jax import config as config_lib
from collapse_jax.errors import ConfigError

FAMILIES = {
    "gaussian": "collapse_jax.families.gaussian.family:GaussianFamily",
    "gmm": "collapse_jax.families.gmm.family:GMMFamily",
    "vae": "collapse_jax.families.vae.family:VAEFamily",
    "lm": "collapse_jax.families.lm.family:LMFamily",
}


def family_class(name: str):
  if not isinstance(name, str) or name not in FAMILIES:
    raise ConfigError(f"config.family={name!r} is not one of {', '.join(FAMILIES)}")
  module, cls = FAMILIES[name].split(":")
  return getattr(importlib.import_module(module), cls)


def build(cfg, mesh=None, devices=None, abstract: bool = False):
  """(run, family) from a config: the loop-level fields and the family's section checked once (config.parse,
  Family.parse), the mesh the family asks for over `devices` unless one is given, then the family."""
  cls = family_class(cfg.get("family"))  # first: it names the section the loop-level fields leave to the family
  run = config_lib.parse(cfg)
  c = cls.parse(run, cfg.get(run.family))
  mesh = mesh if mesh is not None else cls.make_mesh(run, c, devices)
  return run, cls(run, c, mesh, abstract=abstract)
