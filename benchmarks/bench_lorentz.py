"""Benchmark: all-pairs `pairwise_dist` and `oxy_angle` vs NumPy.

Both sides evaluate the same formulas (SPEC.md §1) on the same float32 points:
N x N pairs of d-dimensional hyperboloid points. NumPy uses one BLAS matmul
for the dot products and vectorised elementwise math (the release's formulas);
JAX runs the jitted library functions (`pairwise_dist`, and `oxy_angle` on
`x[:, None]` against `y[None]`, which lowers to a matmul too), timed in steady
state (after a compile-and-warm-up call), blocking on the result. Each timing
is the median of `--repeats` runs, baseline and JAX in the same process.

  .venv/bin/python benchmarks/bench_lorentz.py               # 4096 x 4096, d 768
  .venv/bin/python benchmarks/bench_lorentz.py --n 1024 --repeats 3
"""

import argparse
import os
import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np

# This checkout's package first (not an installed copy).
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from timing import median_seconds  # pylint: disable=g-import-not-at-top,wrong-import-position
from timing import progress  # pylint: disable=g-import-not-at-top,wrong-import-position

from hysac_jax import lorentz

EPS_DIST, EPS_CONE = 1e-8, 1e-5


def np_pairwise_dist(x, y, c):
  x_t = np.sqrt(1 / c + np.sum(x * x, -1))
  y_t = np.sqrt(1 / c + np.sum(y * y, -1))
  z = -c * (x @ y.T - np.outer(x_t, y_t))
  return np.arccosh(np.maximum(z, np.float32(1 + EPS_DIST))) / np.sqrt(c)


def np_oxy_angle_all_pairs(x, y, c):
  x_t = np.sqrt(1 / c + np.sum(x * x, -1))[:, None]
  y_t = np.sqrt(1 / c + np.sum(y * y, -1))[None, :]
  l = c * (x @ y.T - x_t * y_t)
  num = y_t + l * x_t
  den = np.linalg.norm(x, axis=-1)[:, None] * np.sqrt(
      np.maximum(l * l - 1, np.float32(EPS_CONE)))
  ratio = np.clip(num / (den + np.float32(EPS_CONE)), -1 + EPS_CONE,
                  1 - EPS_CONE)
  return np.arccos(ratio)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--n", type=int, default=4096)
  parser.add_argument("--dim", type=int, default=768)
  parser.add_argument("--curv", type=float, default=1.0)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()

  rng = np.random.default_rng(0)
  c = np.float32(args.curv)

  def points():
    v = rng.normal(size=(args.n, args.dim)).astype(np.float32)
    v *= rng.uniform(0.3, 2.5, (args.n, 1)).astype(np.float32) / np.linalg.norm(
        v, axis=-1, keepdims=True)
    return np.asarray(lorentz.exp_map0(v, args.curv))

  x, y = points(), points()
  progress(f"points ready ({args.n} x {args.dim})")
  xj, yj = jnp.asarray(x), jnp.asarray(y)
  cj = jnp.float32(args.curv)
  jax_dist = jax.jit(lorentz.pairwise_dist)
  jax_angle = jax.jit(lambda a, b, k: lorentz.oxy_angle(a[:, None], b[None], k))

  cases = [
      ("pairwise_dist", lambda: np_pairwise_dist(x, y, c),
       lambda: jax_dist(xj, yj, cj).block_until_ready()),
      ("oxy_angle (all pairs)", lambda: np_oxy_angle_all_pairs(x, y, c),
       lambda: jax_angle(xj, yj, cj).block_until_ready()),
  ]
  # Same numbers, up to float32 rounding of the two formulations.
  np.testing.assert_allclose(np.asarray(cases[0][2]()), cases[0][1](),
                             atol=2e-3)
  np.testing.assert_allclose(np.cos(np.asarray(cases[1][2]())),
                             np.cos(cases[1][1]()), atol=2e-3)

  rows = []
  for name, np_fn, jax_fn in cases:
    t_np = median_seconds(np_fn, args.repeats, label=f"{name} NumPy")
    t_jax = median_seconds(jax_fn, args.repeats, label=f"{name} JAX")
    rows.append((name, t_np, t_jax))

  print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{jax.devices()[0].platform}; jax {jax.__version__}, "
        f"numpy {np.__version__}")
  print(f"command: python benchmarks/bench_lorentz.py --n {args.n} "
        f"--dim {args.dim} --repeats {args.repeats}")
  print(f"\n{args.n} x {args.n} pairs, d = {args.dim}, float32, "
        f"median of {args.repeats}\n")
  print("| op | NumPy (s) | JAX jit (s) | speed-up |")
  print("| --- | --- | --- | --- |")
  for name, t_np, t_jax in rows:
    print(f"| {name} | {t_np:.3f} | {t_jax:.3f} | {t_np / t_jax:.2f}x |")


if __name__ == "__main__":
  main()
