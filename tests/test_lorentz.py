"""Tests for hysac_jax.lorentz: closed forms, release parity, gradients.

References are independent of the module: closed-form hyperbolic geometry, the
release's formulas written out in NumPy float64, and central finite
differences in float64. Float64 parts run inside `jax.enable_x64(True)` so the
global default of other test files is untouched.
"""

import decimal
import math

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hysac_jax import lorentz as L

_SETTINGS = dict(max_examples=15, deadline=None, derandomize=True,
                 suppress_health_check=[hypothesis.HealthCheck.too_slow])


# ----------------------------------------------------------------------------
# The release's formulas, literally, in NumPy (SPEC.md §1).


def _np_time(x, c):
  return np.sqrt(1 / c + np.sum(x * x, -1))


def ref_inner(x, y, c):
  return np.sum(x * y, -1) - _np_time(x, c) * _np_time(y, c)


def ref_pairwise_inner(x, y, c):
  return x @ y.T - np.outer(_np_time(x, c), _np_time(y, c))


def ref_dist(x, y, c, eps=1e-8):
  return np.arccosh(np.maximum(-c * ref_inner(x, y, c), 1 + eps)) / np.sqrt(c)


def ref_pairwise_dist(x, y, c, eps=1e-8):
  z = -c * ref_pairwise_inner(x, y, c)
  return np.arccosh(np.maximum(z, 1 + eps)) / np.sqrt(c)


def ref_dist0(x, c):
  return np.arcsinh(np.sqrt(c) * np.linalg.norm(x, axis=-1)) / np.sqrt(c)


def ref_exp_map0(v, c, eps=1e-8):
  rc = np.sqrt(c) * np.linalg.norm(v, axis=-1, keepdims=True)
  arg = np.clip(rc, eps, math.asinh(2**15))
  return np.sinh(arg) * v / np.maximum(rc, eps)


def ref_log_map0(x, c, eps=1e-8):
  rc_t = np.sqrt(1 + c * np.sum(x * x, -1, keepdims=True))
  d0 = np.arccosh(np.maximum(rc_t, 1 + eps))
  rc = np.sqrt(c) * np.linalg.norm(x, axis=-1, keepdims=True)
  return d0 * x / np.maximum(rc, eps)


def ref_half_aperture(x, c, k=0.1, eps=1e-5):
  s = 2 * k / (np.sqrt(c) * np.linalg.norm(x, axis=-1) + eps)
  return np.arcsin(np.clip(s, -1 + eps, 1 - eps))


def ref_oxy_angle(x, y, c, eps=1e-5):
  x_t, y_t = _np_time(x, c), _np_time(y, c)
  l = c * (np.sum(x * y, -1) - x_t * y_t)
  num = y_t + l * x_t
  den = np.linalg.norm(x, axis=-1) * np.sqrt(np.maximum(l * l - 1, eps))
  return np.arccos(np.clip(num / (den + eps), -1 + eps, 1 - eps))


def ref_entailment(x, y, c, s=1.0):
  return np.maximum(ref_oxy_angle(x, y, c) - s * ref_half_aperture(x, c), 0)


def _points(seed, n, d, max_tangent_norm, c):
  """Random hyperboloid points with tangent norms log-uniform up to a max."""
  rng = np.random.default_rng(seed)
  v = rng.normal(size=(n, d))
  norms = np.exp(rng.uniform(np.log(1e-3), np.log(max_tangent_norm), (n, 1)))
  v *= norms / np.linalg.norm(v, axis=-1, keepdims=True)
  return ref_exp_map0(v, c)


# ----------------------------------------------------------------------------
# Closed forms.


@pytest.mark.parametrize("c", [0.5, 2.0])
def test_one_dimensional_hyperboloid_distances_are_differences(c):
  s = np.array([-2.0, -0.3, 0.0, 0.7, 3.0])  # signed distances from origin
  x = jnp.asarray(np.sinh(np.sqrt(c) * s)[:, None] / np.sqrt(c), jnp.float32)
  want = np.abs(s[:, None] - s[None, :])
  np.testing.assert_allclose(L.pairwise_dist(x, x, c), want, atol=2e-3)
  np.testing.assert_allclose(L.dist(x[:, None], x[None], c), want, atol=2e-5)
  np.testing.assert_allclose(L.dist0(x, c), np.abs(s), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(L.log_map0(x, c)[:, 0], s, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(
      L.exp_map0(jnp.asarray(s[:, None], jnp.float32), c), x, rtol=1e-5)
  # On a line, y beyond x (same side, further out) is straight ahead: angle 0
  # (the release's clip floor acos(1 - 1e-5)); y back toward O: angle pi.
  # (float32 angles near 0 and pi carry ~1e-3 of rounding, as in the release.)
  ahead = L.oxy_angle(x[3], x[4], c)
  back = L.oxy_angle(x[4], x[3], c)
  assert float(ahead) < 1e-2 and float(back) > math.pi - 1e-2


@pytest.mark.parametrize("c", [0.3, 1.0, 4.0])
def test_points_on_one_ray_add_distances_and_traverse_back(c):
  u = np.array([0.6, -0.8, 0.0])
  a, b = 0.4, 2.9
  x = L.exp_map0(jnp.asarray(a * u, jnp.float32), c)
  y = L.exp_map0(jnp.asarray(b * u, jnp.float32), c)
  np.testing.assert_allclose(L.dist(x, y, c), b - a, rtol=1e-5)
  np.testing.assert_allclose(L.dist0(y, c), b, rtol=1e-6)
  np.testing.assert_allclose(L.geodesic_toward_origin(y, c, a), x, rtol=1e-5)
  # y lies on the ray beyond x: inside the cone of x, zero energy.
  assert float(L.oxy_angle(x, y, c)) < 1e-2
  assert float(L.entailment_energy(x, y, c)) == 0.0
  # The reverse (x seen from y) points back to the origin.
  assert float(L.oxy_angle(y, x, c)) > math.pi - 1e-2


@pytest.mark.parametrize("c", [0.5, 1.0, 3.0])
def test_right_angle_and_hyperbolic_pythagoras(c):
  # x at distance a on axis 1; y at distance t from x along the geodesic
  # through x orthogonal to the ray O->x (it moves into axis 2).
  a, t = 1.3, 0.8
  rc = np.sqrt(c)
  x = np.array([np.sinh(rc * a), 0.0]) / rc
  y = np.array([np.sinh(rc * a) * np.cosh(rc * t), np.sinh(rc * t)]) / rc
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
  np.testing.assert_allclose(L.oxy_angle(x, y, c), np.pi / 2, atol=1e-5)
  np.testing.assert_allclose(L.dist(x, y, c), t, rtol=1e-5)
  want = np.arccosh(np.cosh(rc * a) * np.cosh(rc * t)) / rc
  np.testing.assert_allclose(L.dist0(y, c), want, rtol=1e-5)


def test_half_aperture_closed_form_and_widest_at_origin():
  c = 1.0
  x = jnp.asarray([[0.0, 0.0], [0.1, 0.0], [2.0, 0.0], [0.0, 50.0]])
  got = np.asarray(L.half_aperture(x, c))
  widest = np.arcsin(1 - 1e-5)
  np.testing.assert_allclose(got[:2], widest, rtol=1e-5)  # f32 clip bound
  np.testing.assert_allclose(got[2:], np.arcsin(0.2 / (np.array([2, 50]) +
                                                        1e-5)), rtol=1e-5)


# ----------------------------------------------------------------------------
# Release parity in float64.


_PARITY = {
    "inner": (lambda x, y, c: L.inner(x, y, c), ref_inner),
    "pairwise_inner": (L.pairwise_inner, ref_pairwise_inner),
    "dist": (L.dist, ref_dist),
    "pairwise_dist": (L.pairwise_dist, ref_pairwise_dist),
    "dist0": (lambda x, y, c: L.dist0(x, c), lambda x, y, c: ref_dist0(x, c)),
    "exp_map0": (lambda x, y, c: L.exp_map0(x, c),
                 lambda x, y, c: ref_exp_map0(x, c)),
    "log_map0": (lambda x, y, c: L.log_map0(x, c),
                 lambda x, y, c: ref_log_map0(x, c)),
    "half_aperture": (lambda x, y, c: L.half_aperture(x, c),
                      lambda x, y, c: ref_half_aperture(x, c)),
    "oxy_angle": (L.oxy_angle, ref_oxy_angle),
    "entailment_energy": (L.entailment_energy, ref_entailment),
}


@jax.jit
def _parity_all(x, y, c):
  """Every function of _PARITY on (x, y, c): one compile per dtype."""
  return {name: ours(x, y, c) for name, (ours, _) in _PARITY.items()}


def _parity_inputs(seed, c):
  x = _points(seed, 64, 6, 8.0, c)
  y = _points(seed + 10, 64, 6, 8.0, c)
  # Coincident pairs and the origin: the release's clamps are active.
  y[:3] = x[:3]
  x[3] = 0.0
  return x, y


def test_float64_values_match_release_formulas():
  for seed, c in [(0, 0.1), (1, 1.0), (2, 10.0)]:
    x, y = _parity_inputs(seed, c)
    with jax.enable_x64(True):
      out = _parity_all(jnp.asarray(x), jnp.asarray(y), jnp.asarray(c))
    for name, (_, ref) in _PARITY.items():
      got, want = np.asarray(out[name]), ref(x, y, c)
      assert got.dtype == np.float64
      if name in ("oxy_angle", "entailment_energy"):
        # At x = y the release's value is rounding noise around the exact
        # value of its formula (numerator 0: acos(0) = pi/2), which we return.
        ap = ref_half_aperture(x[1:3], c) * (name == "entailment_energy")
        np.testing.assert_allclose(got[1:3] + ap, np.pi / 2, rtol=1e-6)
        got, want = got[3:], want[3:]
      if name == "pairwise_dist":
        # Coincident pairs through a Gram matrix: both sides are rounding
        # noise of size sqrt(eps64 * c) x_t (here < 1e-3), not comparable.
        noise = want < 1e-3
        assert np.all(got[noise] < 1e-3)
        got, want = got[~noise], want[~noise]
      if name == "log_map0":  # the release's acosh clamp loses tiny norms
        keep = np.sqrt(c) * np.linalg.norm(x, axis=-1) > 1e-3
        got, want = got[keep], want[keep]
      np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12,
                                 err_msg=f"{name} c={c}")


# ----------------------------------------------------------------------------
# Properties (hypothesis). Shapes are fixed and curv is traced: one compile.


@jax.jit
def _props(x, y, z, c):
  return dict(
      dxy=L.dist(x, y, c), dyx=L.dist(y, x, c), dxz=L.dist(x, z, c),
      dyz=L.dist(y, z, c), pxy=L.pairwise_dist(x, y, c),
      pyx=L.pairwise_dist(y, x, c), angle=L.oxy_angle(x, y, c),
      aperture=L.half_aperture(x, c), dxx=L.dist(x, x, c))


@hypothesis.settings(**_SETTINGS)
@hypothesis.given(seed=st.integers(0, 2**31 - 1),
                  log_c=st.floats(math.log(0.1), math.log(10.0)),
                  max_norm=st.floats(0.05, 6.0))
def test_distance_is_symmetric_zero_on_diagonal_and_triangular(seed, log_c,
                                                                max_norm):
  c = math.exp(log_c)
  x, y, z = (jnp.asarray(_points(seed + i, 8, 4, max_norm, c), jnp.float32)
             for i in range(3))
  out = _props(x, y, z, jnp.float32(c))
  np.testing.assert_allclose(out["dxy"], out["dyx"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out["pxy"], out["pyx"].T, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(out["dxx"], 0.0)
  assert np.all(out["dxz"] <= out["dxy"] + out["dyz"] + 1e-4)
  assert np.all((out["angle"] > 0) & (out["angle"] < np.pi))
  assert np.all((out["aperture"] > 0) & (out["aperture"] < np.pi / 2))


@jax.jit
def _cone(x, c, step):
  beyond = L.geodesic_toward_origin(x, c, L.dist0(x, c) + step)
  aside = L.exp_map0(-L.log_map0(x, c), c)  # reflected through the origin
  return (L.entailment_energy(x, beyond, c), L.entailment_energy(x, aside, c),
          L.dist(x, beyond, c))


@hypothesis.settings(**_SETTINGS)
@hypothesis.given(seed=st.integers(0, 2**31 - 1),
                  log_c=st.floats(math.log(0.1), math.log(10.0)),
                  step=st.floats(0.01, 5.0))
def test_points_on_the_ray_beyond_x_lie_in_its_cone(seed, log_c, step):
  c = math.exp(log_c)
  # Stay inside the sinh clamp of SPEC §1 (sqrt(c) * distance <=
  # asinh(2^15) ~ 11.09): beyond it the point is deliberately not at
  # dist0(x) + step.
  hypothesis.assume(2.5 + math.sqrt(c) * step < 11.0)
  # The angle has the release's clip floor acos(1 - 1e-5) ~ 4.5e-3 and ~1e-3
  # of float32 rounding near 0, so keep apertures well above that:
  # sqrt(c) ||x|| <= sinh(2.5), an aperture of at least 0.033.
  rng = np.random.default_rng(seed)
  v = rng.normal(size=(8, 5))
  v *= rng.uniform(0.05, 2.5, (8, 1)) / np.linalg.norm(v, axis=-1,
                                                        keepdims=True)
  x = L.exp_map0(jnp.asarray(v / np.sqrt(c), jnp.float32), c)
  inside, outside, moved = _cone(x, jnp.float32(c), jnp.float32(step))
  np.testing.assert_array_equal(inside, 0.0)
  assert np.all(outside > 1.0)  # the opposite point is about pi away
  np.testing.assert_allclose(moved, step, rtol=1e-3, atol=1e-3)


# ----------------------------------------------------------------------------
# Maps.


@jax.jit
def _round_trip(v, c):
  x = L.exp_map0(v, c)
  return L.log_map0(x, c), L.dist0(x, c), L.from_poincare(
      L.to_poincare(x, c), c), L.to_poincare(x, c)


@pytest.mark.parametrize("c", [0.1, 0.5, 1.0])
def test_exp_log_round_trip_float32_up_to_norm_10(c):
  rng = np.random.default_rng(3)
  v = rng.normal(size=(64, 8))
  norms = np.concatenate([[0.0, 1e-7, 1e-4], np.linspace(0.01, 10, 61)])
  v = v * (norms / np.linalg.norm(v, axis=-1))[:, None]
  back, d0, x_again, p = _round_trip(jnp.asarray(v, jnp.float32),
                                     jnp.float32(c))
  err = np.linalg.norm(np.asarray(back, np.float64) - v, axis=-1)
  assert np.all(err <= 1e-5 * np.maximum(norms, 1e-3)), err.max()
  np.testing.assert_allclose(d0, norms, rtol=1e-5, atol=1e-9)
  x = np.asarray(L.exp_map0(jnp.asarray(v, jnp.float32), c), np.float64)
  np.testing.assert_allclose(x_again, x, rtol=1e-3, atol=1e-6)
  assert np.all(np.linalg.norm(p, axis=-1) < 1 / np.sqrt(c))


def test_dist0_of_exp_map0_saturates_at_the_sinh_clamp():
  c = 2.0
  v = jnp.asarray([[30.0, 0.0], [0.0, 1e4]])
  np.testing.assert_allclose(L.dist0(L.exp_map0(v, c), c),
                             math.asinh(2**15) / math.sqrt(c), rtol=1e-5)
  # The direction is kept.
  np.testing.assert_allclose(L.exp_map0(v, c)[1, 0], 0.0)


def test_lifted_points_satisfy_the_hyperboloid_constraint():
  with jax.enable_x64(True):
    for c in [0.1, 1.0, 10.0]:
      rng = np.random.default_rng(4)
      v = jnp.asarray(rng.normal(size=(32, 6)) * 2)
      x = L.exp_map0(v, c)
      x_t = np.sqrt(1 / c + np.sum(np.asarray(x)**2, -1))
      # Independent of the time component: -c<x,x>_L = c (x_t^2 - ||x||^2).
      np.testing.assert_allclose(-c * L.inner(x, x, c), 1.0,
                                 rtol=1e-12 * c * x_t.max()**2)
      # And the Poincaré image is inside the ball, mapping back exactly.
      p = L.to_poincare(x, c)
      assert np.all(c * np.sum(np.asarray(p)**2, -1) < 1)
      np.testing.assert_allclose(L.from_poincare(p, c), x, rtol=1e-10)


@jax.jit
def _pair_forms(x, y, c):
  vm = lambda f: jax.vmap(jax.vmap(f, (None, 0, None)), (0, None, None))
  return (L.pairwise_dist(x, y, c), L.dist(x[:, None], y[None], c),
          vm(L.dist)(x, y, c), L.pairwise_inner(x, y, c),
          L.inner(x[:, None], y[None], c), vm(L.oxy_angle)(x, y, c),
          L.oxy_angle(x[:, None], y[None], c))


def test_pairwise_and_elementwise_forms_agree():
  c = 0.7
  x = _points(5, 12, 7, 5.0, c)
  y = _points(6, 9, 7, 5.0, c)
  with jax.enable_x64(True):
    pd, bd, vd, pi, bi, va, ba = _pair_forms(jnp.asarray(x), jnp.asarray(y),
                                             jnp.asarray(c))
    for other in (bd, vd):
      np.testing.assert_allclose(pd, other, rtol=1e-9)
    np.testing.assert_allclose(pi, bi, rtol=1e-12)
    np.testing.assert_allclose(va, ba, rtol=1e-9)
  pd, bd, vd, pi, bi, va, ba = _pair_forms(
      jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32),
      jnp.float32(c))
  for other in (bd, vd):
    np.testing.assert_allclose(pd, other, rtol=1e-4)
  # Angles near 0 or pi are sensitive to rounding: compare by cosine.
  # (The broadcast form uses dot products only: Gram rounding, ~1e-4 here.)
  np.testing.assert_allclose(np.cos(va), np.cos(ba), atol=1e-3)


# ----------------------------------------------------------------------------
# Gradients.


_W = np.array([0.3, -1.1, 0.7, 0.2])  # makes vector outputs scalar
_SCALAR_FNS = {  # name -> f(x, y, c) -> scalar, every public function
    "inner": L.inner,
    "pairwise_inner": lambda x, y, c: L.pairwise_inner(x[None], y[None],
                                                       c)[0, 0],
    "dist": L.dist,
    "pairwise_dist": lambda x, y, c: L.pairwise_dist(x[None], y[None],
                                                     c)[0, 0],
    "dist0": lambda x, y, c: L.dist0(x, c),
    "exp_map0": lambda x, y, c: L.exp_map0(x, c) @ _W,
    "log_map0": lambda x, y, c: L.log_map0(x, c) @ _W,
    "half_aperture": lambda x, y, c: L.half_aperture(x, c),
    "oxy_angle": L.oxy_angle,
    "entailment_energy": lambda x, y, c: L.entailment_energy(x, y, c, 0.5),
    "geodesic_toward_origin": lambda x, y, c: L.geodesic_toward_origin(
        x, c, 1.5) @ _W,
    "to_poincare": lambda x, y, c: L.to_poincare(x, c) @ _W,
    "from_poincare": lambda x, y, c: L.from_poincare(0.1 * x, c) @ _W,
}
_NAMES = sorted(_SCALAR_FNS)


def _all_fns(x, y, c):
  """(13,) values of every public function: one graph, one compile."""
  return jnp.stack([_SCALAR_FNS[n](x, y, c) for n in _NAMES])


def _pack(x, y, c):
  return jnp.concatenate([x, y, c[None]])


def _unpacked(z):
  return _all_fns(z[:4], z[4:8], z[8])


def _values_and_jacrev(z):
  values, vjp = jax.vjp(_unpacked, z)
  return values, jax.vmap(vjp)(jnp.eye(len(_NAMES), dtype=z.dtype))[0]


# Values and Jacobians of all functions w.r.t. (x, y, c) packed in a
# 9-vector, by reverse and forward mode, vmapped over points: one compile per
# dtype each. These graphs check math, not code generation, so XLA's backend
# optimisation is turned down: it cuts their compile time by about a third.
_FAST_COMPILE = {"xla_backend_optimization_level": 0,
                 "xla_llvm_disable_expensive_passes": True}
_jacrev_all = jax.jit(jax.vmap(_values_and_jacrev),
                      compiler_options=_FAST_COMPILE)
_jacfwd_all = jax.jit(jax.vmap(jax.jacfwd(_unpacked)),
                      compiler_options=_FAST_COMPILE)
_values_all = jax.jit(jax.vmap(_unpacked), compiler_options=_FAST_COMPILE)


def test_gradients_match_finite_differences_in_float64():
  rng = np.random.default_rng(7)
  with jax.enable_x64(True):
    zs = np.stack([np.concatenate([rng.normal(size=8) * 0.8, [c]])
                   for c in [0.1, 1.0, 10.0] for _ in range(6)])
    rev = np.asarray(_jacrev_all(jnp.asarray(zs))[1])  # (18, 13, 9)
    fwd = np.asarray(_jacfwd_all(jnp.asarray(zs)))
    # Central differences, all coordinates and points in one batch.
    h = 1e-6 * np.maximum(1, np.abs(zs))  # (18, 9)
    steps = np.einsum("pk,kj->pkj", h, np.eye(9))  # (18, 9, 9)
    hi = (zs[:, None] + steps).reshape(-1, 9)
    lo = (zs[:, None] - steps).reshape(-1, 9)
    diff = np.asarray(_values_all(jnp.asarray(hi)) -
                      _values_all(jnp.asarray(lo))).reshape(18, 9, 13)
    fd = np.transpose(diff / (2 * h[:, :, None]), (0, 2, 1))  # (18, 13, 9)
  for i, name in enumerate(_NAMES):
    np.testing.assert_allclose(rev[:, i], fd[:, i], rtol=1e-5, atol=1e-7,
                               err_msg=name)
    np.testing.assert_allclose(fwd[:, i], rev[:, i], rtol=1e-10, atol=1e-12,
                               err_msg=name)


_SPECIAL = {  # (x, y) where the release's clamps give NaN or inf gradients
    "origin": (np.zeros(4), np.array([0.5, -0.2, 0.1, 0.3])),
    "coincident": (np.array([0.5, -0.2, 0.1, 0.3]),) * 2,
    "both_origin": (np.zeros(4), np.zeros(4)),
    "opposite": (np.array([0.5, -0.2, 0.1, 0.3]),
                 -np.array([0.5, -0.2, 0.1, 0.3])),
    "norm_1e4": (np.array([1e4, 0, 0, 0]), np.array([0, 1e4, 0, 3.0])),
    "coincident_1e4": (np.array([1e4, 0, 0, 0]),) * 2,
}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gradients_are_finite_at_origin_coincident_points_and_huge_norms(
    dtype):
  cases = [(w, c) for w in _SPECIAL for c in (0.1, 1.0, 10.0)]
  with jax.enable_x64(dtype == "float64"):
    zs = jnp.asarray(np.stack([np.concatenate([*_SPECIAL[w], [c]])
                               for w, c in cases]), dtype)  # (18, 9)
    values, rev = _jacrev_all(zs)
    out = [np.asarray(values), np.asarray(rev)]
    # Forward mode is compiled in float64 only (it is checked against reverse
    # mode there); each compile of these graphs costs seconds.
    if dtype == "float64":
      out.append(np.asarray(_jacfwd_all(zs)))
  for arr in out:
    bad = ~np.isfinite(arr.reshape(len(cases), len(_NAMES), -1)).all(-1)
    assert not bad.any(), [(cases[k], _NAMES[i]) for k, i in zip(
        *np.nonzero(bad))]


# Tiny but non-zero norms, as when the alpha scalars collapse in training:
# x, y = scale * N(0, 1) in 8 - 4 = 4 dims each, for curv 0.1, 1 and 10 (18
# rows, the batch size of the graphs above, so that they are not recompiled).
# The last scale is subnormal: 1e-40 in float32, 1e-310 in float64.
_TINY_SCALES = (1e-7, 1e-10, 1e-13, 1e-16, 1e-20)


def _tiny_points(subnormal):
  rng = np.random.default_rng(11)
  return np.stack([np.concatenate([s * rng.normal(size=8), [c]])
                   for s in _TINY_SCALES + (subnormal,)
                   for c in (0.1, 1.0, 10.0)])  # (18, 9)


def _decimal_oxy_ratio(z):
  """The argument of acos in oxy_angle (release form), in 100-digit decimal.

  z: 9 Decimals, (x, y, curv) packed as in `_pack`.
  """
  with decimal.localcontext() as ctx:
    ctx.prec = 100
    x, y, c = z[:4], z[4:8], z[8]
    eps = decimal.Decimal("1e-5")
    xx, yy = sum(a * a for a in x), sum(a * a for a in y)
    x_t, y_t = (1 / c + xx).sqrt(), (1 / c + yy).sqrt()
    l = c * (sum(a * b for a, b in zip(x, y)) - x_t * y_t)
    return (y_t + l * x_t) / (xx.sqrt() * max(l * l - 1, eps).sqrt() + eps)


def test_gradients_are_finite_and_correct_at_tiny_nonzero_norms():
  n_normal = 3 * len(_TINY_SCALES)  # rows with normal (not subnormal) inputs
  with jax.enable_x64(True):
    z64 = _tiny_points(1e-310)
    values64, rev64 = map(np.asarray, _jacrev_all(jnp.asarray(z64)))
    fwd64 = np.asarray(_jacfwd_all(jnp.asarray(z64)))
    # Central differences with steps relative to each coordinate.
    h = 1e-6 * np.abs(z64[:n_normal])
    steps = np.einsum("pk,kj->pkj", h, np.eye(9))
    hi = (z64[:n_normal, None] + steps).reshape(-1, 9)
    lo = (z64[:n_normal, None] - steps).reshape(-1, 9)
    hi, lo = (np.concatenate([a, np.tile(a[:1], (324 - len(a), 1))])
              for a in (hi, lo))  # padded to the compiled batch of 324
    diff = np.asarray(_values_all(jnp.asarray(hi)) -
                      _values_all(jnp.asarray(lo)))[:n_normal * 9]
    fd = np.transpose(diff.reshape(n_normal, 9, -1) / (2 * h[:, :, None]),
                      (0, 2, 1))
  z32 = _tiny_points(1e-40).astype(np.float32)
  values32, rev32 = map(np.asarray, _jacrev_all(jnp.asarray(z32)))
  fwd32 = np.asarray(_jacfwd_all(jnp.asarray(z32)))
  for arr in (values64, rev64, fwd64, values32, rev32, fwd32):
    bad = ~np.isfinite(arr.reshape(18, len(_NAMES), -1)).all(-1)
    assert not bad.any(), [(z64[k, 8], k // 3, _NAMES[i])
                           for k, i in zip(*np.nonzero(bad))]
  scale = np.abs(rev64[:n_normal]).max(-1, keepdims=True) + 1e-300
  np.testing.assert_allclose(fwd64 / (np.abs(rev64).max(-1, keepdims=True)
                                      + 1e-300),
                             rev64 / (np.abs(rev64).max(-1, keepdims=True)
                                      + 1e-300), atol=1e-12)
  for i, name in enumerate(_NAMES):
    if name in ("oxy_angle", "entailment_energy"):
      continue  # the angle is pi/2 to within an ulp: differences see nothing
    np.testing.assert_allclose(rev64[:n_normal, i] / scale[:, i],
                               fd[:, i] / scale[:, i], atol=1e-4,
                               err_msg=name)
  # oxy_angle: d acos(r) = -dr / sqrt(1 - r^2), r by central differences in
  # 100-digit decimal (the release's formula in float64 loses these).
  i_oxy = _NAMES.index("oxy_angle")
  for k in range(n_normal):
    z = [decimal.Decimal(float(a)) for a in z64[k]]  # exact
    want = np.zeros(8)
    with decimal.localcontext() as ctx:
      ctx.prec = 100
      for j in range(8):
        step = abs(z[j]) * decimal.Decimal("1e-12")
        zp, zm = list(z), list(z)
        zp[j] += step
        zm[j] -= step
        want[j] = float((_decimal_oxy_ratio(zp) - _decimal_oxy_ratio(zm))
                        / (2 * step))
    r = float(_decimal_oxy_ratio(z))
    want = -want / math.sqrt(1 - r * r)
    np.testing.assert_allclose(rev64[k, i_oxy, :8], want, rtol=1e-6,
                               atol=1e-6 * np.abs(want).max(), err_msg=k)
  # Tiny norms: the half-aperture is clipped (gradient 0), so the energy
  # moves with the angle only.
  i_ent = _NAMES.index("entailment_energy")
  np.testing.assert_array_equal(rev64[:, i_ent], rev64[:, i_oxy])
  # Float32 (forward and reverse) matches float64 where they compute the same
  # function: all but the distances, whose release floor acosh(1 + 1e-8)
  # rounds to acosh(1) in float32 only.
  for i, name in enumerate(_NAMES):
    if name in ("dist", "pairwise_dist"):
      continue
    for got in (rev32, fwd32):
      np.testing.assert_allclose(got[:n_normal, i] / scale[:, i],
                                 rev64[:n_normal, i] / scale[:, i],
                                 atol=1e-5, err_msg=name)
  # Float32 distances: no floor, so d(x, y) ~ ||x - y|| with unit gradient;
  # the all-pairs (dot product) form underflows to 0 below norms ~1e-19.
  x, y = z32[:, :4].astype(np.float64), z32[:, 4:8].astype(np.float64)
  dx = x - y
  unit = dx / np.linalg.norm(dx, axis=-1, keepdims=True)
  for name, rows in (("dist", n_normal), ("pairwise_dist", n_normal - 3)):
    i = _NAMES.index(name)
    np.testing.assert_allclose(values32[:rows, i],
                               np.linalg.norm(dx, axis=-1)[:rows], rtol=1e-5)
    for got in (rev32, fwd32):
      np.testing.assert_allclose(got[:rows, i, :4], unit[:rows], atol=1e-5,
                                 err_msg=name)
      np.testing.assert_allclose(got[:rows, i, 4:8], -unit[:rows], atol=1e-5,
                                 err_msg=name)


@jax.jit
def _subgradients(x):
  zero = jnp.zeros_like(x)
  return dict(
      dist=jax.grad(lambda a: L.dist(a, x, 1.3))(x),
      pairwise=jax.grad(lambda a: L.pairwise_dist(a[None], x[None],
                                                  1.3)[0, 0])(x),
      dist0=jax.grad(lambda a: L.dist0(a, 1.3))(zero),
      exp_fwd=jax.jacfwd(lambda v: L.exp_map0(v, 2.0))(zero),
      exp_rev=jax.jacrev(lambda v: L.exp_map0(v, 2.0))(zero),
      log_fwd=jax.jacfwd(lambda v: L.log_map0(v, 2.0))(zero),
      log_rev=jax.jacrev(lambda v: L.log_map0(v, 2.0))(zero),
      near=jax.grad(lambda a: L.dist(a, x, 1.3))(x + 1e-4),
      near_far=jax.grad(lambda a: L.dist(a, 300 * x, 1.3))(300 * x + 1e-3))


def test_subgradients_at_nondifferentiable_points():
  out = _subgradients(jnp.asarray([0.5, -0.2, 0.1]))
  # Coincident points and the origin: the minimum-norm subgradient, 0.
  for k in ("dist", "pairwise", "dist0"):
    np.testing.assert_array_equal(out[k], 0.0, err_msg=k)
  # exp/log maps are smooth at 0 with Jacobian identity.
  for k in ("exp_fwd", "exp_rev", "log_fwd", "log_rev"):
    np.testing.assert_allclose(out[k], np.eye(3), atol=1e-7, err_msg=k)
  # Near (not at) coincidence the distance gradient is bounded (a unit-ish
  # direction), not the huge value acosh'(1+) gives; also far out.
  for k in ("near", "near_far"):
    assert 0.01 < float(jnp.linalg.norm(out[k])) < 10, (k, out[k])


# ----------------------------------------------------------------------------
# Dtypes, transforms and errors.


_F32_TOLERANCE = {  # max relative error of float32 vs float64, asserted
    # inner: x.y - x_t y_t cancels (in the release too): error ~ eps x_t y_t
    # relative to |<x,y>_L| >= 1/c.
    "inner": 3e-2, "pairwise_inner": 3e-2, "dist": 1e-5,
    "pairwise_dist": 2e-3, "dist0": 1e-6, "exp_map0": 1e-5,
    "log_map0": 1e-6, "half_aperture": 1e-5, "oxy_angle": 1e-3,
    "entailment_energy": 1e-3,
}


def test_float32_agrees_with_float64_table():
  """Prints a table of float32 vs float64 errors (pytest -s); asserts bounds.

  Inputs: tangent norms log-uniform in [1e-3, 5], curv in {0.1, 1, 10}, and a
  few near-coincident pairs. Errors are relative to max(|f64|, 1e-3). The
  `release f32` column is the release's formula in NumPy float32 on the same
  inputs, for comparison.
  """
  worst = {name: [0.0, 0.0] for name in _PARITY}
  for seed, c in [(0, 0.1), (1, 1.0), (2, 10.0)]:
    x = _points(seed, 64, 6, 5.0, c)
    y = _points(seed + 10, 64, 6, 5.0, c)
    # Near-coincident pairs, 0.01 apart in the tangent space.
    v = ref_log_map0(x[:8], c)
    y[:8] = ref_exp_map0(v + 0.01 * np.roll(v, 1, -1) / np.linalg.norm(
        v, axis=-1, keepdims=True), c)
    x32, y32 = x.astype(np.float32), y.astype(np.float32)
    with jax.enable_x64(True):  # the same (rounded) inputs, in float64
      out64 = _parity_all(jnp.asarray(x32, jnp.float64),
                          jnp.asarray(y32, jnp.float64), jnp.asarray(c))
      out64 = {k: np.asarray(a) for k, a in out64.items()}
    out32 = _parity_all(jnp.asarray(x32), jnp.asarray(y32), jnp.float32(c))
    for name, (_, ref) in _PARITY.items():
      want, got = out64[name], np.asarray(out32[name])
      assert got.dtype == np.float32
      with np.errstate(all="ignore"):
        rel32 = ref(x32, y32, np.float32(c))
      scale = np.maximum(np.abs(want), 1e-3)
      worst[name][0] = max(worst[name][0],
                           float(np.max(np.abs(got - want) / scale)))
      worst[name][1] = max(worst[name][1], float(
          np.nanmax(np.abs(rel32 - want) / scale)))
  rows = [(name, *worst[name]) for name in sorted(worst)]
  print("\n| function | max rel err f32 (ours) | release formula f32 |")
  print("| --- | --- | --- |")
  for name, worst, worst_ref in rows:
    print(f"| {name} | {worst:.2e} | {worst_ref:.2e} |")
  for name, worst, _ in rows:
    assert worst <= _F32_TOLERANCE[name], (name, worst)


def test_bfloat16_inputs_compute_in_float32_and_return_bfloat16():
  c = 1.0
  x = _points(8, 6, 4, 3.0, c).astype(np.float32)
  y = _points(9, 6, 4, 3.0, c).astype(np.float32)
  xb, yb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(y, jnp.bfloat16)
  got = L.dist(xb, yb, c)
  assert got.dtype == jnp.bfloat16
  # Same as float32 on the bf16-rounded inputs, then rounded to bf16.
  want = L.dist(xb.astype(jnp.float32), yb.astype(jnp.float32), c)
  np.testing.assert_array_equal(got, want.astype(jnp.bfloat16))
  assert L.exp_map0(xb, c).dtype == jnp.bfloat16
  assert L.oxy_angle(xb, yb, c).dtype == jnp.bfloat16


def test_jit_vmap_and_traced_curvature_give_the_eager_values():
  c = 0.6
  with jax.enable_x64(True):  # float64: fusion order cannot blur the check
    x, y = (jnp.asarray(a) for a in _parity_inputs(10, c))
    plain = _parity_all(x, y, jnp.asarray(c))["entailment_energy"]
    f = jax.jit(jax.vmap(L.entailment_energy, (0, 0, None)))
    np.testing.assert_allclose(f(x, y, jnp.asarray(c)), plain, rtol=1e-10)
  x, y = x[:5, :3].astype(jnp.float32), y[:5, :3].astype(jnp.float32)
  # Shape polymorphism over leading axes.
  assert L.dist(x.reshape(5, 1, 3), y[None], c).shape == (5, 5)
  assert L.pairwise_dist(x[None], y[None], c).shape == (1, 5, 5)


def test_bad_inputs_raise_clear_errors():
  x = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match="curv must be positive"):
    L.dist0(x, 0.0)
  with pytest.raises(ValueError, match="same last"):
    L.pairwise_dist(x, jnp.zeros((2, 4)), 1.0)
