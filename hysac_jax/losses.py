"""HySAC's training losses: contrastive and entailment terms (SPEC.md §3).

A training example is a quadruple: safe caption `S`, unsafe caption `U`, safe
image `V` and unsafe image `G`, each embedded as a point on the hyperboloid
(space components, `(B, d)`). The loss has seven terms:

  contrastive_safe     L_c(S, V)        entail_safe     mean E(S -> V)
  contrastive_unsafe   L_c(U, G)        entail_unsafe   mean E(U -> G)
  contrastive_cross_a  L_c(S, G)        entail_d        mean E(V -> U)
  contrastive_cross_b  L_c(U, V)

where `L_c` is the symmetric InfoNCE over logits `-scale * pairwise_dist` and
`E(x -> y)` the entailment energy of `lorentz.entailment_energy` (zero iff `y`
lies in the cone of `x`).

Everything is computed in (at least) float32, whatever the towers ran in.

Negatives. The functions below see *global* arrays: under `jit` with the batch
sharded over a device mesh, the `(B, B)` logits of the whole global batch are
computed (XLA partitions them by rows; this equals gathering every device's
embeddings and offsetting the targets by the device index). With
`local_negatives=True` the batch is cut into `num_groups` contiguous groups of
equal size (one per device: the rows each device holds) and each group is its
own contrastive problem, which reproduces the PyTorch release.
"""

from typing import Any

import jax
import jax.numpy as jnp

from hysac_jax import lorentz
from hysac_jax.models import hysac as hysac_lib

TERM_NAMES = (
    "contrastive_safe",
    "contrastive_unsafe",
    "contrastive_cross_a",
    "contrastive_cross_b",
    "entail_safe",
    "entail_unsafe",
    "entail_d",
)

# A logit for a masked-out (padding) column: finite, so gradients stay finite,
# and far below any real logit (|logit| <= 100 * max distance).
_MASKED_LOGIT = -1e9


def _valid_mask(mask, n):
  """(n,) bool validity from an optional bool/float mask."""
  if mask is None:
    return jnp.ones((n,), bool)
  mask = jnp.asarray(mask)
  if mask.shape != (n,):
    raise ValueError(f"mask has shape {mask.shape}, expected ({n},)")
  return mask > 0


def _group(x, num_groups):
  """(B, ...) -> (num_groups, B // num_groups, ...) contiguous groups."""
  b = x.shape[0]
  if b % num_groups:
    raise ValueError(
        f"batch of {b} cannot be cut into {num_groups} equal groups for local "
        "negatives (config.loss.local_negatives)")
  return x.reshape((num_groups, b // num_groups) + x.shape[1:])


def _symmetric_info_nce_sum(logits, valid):
  """Summed symmetric cross-entropy with diagonal targets.

  Args:
    logits: (G, n, n) text-by-image logits of G independent groups.
    valid: (G, n) bool; invalid rows are not queries and not negatives.

  Returns:
    (sum over valid rows of (CE text->image + CE image->text) / 2, count).
  """
  diag = jnp.diagonal(logits, axis1=-2, axis2=-1)  # (G, n)
  by_row = jnp.where(valid[:, None, :], logits, _MASKED_LOGIT)
  by_col = jnp.where(valid[:, :, None], logits, _MASKED_LOGIT)
  ce_text = jax.nn.logsumexp(by_row, axis=-1) - diag  # text i vs all images
  ce_image = jax.nn.logsumexp(by_col, axis=-2) - diag  # image j vs all texts
  per_row = 0.5 * (ce_text + ce_image)
  total = jnp.sum(jnp.where(valid, per_row, 0.0))
  return total, jnp.sum(valid)


def info_nce_from_logits(logits_fn, text, image, mask=None, num_groups=1):
  """Symmetric InfoNCE averaged over valid rows, optionally within groups.

  Args:
    logits_fn: (G, n, d), (G, n, d) -> (G, n, n) logits within each group.
    text: (B, d) caption embeddings.
    image: (B, d) image embeddings; row i is the positive of text row i.
    mask: optional (B,) validity (padding rows are ignored).
    num_groups: 1 for negatives from the whole batch, else the number of
      equal contiguous groups that are separate contrastive problems.

  Returns:
    Scalar: mean over valid rows of (CE(text -> image) + CE(image -> text)) / 2.
    With equal groups and no padding this is the mean of the group losses.
  """
  valid = _group(_valid_mask(mask, text.shape[0]), num_groups)
  logits = logits_fn(_group(text, num_groups), _group(image, num_groups))
  total, count = _symmetric_info_nce_sum(logits, valid)
  return total / jnp.maximum(count, 1)


def contrastive_loss(text, image, curv, logit_scale, mask=None, num_groups=1):
  """Symmetric InfoNCE over hyperbolic logits `-logit_scale * d(t, v)`.

  Args:
    text: (B, d) caption points (space components).
    image: (B, d) image points; row i is the positive of text row i.
    curv: scalar curvature magnitude c > 0.
    logit_scale: scalar temperature (already exponentiated and clamped).
    mask: optional (B,) validity.
    num_groups: see `info_nce_from_logits`.

  Returns:
    Scalar float32 loss.
  """
  text, image = lorentz.at_least_float32(text), lorentz.at_least_float32(image)
  curv, logit_scale = lorentz.at_least_float32(curv), lorentz.at_least_float32(logit_scale)

  def logits_fn(t, v):
    return -logit_scale * lorentz.pairwise_dist(t, v, curv)

  return info_nce_from_logits(logits_fn, text, image, mask, num_groups)


def cosine_contrastive_loss(text, image, logit_scale, mask=None, num_groups=1):
  """CLIP's loss: symmetric InfoNCE over `logit_scale * cos(t, v)`.

  Args:
    text: (B, d) caption features (L2-normalised here, so any norm works).
    image: (B, d) image features.
    logit_scale: scalar temperature.
    mask, num_groups: as in `contrastive_loss`.

  Returns:
    Scalar float32 loss.
  """
  text, image = lorentz.at_least_float32(text), lorentz.at_least_float32(image)
  logit_scale = lorentz.at_least_float32(logit_scale)
  text = hysac_lib.l2_normalize(text)
  image = hysac_lib.l2_normalize(image)

  def logits_fn(t, v):
    return logit_scale * jnp.einsum("gid,gjd->gij", t, v)

  return info_nce_from_logits(logits_fn, text, image, mask, num_groups)


def entailment_loss(x, y, curv, aperture_scale=1.0, mask=None):
  """Mean entailment energy `E(x -> y)`: x (general) should contain y.

  Args:
    x: (B, d) parent points (whose cones should hold y).
    y: (B, d) child points.
    curv: scalar curvature magnitude.
    aperture_scale: multiplies the half-aperture of x's cone.
    mask: optional (B,) validity.

  Returns:
    Scalar float32 mean over valid rows of `max(0, angle - s * aperture)`.
  """
  x, y, curv = lorentz.at_least_float32(x), lorentz.at_least_float32(y), lorentz.at_least_float32(curv)
  energy = lorentz.entailment_energy(x, y, curv, aperture_scale=aperture_scale)
  valid = _valid_mask(mask, x.shape[0])
  return jnp.sum(jnp.where(valid, energy, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def term_weights(entail_weight):
  """The release's weights `[1, 1, 1, 1, lam, lam, lam]`, normalised by sum."""
  w = jnp.array([1.0, 1.0, 1.0, 1.0] + [entail_weight] * 3, jnp.float32)
  return w / jnp.sum(w)


def hysac_loss(S, U, V, G, curv, logit_scale, config: Any, *, mask=None,
               num_groups=1, mode="hyp"):
  """The HySAC loss on a batch of embedded quadruples (SPEC.md §3).

  Args:
    S: (B, d) safe captions.     U: (B, d) unsafe captions.
    V: (B, d) safe images.       G: (B, d) unsafe images.
      Points on the hyperboloid (space components) in "hyp" mode; CLIP
      features (normalised here) in "euc" mode.
    curv: scalar curvature magnitude (ignored in "euc" mode).
    logit_scale: scalar temperature.
    config: `config.loss` (fields `entail_weight`, `aperture_scale`,
      `local_negatives`; any object with those attributes).
    mask: optional (B,) validity of the quadruples.
    num_groups: the number of equal groups (devices) used when
      `config.local_negatives` is set; ignored otherwise.
    mode: "hyp" (HySAC) or "euc" (the CLIP baseline: cosine logits, the four
      contrastive terms only; the entailment terms are reported as 0 and the
      total is the mean of the four contrastive terms, i.e. CLIP's loss).

  Returns:
    (total, terms): the scalar total and a dict of the seven named terms.
  """
  hysac_lib.check_mode(mode)
  entail_weight = float(config.entail_weight)
  aperture_scale = float(config.aperture_scale)
  groups = num_groups if config.local_negatives else 1

  if mode == "hyp":
    def con(t, v):
      return contrastive_loss(t, v, curv, logit_scale, mask, groups)
  else:
    def con(t, v):
      return cosine_contrastive_loss(t, v, logit_scale, mask, groups)

  # The four contrastive terms run as one batched problem (and the three
  # entailment terms as another): the same values as four (three) separate
  # calls, with a quarter (a third) of the ops to compile.
  texts, images = jnp.stack([S, U, S, U]), jnp.stack([V, G, G, V])
  contrastive = jax.vmap(con)(texts, images)
  terms = dict(zip(TERM_NAMES[:4], contrastive))
  if mode == "hyp":
    def ent(x, y):
      return entailment_loss(x, y, curv, aperture_scale, mask)
    entail = jax.vmap(ent)(jnp.stack([S, U, V]), jnp.stack([V, G, U]))
    terms.update(zip(TERM_NAMES[4:], entail))
    stacked = jnp.concatenate([contrastive, entail])
    # The release divides the normalised weighted sum by the number of terms
    # (7) as well: a constant factor, kept so logged losses match the release.
    total = jnp.sum(term_weights(entail_weight) * stacked) / len(TERM_NAMES)
  else:
    zero = jnp.zeros((), jnp.float32)
    for k in TERM_NAMES[4:]:
      terms[k] = zero
    total = jnp.sum(contrastive) / 4.0
  return total, terms
