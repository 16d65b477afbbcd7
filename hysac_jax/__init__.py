"""hysac-jax: Hyperbolic Safety-Aware CLIP (HySAC) in JAX and Flax."""

__version__ = "0.1.0"


def load_pretrained(path, dtype=None, merge=False):
  """Deprecated: use `hysac_jax.serving.load_model(path)`.

  Reads any model directory `serving.load_model` reads (a converted
  directory, a run, an export); `merge` folds LoRA into the base weights.
  """
  # A deprecated alias: serving (jax, the models) loads only when it is used,
  # not on `import hysac_jax`.
  import warnings  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from hysac_jax import serving  # pylint: disable=g-import-not-at-top
  warnings.warn("hysac_jax.load_pretrained is deprecated; use "
                "hysac_jax.serving.load_model", DeprecationWarning,
                stacklevel=2)
  return serving.load_model(path, dtype=dtype or jnp.float32,
                            merge_lora=merge)
