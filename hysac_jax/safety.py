"""Safety toolkit: distance bounds, safety traversal, unsafe classification.

HySAC puts safe content near the origin of the hyperboloid and unsafe content
further out (SPEC §4). Everything here works on embeddings (space components,
`(..., d)`) and a curvature `c`; nothing knows about models or files except
the two bounds helpers, which read and write the release's
`hysac_bounds.json`:

    {"S": {"avg": float, "low_05": float, "up_95": float}, "U": {...},
     "V": {...}, "G": {...}}

(S safe text, U unsafe text, V safe images, G unsafe images; distances from
the origin over the validation split: mean, 5th and 95th percentile).

Safety traversal moves a query whose distance from the origin exceeds

    b' = b + tanh((b − α) / c) + 1

toward the origin, with b the 95th percentile (`up_95`) of a safe group and
c the curvature magnitude `exp(log_curv)` — in the release `curv.exp()` of the
model's log-curvature parameter, not the parameter itself.
"""

from __future__ import annotations

import functools
import json
import math
import os
import warnings
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from hysac_jax import finite
from hysac_jax import lorentz

GROUPS = ("S", "U", "V", "G")
STATS = ("avg", "low_05", "up_95")
# How a point is moved to distance b' (`traverse_to_safe(method=)`).
TRAVERSAL_METHODS = ("geodesic", "release")
DEFAULT_ALPHA = 0.8
# Our bounds file, in a run directory and a converted one (the release names
# its own `hysac_bounds.json`: `formats.release.BOUNDS_FILE`).
BOUNDS_FILE = "bounds.json"
# Which safe group's bound each modality's queries are traversed to.
SAFE_GROUP = {"text": "S", "image": "V"}


# --------------------------------------------------------------------------
# Bounds


def origin_distance(emb, curv, mode="hyp"):
  """Distance from the origin (SPEC §4: farther = less safe).

  Args:
    emb: (..., d) space components on the hyperboloid (float32 or float64;
      bf16/fp16 compute in float32).
    curv: curvature magnitude c > 0.
    mode: "hyp", or "euc" for the Euclidean norm of CLIP features.

  Returns:
    (...,) distances in the caller's float dtype, at least float32; NaN
    where `emb` is not finite (never a "safe" 0).
  """
  emb = lorentz.at_least_float32(emb)
  if mode == "euc":
    return jnp.linalg.norm(emb, axis=-1)
  # dist0's clamps turn a NaN point into distance 0, "safe": a point with a
  # non-finite component gets a NaN distance, which the classifiers refuse.
  bad = ~jnp.all(jnp.isfinite(emb), axis=-1)
  return jnp.where(bad, jnp.nan, lorentz.dist0(emb, curv))


def unsafe_score(emb, curv):
  """Deprecated name of `origin_distance` (not predict's `unsafe_score`,
  which is the distance minus the threshold b')."""
  warnings.warn("safety.unsafe_score is deprecated; use "
                "safety.origin_distance", DeprecationWarning, stacklevel=2)
  return origin_distance(emb, curv)


def _group_stats(dist: np.ndarray) -> dict[str, float]:
  dist = np.asarray(dist, np.float64)
  return {
      "avg": float(dist.mean()),
      "low_05": float(np.percentile(dist, 5)),
      "up_95": float(np.percentile(dist, 95)),
  }


def compute_bounds(S, U, V, G, curv) -> dict[str, dict[str, float]]:
  """Distance-from-origin statistics of the four embedding groups.

  Percentiles use NumPy's default linear interpolation, on float64 copies of
  the float32 distances.

  Args:
    S, U, V, G: (n_*, d) safe text, unsafe text, safe image, unsafe image
      embeddings (space components).
    curv: curvature magnitude c.

  Returns:
    {"S": {"avg", "low_05", "up_95"}, "U": ..., "V": ..., "G": ...} floats.
  """
  groups = dict(zip(GROUPS, (S, U, V, G)))
  bounds = {}
  for name, emb in groups.items():
    emb = np.asarray(emb)
    if emb.ndim != 2 or emb.shape[0] == 0:
      raise ValueError(f"group {name}: expected a non-empty (n, d) array, got "
                       f"shape {emb.shape}")
    bounds[name] = _group_stats(np.asarray(origin_distance(emb, curv)))
  return bounds


def validate_bounds(bounds: Mapping, source: str = "bounds") -> dict:
  """Checks the release's bounds shape; returns a plain-dict copy.

  Extra groups or statistics are kept (a released file loads as is); the
  four groups with the three statistics must be there and be finite numbers.

  Raises:
    ValueError: naming `source` and the missing or bad key.
  """
  if not isinstance(bounds, Mapping):
    raise ValueError(f"{source}: expected a JSON object of groups, got "
                     f"{type(bounds).__name__}")
  out = {}
  for group, stats in bounds.items():
    out[group] = dict(stats) if isinstance(stats, Mapping) else stats
  for group in GROUPS:
    if group not in bounds:
      raise ValueError(f"{source}: missing group {group!r} (have "
                       f"{sorted(bounds)})")
    stats = bounds[group]
    if not isinstance(stats, Mapping):
      raise ValueError(f"{source}: group {group!r} must map statistics to "
                       f"numbers, got {type(stats).__name__}")
    for stat in STATS:
      if stat not in stats:
        raise ValueError(f"{source}: group {group!r} lacks {stat!r}")
      value = stats[stat]
      if isinstance(value, bool) or not isinstance(value, (int, float)) \
          or not math.isfinite(value):
        raise ValueError(f"{source}: {group}.{stat} must be a finite number, "
                         f"got {value!r}")
      out[group][stat] = float(value)
  return out


def save_bounds(bounds: Mapping, path: str | os.PathLike) -> None:
  """Writes bounds as `hysac_bounds.json` (release shape, indented JSON)."""
  bounds = validate_bounds(bounds, str(path))
  with open(path, "w") as f:
    finite.dump(bounds, f, indent=2)
    f.write("\n")


def load_bounds(path: str | os.PathLike) -> dict:
  """Reads a bounds JSON file (ours or the release's `hysac_bounds.json`)."""
  try:
    with open(path) as f:
      bounds = json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f"bounds file not found: {path}") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"bounds file is not valid JSON: {path}: {e}") from None
  return validate_bounds(bounds, str(path))


# --------------------------------------------------------------------------
# Safety traversal


def safety_threshold(bound, curv, alpha: float = DEFAULT_ALPHA):
  """The traversal threshold `b' = b + tanh((b − α)/c) + 1`.

  Args:
    bound: b, a distance (the safe group's `up_95`).
    curv: curvature magnitude c (not its log).
    alpha: α, 0.8 in the release.

  Returns:
    b' (same type as the inputs: float or jax scalar).
  """
  if isinstance(bound, (int, float)) and isinstance(curv, (int, float)):
    return bound + math.tanh((bound - alpha) / curv) + 1.0
  return bound + jnp.tanh((bound - alpha) / curv) + 1.0


@functools.partial(jax.jit, static_argnames=("method",))
def _traverse(emb, curv, threshold, method):
  dist = lorentz.dist0(emb, curv)
  outside = dist > threshold
  if method == "release":
    # The release treats the distance b' as a Euclidean norm of the space
    # components: x -> b' x / ||x||.
    norm = jnp.linalg.norm(emb, axis=-1, keepdims=True)
    safe_norm = jnp.where(norm > 0, norm, 1.0)
    moved = emb * (threshold / safe_norm)
  else:
    moved = lorentz.geodesic_toward_origin(emb, curv, threshold)
  return jnp.where(outside[..., None], moved, emb)


def traverse_to_safe(emb, curv, bound, alpha: float = DEFAULT_ALPHA,
                     method: str = "geodesic"):
  """Moves points farther than `b'` from the origin toward it (batched).

  Args:
    emb: (..., d) space components.
    curv: curvature magnitude c.
    bound: b, the safe group's 95th-percentile distance.
    alpha: α in the threshold.
    method: "geodesic" (default): slide along the geodesic to the origin
      until the distance is exactly b'. "release": rescale the space
      components to Euclidean norm b' (the release's rule; the distance then
      becomes asinh(sqrt(c)·b')/sqrt(c), not b').

  Returns:
    (..., d) in the caller's float dtype (at least float32); points with
    distance <= b' are returned unchanged.
  """
  if method not in TRAVERSAL_METHODS:
    raise ValueError(f"traversal method must be one of {TRAVERSAL_METHODS}, "
                     f"got {method!r}")
  emb = lorentz.at_least_float32(emb)
  curv = jnp.asarray(curv, emb.dtype)
  threshold = safety_threshold(jnp.asarray(bound, emb.dtype), curv, alpha)
  return _traverse(emb, curv, threshold, method)


def traverse_to_safe_image(emb, curv, bounds: Mapping,
                           alpha: float = DEFAULT_ALPHA,
                           method: str = "geodesic"):
  """`traverse_to_safe` with b = bounds["V"]["up_95"] (safe images)."""
  return traverse_to_safe(emb, curv, bounds["V"]["up_95"], alpha, method)


def traverse_to_safe_text(emb, curv, bounds: Mapping,
                          alpha: float = DEFAULT_ALPHA,
                          method: str = "geodesic"):
  """`traverse_to_safe` with b = bounds["S"]["up_95"] (safe text)."""
  return traverse_to_safe(emb, curv, bounds["S"]["up_95"], alpha, method)


# --------------------------------------------------------------------------
# Unsafe classification


def modality_threshold(curv, bounds: Mapping, modality: str,
                       alpha: float = DEFAULT_ALPHA) -> float:
  """The traversal threshold b' of a modality ("text": S, "image": V)."""
  if modality not in SAFE_GROUP:
    raise ValueError(f"modality must be 'text' or 'image', got {modality!r}")
  bound = finite.check_number(bounds[SAFE_GROUP[modality]]["up_95"],
                              "bounds", f"{SAFE_GROUP[modality]}.up_95")
  curv = finite.check_number(curv, "model", "curv", positive=True)
  alpha = finite.check_number(alpha, "model", "traversal_alpha")
  return finite.check_number(safety_threshold(bound, curv, alpha), "model",
                             f"threshold b' of {modality}")


def classify_unsafe(emb, curv, bounds: Mapping, modality: str,
                    alpha: float = DEFAULT_ALPHA):
  """Unsafe iff the distance from the origin exceeds the modality's `b'`.

  The threshold is the same b' that decides whether a query is traversed, so
  "classified safe" and "left unchanged by traversal" coincide. It fails
  closed: a non-finite threshold raises `finite.NonFiniteError`, and a
  non-finite distance (NaN weights, say) is unsafe, never safe.

  Args:
    emb: (..., d) space components.
    curv: curvature magnitude.
    bounds: release-shaped bounds.
    modality: "text" (threshold from S) or "image" (from V).

  Returns:
    (...,) bool, True = unsafe.
  """
  threshold = modality_threshold(curv, bounds, modality, alpha)
  return unsafe_at(origin_distance(emb, curv), threshold)


def unsafe_at(distance, threshold):
  """(...,) distances -> (...,) bool: unsafe unless `distance <= threshold`
  holds, so a NaN distance is unsafe (a plain `>` would call it safe)."""
  return ~(distance <= threshold)


# --------------------------------------------------------------------------
# Traversal to the root (MERU §5)


def traverse_to_root(emb, curv, steps: int = 50):
  """Points between an embedding and the origin, interpolated in tangent space.

  Linear interpolation between `log_map0(emb)` and 0, lifted back with
  `exp_map0`; ordered from the embedding itself (step 0) to the root (last).

  Args:
    emb: (..., d) space components.
    curv: curvature magnitude.
    steps: number of points (>= 2).

  Returns:
    (steps, ..., d) in the caller's float dtype (at least float32).
  """
  if steps < 2:
    raise ValueError(f"steps must be at least 2, got {steps}")
  emb = lorentz.at_least_float32(emb)
  tangent = lorentz.log_map0(emb, curv)
  weights = jnp.linspace(1.0, 0.0, steps).reshape((steps,) + (1,) * emb.ndim)
  return lorentz.exp_map0(weights * tangent[None], curv)


@jax.jit
def _nearest_entailing(points, captions, curv):
  """Per point, the nearest caption whose cone contains it.

  Args:
    points: (steps, d); captions: (m + 1, d), the last row the root (zeros).

  Returns:
    (steps,) int32 indices into `captions`.
  """
  is_root = jnp.arange(captions.shape[0]) == captions.shape[0] - 1

  def one_point(point):
    scores = -lorentz.dist(point[None, :], captions, curv)  # (m + 1,)
    energy = lorentz.entailment_energy(captions, point[None, :], curv)
    # The root's cone is the whole space (its aperture is undefined at 0).
    allowed = (energy <= 0) | is_root
    return jnp.argmax(jnp.where(allowed, scores, -jnp.inf)).astype(jnp.int32)

  return jax.lax.map(one_point, points)


def retrieve_along_traversal(image_emb, caption_embs, captions, curv,
                             steps: int = 50, root_caption: str = "[ROOT]"):
  """Nearest entailing caption at each step of the traversal to the root.

  At each of `steps` points from the image to the origin, captions are ranked
  by −distance, keeping only those whose entailment cone contains the point
  (entailment energy 0). The root (the origin, captioned `root_caption`)
  entails everything and is always a candidate, so every step gets a caption.

  Args:
    image_emb: (d,) space components of one image.
    caption_embs: (m, d) caption embeddings.
    captions: m strings.
    curv: curvature magnitude.
    steps: number of interpolation points.
    root_caption: the label of the root.

  Returns:
    {"indices": (steps,) int NumPy array into `captions` (m = the root),
     "captions": list of `steps` strings, "unique": the distinct captions in
     the order first met (image first, root last)}.
  """
  caption_embs = lorentz.at_least_float32(caption_embs)
  dtype = caption_embs.dtype
  if caption_embs.ndim != 2 or caption_embs.shape[0] != len(captions):
    raise ValueError(f"caption_embs must be (len(captions)={len(captions)}, "
                     f"d), got {caption_embs.shape}")
  points = traverse_to_root(jnp.asarray(image_emb, dtype).reshape(-1),
                            curv, steps)
  with_root = jnp.concatenate(
      [caption_embs, jnp.zeros((1, caption_embs.shape[1]), dtype)])
  indices = np.asarray(_nearest_entailing(points, with_root,
                                          jnp.asarray(curv, dtype)))
  names = list(captions) + [root_caption]
  step_captions = [names[i] for i in indices]
  unique = list(dict.fromkeys(step_captions))
  return {"indices": indices, "captions": step_captions, "unique": unique}
