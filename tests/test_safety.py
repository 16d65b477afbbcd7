"""Tests for hysac_jax.safety against NumPy float64 and hand-computed values."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hysac_jax import safety


def np_dist0(x, c):
  norm = np.linalg.norm(np.asarray(x, np.float64), axis=-1)
  return np.arcsinh(np.sqrt(c) * norm) / np.sqrt(c)


def np_time(x, c):
  x = np.asarray(x, np.float64)
  return np.sqrt(1 / c + np.sum(x * x, -1))


def np_entailment_energy(x, y, c, min_radius=0.1, eps=1e-5):
  """SPEC §1 formulas in float64: energy of y w.r.t. the cone of x."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  xn = np.linalg.norm(x, axis=-1)
  aperture = np.arcsin(np.clip(2 * min_radius / (np.sqrt(c) * xn + eps),
                               -1 + eps, 1 - eps))
  xt, yt = np_time(x, c), np_time(y, c)
  l = c * (np.sum(x * y, -1) - xt * yt)
  cos = (yt + l * xt) / (xn * np.sqrt(np.maximum(l**2 - 1, eps)) + eps)
  angle = np.arccos(np.clip(cos, -1 + eps, 1 - eps))
  return np.maximum(0, angle - aperture)


def random_points(rng, n, d, lo=0.2, hi=3.0):
  u = rng.normal(size=(n, d))
  u /= np.linalg.norm(u, axis=1, keepdims=True)
  return (u * rng.uniform(lo, hi, size=(n, 1))).astype(np.float32)


def release_traversal(emb, c, bound, alpha=0.8):
  """The release's per-query loop (recalls.recall_div_traversal), float64."""
  threshold = bound + (math.tanh((bound - alpha) / c) + 1)
  out = np.array(emb, np.float64)
  for i, x in enumerate(out):
    if np_dist0(x, c) > threshold:
      out[i] = threshold * x / np.linalg.norm(x)
  return out


# ----------------------------------------------------------------------------
# Bounds


def test_compute_bounds_matches_numpy_percentiles():
  rng = np.random.default_rng(0)
  groups = [random_points(rng, n, 6) for n in (40, 41, 42, 43)]
  c = 0.7
  bounds = safety.compute_bounds(*groups, c)
  assert list(bounds) == ["S", "U", "V", "G"]
  for name, emb in zip("SUVG", groups):
    d = np_dist0(emb, c)
    assert bounds[name]["avg"] == pytest.approx(d.mean(), rel=1e-5)
    assert bounds[name]["low_05"] == pytest.approx(np.percentile(d, 5),
                                                   rel=1e-5)
    assert bounds[name]["up_95"] == pytest.approx(np.percentile(d, 95),
                                                  rel=1e-5)


def test_bounds_round_trip_and_release_file_loads_as_is(tmp_path):
  rng = np.random.default_rng(1)
  bounds = safety.compute_bounds(*(random_points(rng, 10, 4)
                                   for _ in range(4)), 1.0)
  path = tmp_path / "hysac_bounds.json"
  safety.save_bounds(bounds, path)
  assert safety.load_bounds(path) == bounds
  # A release-style file: ints allowed, extra entries kept untouched.
  release = {g: {"avg": 1, "low_05": 0.5, "up_95": 1.5, "std": 0.1}
             for g in "SUVG"}
  release["note"] = "extra"
  path.write_text(json.dumps(release))
  loaded = safety.load_bounds(path)
  assert loaded["V"] == {"avg": 1.0, "low_05": 0.5, "up_95": 1.5, "std": 0.1}
  assert loaded["note"] == "extra"


def test_load_bounds_errors_name_the_file_and_key(tmp_path):
  path = tmp_path / "bad.json"
  path.write_text(json.dumps({g: {"avg": 1.0, "low_05": 0.5}
                              for g in "SUVG"}))
  with pytest.raises(ValueError, match=r"bad\.json.*'S'.*'up_95'"):
    safety.load_bounds(path)
  path.write_text(json.dumps({g: {"avg": 1, "low_05": 0, "up_95": 2}
                              for g in "SUV"}))
  with pytest.raises(ValueError, match="missing group 'G'"):
    safety.load_bounds(path)
  with pytest.raises(FileNotFoundError, match="nothere.json"):
    safety.load_bounds(tmp_path / "nothere.json")


# ----------------------------------------------------------------------------
# Traversal


def test_safety_threshold_hand_value():
  # b + tanh((b - alpha)/c) + 1 with b = 1, alpha = 0.8, c = 2.
  assert safety.safety_threshold(1.0, 2.0) == pytest.approx(
      2.0 + math.tanh(0.1))
  assert safety.safety_threshold(0.5, 1.0, alpha=0.5) == pytest.approx(1.5)


def test_release_traversal_hand_computed_examples():
  # c = 1, b = 0.5: b' = 0.5 + tanh(-0.3) + 1 = 1.2086638...
  b_prime = 1.5 + math.tanh(-0.3)
  emb = np.array([[3.0, 4.0], [0.3, 0.4], [0.0, -2.0]], np.float32)
  # dist0: asinh(5) = 2.31 > b' (moved); asinh(0.5) = 0.48 (kept);
  # asinh(2) = 1.44 > b' (moved).
  got = np.asarray(safety.traverse_to_safe(emb, 1.0, 0.5, method="release"))
  want = np.array([[0.6 * b_prime, 0.8 * b_prime], [0.3, 0.4],
                   [0.0, -b_prime]])
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert np.array_equal(got[1], emb[1])


def test_release_traversal_matches_the_release_loop():
  rng = np.random.default_rng(2)
  emb = random_points(rng, 64, 8, 0.1, 4.0)
  c, bound = 1.7, 0.9
  got = np.asarray(safety.traverse_to_safe(emb, c, bound, method="release"))
  np.testing.assert_allclose(got, release_traversal(emb, c, bound),
                             rtol=1e-5, atol=1e-6)


def test_geodesic_traversal_lands_at_b_prime_and_keeps_inner_points():
  rng = np.random.default_rng(3)
  emb = random_points(rng, 64, 8, 0.1, 6.0)
  c, bound = 0.6, 1.1
  b_prime = bound + math.tanh((bound - 0.8) / c) + 1
  got = np.asarray(safety.traverse_to_safe(emb, c, bound))
  before = np_dist0(emb, c)
  outside = before > b_prime
  assert 10 < outside.sum() < 60  # both kinds are exercised
  np.testing.assert_allclose(np_dist0(got[outside], c), b_prime, rtol=1e-5)
  # Same direction, i.e. on the geodesic through the origin.
  cos = np.sum(got * emb, 1) / (np.linalg.norm(got, axis=1)
                                * np.linalg.norm(emb, axis=1))
  np.testing.assert_allclose(cos[outside], 1.0, rtol=1e-6)
  assert np.array_equal(got[~outside], emb[~outside])


def test_traverse_to_safe_image_and_text_pick_v_and_s_bounds():
  rng = np.random.default_rng(4)
  emb = random_points(rng, 20, 5, 0.1, 8.0)
  bounds = {"S": {"avg": 0, "low_05": 0, "up_95": 0.4},
            "U": {"avg": 0, "low_05": 0, "up_95": 9.0},
            "V": {"avg": 0, "low_05": 0, "up_95": 1.3},
            "G": {"avg": 0, "low_05": 0, "up_95": 9.0}}
  for fn, bound in ((safety.traverse_to_safe_image, 1.3),
                    (safety.traverse_to_safe_text, 0.4)):
    for mode in ("geodesic", "release"):
      np.testing.assert_array_equal(
          np.asarray(fn(emb, 1.0, bounds, method=mode)),
          np.asarray(safety.traverse_to_safe(emb, 1.0, bound, method=mode)))


def test_traverse_rejects_unknown_method():
  with pytest.raises(ValueError, match="traversal method"):
    safety.traverse_to_safe(np.ones((2, 3)), 1.0, 0.5, method="radial")


# ----------------------------------------------------------------------------
# Classification


def test_origin_distance_and_classify_match_numpy():
  rng = np.random.default_rng(5)
  emb = random_points(rng, 50, 6, 0.1, 5.0)
  c = 1.3
  bounds = {g: {"avg": 0.0, "low_05": 0.0, "up_95": b}
            for g, b in zip("SUVG", (0.7, 2.0, 1.1, 2.5))}
  np.testing.assert_allclose(np.asarray(safety.origin_distance(emb, c)),
                             np_dist0(emb, c), rtol=1e-5)
  for modality, b in (("text", 0.7), ("image", 1.1)):
    threshold = b + math.tanh((b - 0.8) / c) + 1
    got = np.asarray(safety.classify_unsafe(emb, c, bounds, modality))
    np.testing.assert_array_equal(got, np_dist0(emb, c) > threshold)
  with pytest.raises(ValueError, match="modality"):
    safety.classify_unsafe(emb, c, bounds, "audio")


# ----------------------------------------------------------------------------
# Traversal to the root


def test_traverse_to_root_interpolates_linearly_in_tangent_space():
  rng = np.random.default_rng(6)
  emb = random_points(rng, 3, 5, 0.5, 4.0)
  c, steps = 0.8, 7
  path = np.asarray(safety.traverse_to_root(emb, c, steps), np.float64)
  assert path.shape == (steps, 3, 5)
  np.testing.assert_allclose(path[0], emb, rtol=1e-5)
  np.testing.assert_allclose(path[-1], 0.0, atol=1e-7)
  # Tangent vector norms are the distances from the origin: linear in steps.
  want = np.linspace(1, 0, steps)[:, None] * np_dist0(emb, c)[None]
  np.testing.assert_allclose(np_dist0(path, c), want, rtol=1e-5, atol=1e-6)
  cos = np.sum(path[:-1] * emb, -1) / (np.linalg.norm(path[:-1], axis=-1)
                                       * np.linalg.norm(emb, axis=-1))
  np.testing.assert_allclose(cos, 1.0, rtol=1e-6)


def test_retrieval_along_traversal_follows_the_hierarchy():
  d, c = 6, 1.0
  u = np.eye(d)[0]
  v = np.eye(d)[1]

  def at(r, direction):
    return np.sinh(r) * direction

  # Captions on the image's ray at radii 0.5, 1.5, 2.5 entail the points
  # beyond them; the ones on an orthogonal ray never entail the traversal.
  captions = ["generic", "middle", "specific", "other-near", "other-far"]
  caption_embs = np.stack([at(0.5, u), at(1.5, u), at(2.5, u),
                           at(0.2, v), at(1.0, v)]).astype(np.float32)
  image = at(3.0, u).astype(np.float32)
  steps = 31  # radii 3.0, 2.9, ..., 0.0
  out = safety.retrieve_along_traversal(image, caption_embs, captions, c,
                                        steps)
  radii = np.linspace(3.0, 0.0, steps)
  want = []
  for r in radii:
    below = [i for i, rc in enumerate((0.5, 1.5, 2.5)) if rc < r - 1e-6]
    want.append(captions[below[-1]] if below else "[ROOT]")
  assert out["captions"] == want
  assert out["unique"] == ["specific", "middle", "generic", "[ROOT]"]


def test_retrieval_along_traversal_matches_numpy_brute_force():
  rng = np.random.default_rng(7)
  d, c, steps = 8, 1.2, 12
  image = random_points(rng, 1, d, 3.0, 3.5)[0]
  # Half the captions near the image's ray (some of their cones contain parts
  # of the traversal), half anywhere.
  near = image / np.linalg.norm(image) + 0.04 * rng.normal(size=(20, d))
  near *= rng.uniform(0.2, 1.5, size=(20, 1)) / np.linalg.norm(near, axis=1,
                                                               keepdims=True)
  caption_embs = np.concatenate([near, random_points(rng, 20, d, 0.3, 3.0)])
  caption_embs = caption_embs.astype(np.float32)
  captions = [f"c{i}" for i in range(40)]
  out = safety.retrieve_along_traversal(image, caption_embs, captions, c,
                                        steps)
  path = np.asarray(safety.traverse_to_root(image, c, steps), np.float64)
  with_root = np.concatenate([caption_embs, np.zeros((1, d))])
  for s, point in enumerate(path):
    energy = np_entailment_energy(caption_embs, point[None], c)
    allowed = np.r_[energy <= 0, True]
    xt, yt = np_time(with_root, c), np_time(point, c)
    dist = np.arccosh(np.maximum(-c * (with_root @ point - xt * yt),
                                 1 + 1e-8)) / np.sqrt(c)
    want = int(np.argmin(np.where(allowed, dist, np.inf)))
    assert out["indices"][s] == want, f"step {s}"
  assert out["captions"][-1] == "[ROOT]"
  assert any(i < 40 for i in out["indices"])  # not only the root


def test_safety_keeps_the_callers_float_dtype_at_least_float32():
  """As `lorentz` does: float64 stays float64 (float64 checks), bf16 is
  computed in float32."""
  emb = np.array([[0.3, -1.2, 0.5], [0.1, 0.2, 0.0]])
  bounds = {g: {"avg": 0.5, "low_05": 0.1, "up_95": 0.4} for g in "SUVG"}
  with jax.enable_x64(True):
    e64 = jnp.asarray(emb, jnp.float64)
    outs = {"origin_distance": safety.origin_distance(e64, 1.3),
            "traverse_to_safe": safety.traverse_to_safe(e64, 1.3, 0.4),
            "traverse_to_root": safety.traverse_to_root(e64, 1.3, steps=3)}
    for name, out in outs.items():
      assert out.dtype == jnp.float64, name
    # float64 all the way: the distance matches a float64 NumPy formula to
    # float64 rounding, far below float32's 1e-7.
    sqrt_c = np.sqrt(1.3)
    want = np.arccosh(np.sqrt(1 + 1.3 * (emb ** 2).sum(-1))) / sqrt_c
    np.testing.assert_allclose(np.asarray(outs["origin_distance"]), want,
                               rtol=1e-12)
    assert safety.classify_unsafe(e64, 1.3, bounds, "text").dtype == bool
  bf16 = jnp.asarray(emb, jnp.bfloat16)
  assert safety.origin_distance(bf16, 1.3).dtype == jnp.float32
  assert safety.traverse_to_safe(bf16, 1.3, 0.4).dtype == jnp.float32
