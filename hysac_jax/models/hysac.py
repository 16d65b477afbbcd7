"""The HySAC model: CLIP towers with LoRA, lifted onto the hyperboloid.

SPEC.md §2. The module holds the CLIP towers (submodule "clip") and four
learned head scalars, stored as logarithms:

  log_curv         init log(curv_init),        clamped to [log(c0/10), log(10 c0)]
  log_alpha_image  init log(embed_dim^-0.5),   clamped to <= 0
  log_alpha_text   init log(embed_dim^-0.5),   clamped to <= 0
  log_logit_scale  init log(1/0.07),           clamped to [log(1/0.07), log(100)]

The clamps are applied functionally whenever a value is used (`head_scalars`)
and, in the train step, the stored values are projected back into range after
every update (`project_head`), so a checkpoint never holds an out-of-range
value. Inside the range (bounds included) the clamp passes the gradient
through unchanged, as `torch.clamp` does; the initial logit scale sits exactly
on its lower bound and must still learn.

Params tree: {"clip": <CLIPModel tree>, "log_curv": (), "log_alpha_image": (),
"log_alpha_text": (), "log_logit_scale": ()}.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hysac_jax import lorentz
from hysac_jax.models.clip import CLIPModel

HEAD_NAMES = ("log_curv", "log_alpha_image", "log_alpha_text",
              "log_logit_scale")
MODES = ("hyp", "euc")


def check_mode(mode):
  """Raises ValueError unless `mode` is one of `MODES` (config.model.mode)."""
  if mode not in MODES:
    raise ValueError(f"model mode {mode!r} (config.model.mode) is not one "
                     f"of {MODES}")


def l2_normalize(x, eps=1e-12):
  """x / ||x|| over the last axis: the points of the "euc" mode (CLIP).

  A zero vector stays zero, with a finite gradient.
  """
  sq = jnp.sum(x * x, axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, eps))


def head_init(projection_dim, curv_init=1.0):
  """The initial stored value of each head scalar (floats, see the module).

  Args:
    projection_dim: width of the CLIP projections (sets alpha's init).
    curv_init: the initial curvature c0.
  """
  alpha = math.log(projection_dim ** -0.5)
  return {"log_curv": math.log(curv_init), "log_alpha_image": alpha,
          "log_alpha_text": alpha, "log_logit_scale": math.log(1 / 0.07)}


def head_bounds(curv_init=1.0):
  """Inclusive (low, high) bounds of each stored log-scalar."""
  return {
      "log_curv": (math.log(curv_init / 10.0), math.log(curv_init * 10.0)),
      "log_alpha_image": (-math.inf, 0.0),
      "log_alpha_text": (-math.inf, 0.0),
      "log_logit_scale": (math.log(1 / 0.07), math.log(100.0)),
  }


def clamp(x, low, high):
  """`clip(x, low, high)` whose gradient is 1 on the closed range, 0 outside.

  `jnp.clip` halves the gradient at a bound (ties in max/min), which would
  slow the logit scale, initialised on its lower bound.
  """
  inside = (x >= low) & (x <= high)
  return jnp.where(inside, x, jnp.clip(x, low, high))


def head_scalars(params, curv_init=1.0):
  """The four head values, clamped and exponentiated.

  Args:
    params: the HySAC params tree (its top-level `log_*` leaves are read).
    curv_init: the initial curvature c0 that sets the curvature's range.

  Returns:
    dict(curv, alpha_image, alpha_text, logit_scale) of float32 scalars.
  """
  missing = [k for k in HEAD_NAMES if k not in params]
  if missing:
    raise KeyError(f"HySAC params lack head scalars {missing}; "
                   f"top-level keys are {sorted(params)}")
  out = {}
  for name, (low, high) in head_bounds(curv_init).items():
    value = lorentz.at_least_float32(params[name])
    out[name[len("log_"):]] = jnp.exp(clamp(value, low, high))
  return out


def project_head(params, curv_init=1.0):
  """Returns `params` with the stored head scalars clipped into range.

  Args:
    params: any dict holding some of the `log_*` head scalars at top level
      (the full tree or its trainable part).
    curv_init: the initial curvature c0.
  """
  out = dict(params)
  for name, (low, high) in head_bounds(curv_init).items():
    if name in out:
      out[name] = jnp.clip(out[name], low, high).astype(out[name].dtype)
  return out


def lift(features, alpha, curv):
  """Euclidean features -> hyperboloid: `exp_map0(alpha * features, curv)`.

  Args:
    features: (B, D) projected CLIP features (not normalised).
    alpha: scalar feature scale.
    curv: scalar curvature magnitude.

  Returns:
    (B, D) float32 space components (float64 for float64 inputs).
  """
  return lorentz.exp_map0(alpha * lorentz.at_least_float32(features), curv)


class HySAC(nn.Module):
  """CLIP + LoRA towers whose features live on a Lorentz hyperboloid.

  Attributes:
    clip: CLIPConfig of the towers.
    lora: LoRAConfig (None or rank 0: no LoRA).
    mode: "hyp" (HySAC: points on the hyperboloid) or "euc" (the CLIP
      baseline: L2-normalised features, cosine logits).
    dtype: tower compute dtype; params, head and geometry stay float32.
    remat: rematerialisation of tower blocks in the backward pass: "none",
      "dots_saveable" or "full" (`clip.Encoder`).
    curv_init: initial curvature c0 (also sets its clamp range).
    attention: the towers' attention implementation: None/"auto", "xla" or
      "cudnn" (`clip.attention_implementation`).
    scan_layers: the towers' layers under `nn.scan` (`clip.Encoder`).
  """
  clip: Any
  lora: Any = None
  mode: str = "hyp"
  dtype: Any = jnp.float32
  remat: Any = "none"
  curv_init: float = 1.0
  attention: str | None = None
  scan_layers: bool = False

  @nn.compact
  def __call__(self, pixels=None, input_ids=None, deterministic=True):
    """Embeds images and/or captions.

    Args:
      pixels: optional (B, H, W, 3) float32 normalised NHWC images.
      input_ids: optional (B', L) int32 token ids.
      deterministic: False enables LoRA dropout (rng stream "dropout").

    Returns:
      (image_points, text_points): (B, D) and (B', D) float32, or None for
      an input not given. Space components on the hyperboloid in "hyp"
      mode; unit vectors in "euc" mode.
    """
    check_mode(self.mode)
    towers = CLIPModel(self.clip, self.lora, dtype=self.dtype,
                       remat=self.remat, attention=self.attention,
                       scan=self.scan_layers,
                       name="clip")
    init = head_init(self.clip.projection_dim, self.curv_init)
    head = {name: self.param(name, lambda _, v=init[name]: jnp.asarray(
        v, jnp.float32)) for name in HEAD_NAMES}
    scalars = head_scalars(head, self.curv_init)

    def finish(features, alpha):
      features = lorentz.at_least_float32(features)  # bf16 -> f32; f64 stays
      if self.mode == "euc":
        return l2_normalize(features)
      return lift(features, alpha, scalars["curv"])

    image = text = None
    if pixels is not None:
      image = finish(towers.encode_image(pixels, deterministic=deterministic),
                     scalars["alpha_image"])
    if input_ids is not None:
      text = finish(towers.encode_text(input_ids, deterministic=deterministic),
                    scalars["alpha_text"])
    return image, text

  def encode_image(self, pixels, deterministic=True):
    """(B, H, W, 3) images -> (B, D) points (see `__call__`)."""
    return self(pixels=pixels, deterministic=deterministic)[0]

  def encode_text(self, input_ids, deterministic=True):
    """(B, L) int32 token ids -> (B, D) points (see `__call__`)."""
    return self(input_ids=input_ids, deterministic=deterministic)[1]
