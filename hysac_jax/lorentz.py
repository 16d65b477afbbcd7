"""Geometry of the Lorentz model of hyperbolic space (SPEC.md §1).

A point of the hyperboloid with curvature `-curv` is stored by its space
components `x` (shape `(..., d)`); its time component is
`x_t = sqrt(1/curv + ||x||^2)`, so that `<x, x>_L = -1/curv`. The origin (the
root of the entailment hierarchy) is `x = 0`. `curv > 0` is the curvature
magnitude, a Python float or a (traced, learnable) scalar.

Values follow the formulas and clamps of the HySAC/MERU PyTorch release. Where
those clamps give NaN or infinite gradients (a norm at 0, `acosh` at 1,
`sinh(z)/z` at 0), the functions use forms with the same value and a finite
gradient; see each docstring for the subgradient chosen where the function is
not differentiable.

Dtypes: float32 and float64 inputs are computed in their own precision;
bfloat16/float16 inputs are computed in float32 and the result is cast back to
the input dtype. All functions are pure and work under `jit`, `vmap` and
`grad`, with leading batch axes broadcast like NumPy.
"""

import math
import numbers

import jax
import jax.numpy as jnp

# Epsilons of the release: the acosh floor in `dist` and the clamps of the
# cone functions (SPEC.md §1).
DIST_EPS = 1e-8
CONE_EPS = 1e-5
# exp_map0 clamps the argument of sinh so that float32 cannot overflow.
SINH_MAX = math.asinh(2.0**15)
# Below this value of sqrt(curv)*||v||, sinh(r)/r and asinh(r)/r are evaluated
# by their Taylor series: exact to float64 precision there, and smooth at 0.
_TAYLOR_MAX = 1e-3

_HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------
# Dtype and numerics helpers.


def at_least_float32(x):
  """x as float32, or float64 when it is (float64 checks); never bf16/fp16.

  Geometry and losses run at this precision whatever the towers' dtype.
  """
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _dtypes(*arrays):
  """Returns (compute dtype, output dtype) for the given array inputs."""
  out = jnp.result_type(*arrays)
  if not jnp.issubdtype(out, jnp.floating):
    out = jnp.dtype(jnp.float32)
  compute = out if jnp.finfo(out).bits >= 32 else jnp.dtype(jnp.float32)
  return compute, out


def _prepare(curv, *arrays):
  """Casts arrays and curv to the compute dtype; returns (arrays, c, out)."""
  compute, out = _dtypes(*arrays)
  if isinstance(curv, numbers.Real) and not curv > 0:
    raise ValueError(f"lorentz: curv must be positive, got {curv!r}")
  arrays = [jnp.asarray(a, compute) for a in arrays]
  return arrays, jnp.asarray(curv, compute), out


def _check_dims(name, x, y):
  if x.shape[-1] != y.shape[-1]:
    raise ValueError(f"lorentz.{name}: x and y must have the same last "
                     f"(space) dimension, got shapes {x.shape} and {y.shape}")


def _safe_sqrt(s):
  """sqrt(s) for s >= 0, with gradient 0 instead of inf at s = 0."""
  pos = s > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, s, 1)), 0)


def _sq_norm(x):
  return jnp.sum(x * x, axis=-1)


def _scaled(x):
  """Returns (x / m, m), m = max_i |x_i| over the last axis (1 where x = 0).

  Squares of tiny components underflow (||x||^2 is 0 in float32 below norms of
  about 1e-19, and its square below 1e-10), which zeroes values and turns
  `1 / ||x||^2`-type gradient terms into 0/0. Scaled, the largest component is
  1 and nothing underflows. m is a constant for differentiation: every quantity
  built from x/m and m below is exactly invariant to m, so its true
  derivative through m is zero.
  """
  m = jax.lax.stop_gradient(jnp.max(jnp.abs(x), axis=-1))
  m = jnp.where(m > 0, m, 1)
  return x / m[..., None], m


def _norm(x):
  """||x|| without underflow; gradient x / ||x||, and 0 at x = 0."""
  xs, m = _scaled(x)
  return m * _safe_sqrt(_sq_norm(xs))


def _unit(x):
  """x / ||x|| without underflow; 0 (with gradient 0) at x = 0."""
  xs, _ = _scaled(x)
  n = _safe_sqrt(_sq_norm(xs))  # >= 1 unless x = 0
  return xs / jnp.where(n > 0, n, 1)[..., None]


def _time(sq_norm, c):
  """Time component sqrt(1/c + ||x||^2) from the squared norm."""
  return jnp.sqrt(1 / c + sq_norm)


def _dot(x, y):
  """Row-wise dot product; lowers to a matmul when vmapped over pairs."""
  return jnp.einsum("...d,...d->...", x, y, precision=_HIGHEST)


def _sinhc(r, r_sq):
  """sinh(min(r, SINH_MAX)) / r for r >= 0, smooth at r = 0."""
  small = r < _TAYLOR_MAX
  r_safe = jnp.where(small, 1, r)
  big = jnp.sinh(jnp.minimum(r_safe, SINH_MAX)) / r_safe
  return jnp.where(small, 1 + r_sq / 6 + r_sq * r_sq / 120, big)


def _asinhc(r, r_sq):
  """asinh(r) / r for r >= 0, smooth at r = 0."""
  small = r < _TAYLOR_MAX
  r_safe = jnp.where(small, 1, r)
  return jnp.where(small, 1 - r_sq / 6 + 3 * r_sq * r_sq / 40,
                   jnp.arcsinh(r_safe) / r_safe)


def _root_of_excess(u):
  """sqrt(max(u, 0) / 2), with gradient 0 at u <= 0."""
  return _safe_sqrt(jnp.maximum(u, 0) / 2)


def _acosh_from_root(r, dtype):
  """acosh(max(1 + 2 r^2, 1 + DIST_EPS)) for r >= 0, without acosh'(1).

  `r = sqrt(u / 2)` with `u = -c <x,y>_L - 1`; acosh(1 + u) = 2 asinh(r). r
  (not u) is the input so that tiny distances do not pass through a square
  that underflows. The floor is the release's `1 + eps` rounded to `dtype` (so
  it is 0 in float32, as in the PyTorch release, and about 1e-8 in float64).
  """
  floor = (jnp.asarray(1, dtype) + jnp.asarray(DIST_EPS, dtype)) - 1
  return 2 * jnp.arcsinh(jnp.maximum(r, jnp.sqrt(floor / 2)))


def _excess(c, xy, x_t, y_t, dx_sq, dt):
  """u = -c <x,y>_L - 1 >= 0, the excess of cosh(sqrt(c) dist) over 1.

  Computed as `(c/2) <x-y, x-y>_L = (c/2) (||x-y||^2 - (x_t-y_t)^2)` or as
  `c (x_t y_t - x.y) - 1`, equal in exact arithmetic. The first form's
  rounding error scales with ||x-y||^2 and the second's with x_t y_t, so the
  first is used for near points (accurate small distances) and the second for
  far ones.
  """
  u_diff = c / 2 * (dx_sq - dt * dt)
  u_gram = c * (x_t * y_t - xy) - 1
  return jnp.where(dx_sq < x_t * y_t, u_diff, u_gram)


def _excess_gram(c, xy, xx, yy, x_t, y_t):
  """`_excess` from dot products only (so that all-pairs forms are matmuls)."""
  dx_sq = jnp.maximum(xx + yy - 2 * xy, 0)
  return _excess(c, xy, x_t, y_t, dx_sq, (xx - yy) / (x_t + y_t))


def _excess_pairs(c, x, y, xx, yy, x_t, y_t):
  """(u, r, x_t - y_t): `_excess` u, its root r = sqrt(u / 2), and dt.

  When x and y have the same shape (explicit pairs) the difference x - y is
  used: `<x-y, x-y>_L = ||dx||^2 - (x_t - y_t)^2` cancels badly for radial
  pairs far out, so with `dx = a w/||w|| + dx_perp` (w = x + y, T = x_t + y_t,
  x_t - y_t = dx.w / T) it is evaluated as
  `u / 2 = (c / 4) (||dx_perp||^2 + 4 a^2 / (c T^2)) / (1 - a^2 / T^2)`:
  non-negative terms over a factor near 1 for near points. Its root r is the
  norm of (dx_perp, 2 a / (sqrt(c) T)) (`_norm`, which does not square tiny
  numbers) over that factor, and w / ||w|| comes from `_unit`: in float32 the
  former `a^2 = (dx.w)^2 / ||w||^2` made the gradient 0/0 (NaN) for norms
  ~1e-10 to 1e-16, where ||w||^2 squared underflows. When x and y only
  broadcast (all pairs), dot products are used so that the result lowers to a
  matmul.
  """
  if x.shape != y.shape:
    u = _excess_gram(c, _dot(x, y), xx, yy, x_t, y_t)
    return u, _root_of_excess(u), (xx - yy) / (x_t + y_t)
  dx, w = x - y, x + y
  big_t = x_t + y_t
  w_hat = _unit(w)  # 0 where w = 0: then a = 0 and dx_perp = dx
  a = _dot(dx, w_hat)
  perp = dx - a[..., None] * w_hat
  tangential = 2 * a / (jnp.sqrt(c) * big_t)
  shrink = jnp.sqrt(1 - (a / big_t)**2)  # |a| <= ||dx|| < T
  # u itself is taken from squares (they may underflow, but u is then
  # negligible in every use) so that its gradient does not pass through a
  # rescaling: the cotangent of x / max|x| would underflow instead.
  u_near = c / 2 * (_sq_norm(perp) + tangential**2) / shrink**2
  r_near = (jnp.sqrt(c) / 2
            * _norm(jnp.concatenate([perp, tangential[..., None]], -1))
            / shrink)
  u_gram = c * (x_t * y_t - _dot(x, y)) - 1
  # The near forms are exact for near pairs; the Gram form's error scales
  # with x_t y_t.
  near = _sq_norm(dx) < x_t * y_t
  r = jnp.where(near, r_near, _root_of_excess(u_gram))
  u = jnp.where(near, u_near, u_gram)
  return u, r, _dot(dx, w) / big_t


# ----------------------------------------------------------------------------
# Inner products and distances.


def inner(x, y, curv):
  """Lorentzian inner product <x, y>_L = x.y - x_t y_t.

  Args:
    x: (..., d) space components.
    y: (..., d) space components, broadcastable with x.
    curv: positive curvature magnitude.

  Returns:
    (...) inner products (<= -1/curv).
  """
  _check_dims("inner", x, y)
  (x, y), c, out = _prepare(curv, x, y)
  x_t, y_t = _time(_sq_norm(x), c), _time(_sq_norm(y), c)
  return (_dot(x, y) - x_t * y_t).astype(out)


def pairwise_inner(x, y, curv):
  """Lorentzian inner products between all rows of x and all rows of y.

  Args:
    x: (..., n, d) space components.
    y: (..., m, d) space components.
    curv: positive curvature magnitude.

  Returns:
    (..., n, m) inner products.
  """
  _check_dims("pairwise_inner", x, y)
  (x, y), c, out = _prepare(curv, x, y)
  return _pairwise_inner(x, y, c).astype(out)


def _pairwise_inner(x, y, c):
  x_t, y_t = _time(_sq_norm(x), c), _time(_sq_norm(y), c)
  xy = jnp.einsum("...nd,...md->...nm", x, y, precision=_HIGHEST)
  return xy - x_t[..., :, None] * y_t[..., None, :]


def dist(x, y, curv):
  """Geodesic distance acosh(-curv <x, y>_L) / sqrt(curv), elementwise.

  `-curv <x,y>_L - 1` is computed from the difference x - y when the points are
  close (without cancellation, so small distances are accurate in float32,
  also far from the origin) and from the inner product otherwise; both are
  the same number in exact arithmetic. Inputs that only broadcast (all
  pairs) use dot products, like `pairwise_dist`. The
  release's floor `acosh(1 + 1e-8)` is kept. At x = y the distance is not
  differentiable (like |x - y|); the gradient returned there is 0, the
  minimum-norm subgradient. For all pairs of two sets use `pairwise_dist`.

  Args:
    x: (..., d) space components.
    y: (..., d) space components, broadcastable with x.
    curv: positive curvature magnitude.

  Returns:
    (...) distances >= 0.
  """
  _check_dims("dist", x, y)
  (x, y), c, out = _prepare(curv, x, y)
  xx, yy = _sq_norm(x), _sq_norm(y)
  x_t, y_t = _time(xx, c), _time(yy, c)
  _, r, _ = _excess_pairs(c, x, y, xx, yy, x_t, y_t)
  return (_acosh_from_root(r, x.dtype) / jnp.sqrt(c)).astype(out)


def pairwise_dist(x, y, curv):
  """Geodesic distances between all rows of x and all rows of y.

  The release's formula `acosh(max(-curv <x,y>_L, 1 + 1e-8)) / sqrt(curv)`
  through one matmul, with `-curv <x,y>_L - 1` taken from `||x-y||^2` for
  near pairs as in `dist` (from dot products here, so float32 distances below
  about 1e-3 ||x|| are rounding noise, as in the release, and below norms of
  about 1e-19 the squares underflow: distance and gradient are then 0). The
  gradient is finite on the diagonal (see `dist`).

  Args:
    x: (..., n, d) space components.
    y: (..., m, d) space components.
    curv: positive curvature magnitude.

  Returns:
    (..., n, m) distances >= 0.
  """
  _check_dims("pairwise_dist", x, y)
  (x, y), c, out = _prepare(curv, x, y)
  xx, yy = _sq_norm(x)[..., :, None], _sq_norm(y)[..., None, :]
  x_t, y_t = _time(xx, c), _time(yy, c)
  xy = jnp.einsum("...nd,...md->...nm", x, y, precision=_HIGHEST)
  r = _root_of_excess(_excess_gram(c, xy, xx, yy, x_t, y_t))
  return (_acosh_from_root(r, x.dtype) / jnp.sqrt(c)).astype(out)


def dist0(x, curv):
  """Distance from the origin, asinh(sqrt(curv) ||x||) / sqrt(curv).

  Not differentiable at x = 0 (it is a norm there); the gradient there is 0.

  Args:
    x: (..., d) space components.
    curv: positive curvature magnitude.

  Returns:
    (...) distances >= 0.
  """
  (x,), c, out = _prepare(curv, x)
  rc = jnp.sqrt(c) * _norm(x)
  return (jnp.arcsinh(rc) / jnp.sqrt(c)).astype(out)


# ----------------------------------------------------------------------------
# Exponential and logarithmic maps at the origin.


def exp_map0(v, curv):
  """Lifts a tangent vector at the origin onto the hyperboloid.

  `sinh(sqrt(c) ||v||) v / (sqrt(c) ||v||)`, with the release's clamp of the
  sinh argument at asinh(2^15) (beyond it the norm of the result stays at
  2^15 / sqrt(c)); smooth at v = 0 where it equals v.

  Args:
    v: (..., d) tangent vectors (the time component of a tangent vector at the
      origin is 0).
    curv: positive curvature magnitude.

  Returns:
    (..., d) space components of points on the hyperboloid.
  """
  (v,), c, out = _prepare(curv, v)
  r_sq = c * _sq_norm(v)
  r = _safe_sqrt(r_sq)
  return (_sinhc(r, r_sq)[..., None] * v).astype(out)


def log_map0(x, curv):
  """Inverse of `exp_map0`: the tangent vector at the origin pointing to x.

  `asinh(sqrt(c) ||x||) x / (sqrt(c) ||x||)`, which equals the release's
  `acosh(sqrt(1 + c ||x||^2)) x / (sqrt(c) ||x||)` but stays accurate for
  small norms (the release's acosh clamp loses them) and is smooth at x = 0.

  Args:
    x: (..., d) space components.
    curv: positive curvature magnitude.

  Returns:
    (..., d) tangent vectors; their norm is `dist0(x)`.
  """
  (x,), c, out = _prepare(curv, x)
  r_sq = c * _sq_norm(x)
  r = _safe_sqrt(r_sq)
  return (_asinhc(r, r_sq)[..., None] * x).astype(out)


def geodesic_toward_origin(x, curv, target_dist):
  """The point on the geodesic ray from the origin through x at a distance.

  Used by safety traversal to pull a query back toward the root until its
  distance from the origin is exactly `target_dist`. The point is
  `sinh(sqrt(c) t) / sqrt(c) * x / ||x||` (t clamped like `exp_map0`); a
  negative `target_dist` lands on the opposite ray. At x = 0 the ray is
  undefined and the origin is returned, with gradient 0.

  Args:
    x: (..., d) space components.
    curv: positive curvature magnitude.
    target_dist: scalar or (...) distances from the origin.

  Returns:
    (..., d) space components at distance |target_dist| from the origin.
  """
  (x,), c, out = _prepare(curv, x)
  t = jnp.asarray(target_dist, x.dtype)
  unit = _unit(x)
  rc = jnp.sqrt(c)
  scale = jnp.sinh(jnp.clip(rc * t, -SINH_MAX, SINH_MAX)) / rc
  return (scale[..., None] * unit).astype(out)


# ----------------------------------------------------------------------------
# Entailment cones.


def half_aperture(x, curv, min_radius=0.1):
  """Half-aperture of the entailment cone of x.

  `asin(clip(2 K / (sqrt(c) ||x|| + eps), -1 + eps, 1 - eps))` with K =
  `min_radius` and eps 1e-5 (the release's form): wide near the origin,
  narrowing as x moves out. Inside the clip the gradient is that of asin; in
  the clipped region (||x|| <= 2K/sqrt(c) roughly) it is 0, also at x = 0.

  Args:
    x: (..., d) space components.
    curv: positive curvature magnitude.
    min_radius: K, the radius of the region around the origin where the cone
      is at its widest.

  Returns:
    (...) half-apertures in (0, pi/2).
  """
  (x,), c, out = _prepare(curv, x)
  norm = _norm(x)
  ratio = 2 * min_radius / (jnp.sqrt(c) * norm + CONE_EPS)
  return jnp.arcsin(jnp.clip(ratio, -1 + CONE_EPS, 1 - CONE_EPS)).astype(out)


def oxy_angle(x, y, curv):
  """Exterior angle at x of the hyperbolic triangle origin-x-y.

  The release's form: with l = c <x,y>_L,
  `acos(clip((y_t + l x_t) / (||x|| sqrt(max(l^2 - 1, eps)) + eps), -1+eps,
  1-eps))`, eps 1e-5. Here `l^2 - 1` is computed as `u (u + 2)` with
  `u = -l - 1`, the same number with less cancellation near x = y, and the
  norm of x has gradient 0 at x = 0, so the gradient is finite at x = 0 and
  x = y (where the angle itself is undefined and the value is pi/2, the
  release's up to its rounding). For explicit pairs (x and y of one shape)
  `u` comes from x - y as in `dist`, which keeps float32 angles accurate for
  near pairs far from the origin; for all pairs, broadcast `x[:, None]`
  against `y[None]`: then only dot products enter and it lowers to a matmul
  (float32 angles of pairs closer than ~1e-3 ||x|| are then rounding noise,
  as in the release).

  Args:
    x: (..., d) space components of the cone apex.
    y: (..., d) space components, broadcastable with x.
    curv: positive curvature magnitude.

  Returns:
    (...) angles in (0, pi).
  """
  _check_dims("oxy_angle", x, y)
  (x, y), c, out = _prepare(curv, x, y)
  xx, yy = _sq_norm(x), _sq_norm(y)
  x_t, y_t = _time(xx, c), _time(yy, c)
  u, _, dt = _excess_pairs(c, x, y, xx, yy, x_t, y_t)
  numer = -dt - u * x_t  # y_t + l x_t with l = -1 - u
  denom = _norm(x) * jnp.sqrt(jnp.maximum(u * (u + 2), CONE_EPS))
  ratio = numer / (denom + CONE_EPS)
  return jnp.arccos(jnp.clip(ratio, -1 + CONE_EPS, 1 - CONE_EPS)).astype(out)


def entailment_energy(x, y, curv, aperture_scale=1.0, min_radius=0.1):
  """How far y lies outside the entailment cone of x.

  `max(0, oxy_angle(x, y) - aperture_scale * half_aperture(x))`: zero iff y is
  inside the (scaled) cone of x, i.e. x entails y.

  Args:
    x: (..., d) space components of the more generic concept (cone apex).
    y: (..., d) space components of the more specific concept.
    curv: positive curvature magnitude.
    aperture_scale: multiplies the half-aperture (the release's scale).
    min_radius: passed to `half_aperture`.

  Returns:
    (...) energies >= 0.
  """
  angle = oxy_angle(x, y, curv)
  aperture = half_aperture(x, curv, min_radius)
  return jax.nn.relu(angle - aperture_scale * aperture)


# ----------------------------------------------------------------------------
# Poincaré ball.


def to_poincare(x, curv):
  """Maps hyperboloid points to the Poincaré ball of radius 1/sqrt(curv).

  `p = x / (1 + sqrt(c) x_t)`.

  Args:
    x: (..., d) space components.
    curv: positive curvature magnitude.

  Returns:
    (..., d) points with ||p|| < 1/sqrt(curv).
  """
  (x,), c, out = _prepare(curv, x)
  x_t = _time(_sq_norm(x), c)
  return (x / (1 + jnp.sqrt(c) * x_t)[..., None]).astype(out)


def from_poincare(p, curv):
  """Inverse of `to_poincare`: `x = 2 p / (1 - c ||p||^2)`.

  Points on or outside the ball's boundary have no image; the denominator is
  floored at the dtype's machine epsilon so that the result stays finite.

  Args:
    p: (..., d) points of the Poincaré ball of radius 1/sqrt(curv).
    curv: positive curvature magnitude.

  Returns:
    (..., d) space components on the hyperboloid.
  """
  (p,), c, out = _prepare(curv, p)
  denom = jnp.maximum(1 - c * _sq_norm(p), jnp.finfo(p.dtype).eps)
  return (2 * p / denom[..., None]).astype(out)
