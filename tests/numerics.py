"""Parity tolerances from the floating-point error model, not from one CPU.

Two kinds of check, used by every parity test of the suite:

- **float64 on both sides** (JAX under `jax.enable_x64`, torch `.double()`):
  proves that the *math* is the same. Rounding is then ~1e-16 per operation,
  so a relative bound of `F64_RTOL` = 1e-10 (of the largest output) holds on
  any CPU while still catching a wrong constant (say an epsilon of 1e-5 for
  1e-6, a relative change of ~1e-6).
- **float32** (what users run): two implementations round differently
  (kernel choice, blocking, FMA, summation order differ between CPUs), so
  the bound comes from the error model. A length-K reduction rounds with a
  relative error of about sqrt(K)·u (u = 2^-24, the float32 unit roundoff;
  the probabilistic model of Higham & Mary, SIAM J. Sci. Comput. 2019),
  relative to the magnitudes involved. Over a tower of `depth` sequential
  matmuls the errors of both implementations add, and LayerNorm keeps the
  activations at unit scale, so

      |ours - theirs| <= SAFETY · 2 · depth · sqrt(K) · u · max|theirs|

  with K the longest reduction and SAFETY = 4 for the constants the model
  leaves out. For a 2-layer ViT-L (depth 14, K = 4096) that is 4.3e-4 of the
  largest output; a structural bug (wrong transpose, activation, mask or
  pooling) changes outputs by O(1) of it.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

F32_UNIT_ROUNDOFF = 2.0**-24
F64_RTOL = 1e-10
SAFETY = 4.0


def float32_atol(reference, reduction, depth):
  """Absolute float32 parity bound for outputs like `reference`.

  Args:
    reference: the other implementation's outputs.
    reduction: K, the longest reduction (inner dimension) in the computation.
    depth: the number of sequential matmuls (roundings of length-K sums).

  Returns:
    SAFETY · 2 · depth · sqrt(K) · u · max|reference|, a float.
  """
  scale = float(np.max(np.abs(np.asarray(reference, np.float64))))
  return SAFETY * 2 * depth * math.sqrt(reduction) * F32_UNIT_ROUNDOFF * scale


def tower_error_terms(config, tower):
  """(K, depth) of one CLIP tower for `float32_atol`.

  Per encoder layer: q/k/v, scores, probs·v, out_proj, fc1, fc2 (6 roundings
  in sequence), plus the patch or token embedding and the projection. K is
  the longest of the widths, the MLP width, the sequence and the patch.
  """
  cfg = getattr(config, tower)
  if tower == "vision":
    seq = (cfg.image_size // cfg.patch_size)**2 + 1
    first = cfg.patch_size**2 * cfg.num_channels
  else:
    seq, first = cfg.max_position_embeddings, 1
  k = max(cfg.hidden_size, cfg.intermediate_size, seq, first)
  return k, 6 * cfg.num_hidden_layers + 2


def assert_float32_parity(ours, theirs, reduction, depth):
  """|ours - theirs| <= float32_atol(theirs, reduction, depth), elementwise."""
  ours = np.asarray(ours, np.float64)
  theirs = np.asarray(theirs, np.float64)
  atol = float32_atol(theirs, reduction, depth)
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=atol,
                             err_msg=f"float32 error-model bound {atol:.3g} "
                                     f"(K={reduction}, depth={depth})")


def assert_float64_parity(ours, theirs):
  """max|ours - theirs| <= F64_RTOL · max|theirs| (float64 on both sides)."""
  ours, theirs = np.asarray(ours), np.asarray(theirs)
  assert ours.dtype == np.float64 and theirs.dtype == np.float64, (
      ours.dtype, theirs.dtype)
  atol = F64_RTOL * float(np.max(np.abs(theirs)))
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=atol)


def to_float64(tree):
  """A params tree as float64 jax arrays (call under `jax.enable_x64`)."""
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), tree)
