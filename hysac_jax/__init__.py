"""hysac-jax: Hyperbolic Safety-Aware CLIP (HySAC) in JAX and Flax."""

__version__ = "0.1.0"


def load_pretrained(path, **kwargs):
  """Loads a converted HySAC directory (see `hysac_jax.convert`).

  Keyword arguments (`dtype`, `merge`) go to `hysac_jax.convert.load_pretrained`.
  """
  from hysac_jax.convert import load_pretrained as _load
  return _load(path, **kwargs)
