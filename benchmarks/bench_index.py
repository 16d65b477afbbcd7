"""Benchmark: the gallery index (`hysac_jax.index`) against NumPy brute force.

A synthetic gallery of N hyperboloid points at d = 768 (curvature 1) whose
directions have an intrinsic dimension of 64 (`synthetic_points`: 1000
concepts in a 64-dimensional latent space, spread around each, mapped into
768 dimensions, plus 5 % isotropic noise; real CLIP embeddings are reported
to have an intrinsic dimension of tens), at a distance from the origin
around 1.2 (safe, 80 %) or 1.9 (unsafe, 20 %, their directions shifted
too), so that b' (from the safe points' 95th percentile, alpha 0.8) falls
between the two groups. Queries are fresh draws of the same process.

In one run, baseline and index in the same process:
- build time: the exact back-end (to device) and the FAISS structure;
- queries/s at batch 1 and batch 256: NumPy brute force (one BLAS matmul,
  arccosh, argpartition + sort of the k best), exact (JAX) and approx
  (FAISS, re-ranked);
- recall@10 of approx against exact, on `--queries` queries;
- resident memory (peak RSS) after each stage.
Each timing is the median of `--repeats` runs after a warm-up, the
contenders interleaved within each repeat (a shared machine's load changes
then hit all of them alike).

  .venv/bin/python benchmarks/bench_index.py                 # N = 10^6
  .venv/bin/python benchmarks/bench_index.py --n 20000 --repeats 2  # dry run
"""

import argparse
import math
import os
import platform
import resource
import statistics
import sys
import time

import numpy as np

# This checkout's package first (not an installed copy).
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from timing import progress  # pylint: disable=g-import-not-at-top,wrong-import-position

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

from hysac_jax import index as index_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from hysac_jax import safety  # pylint: disable=g-import-not-at-top,wrong-import-position

CURV = 1.0
DIM = 768
LATENT = 64  # intrinsic dimension of the directions (CLIP's: tens)
CONCEPTS = 1000
SPREAD = 0.5  # within-concept spread, relative to the concepts' own
NOISE = 0.05  # isotropic noise in all DIM coordinates, relative norm
UNSAFE_FRACTION = 0.2
SAFE_RADIUS, UNSAFE_RADIUS, RADIUS_SD = 1.2, 1.9, 0.15
K = 10


def generator(seed=0):
  """The fixed parts of the synthetic distribution: (concepts (CONCEPTS,
  LATENT), the unsafe shift (LATENT,), basis (LATENT, DIM) orthonormal)."""
  rng = np.random.default_rng(seed)
  concepts = rng.standard_normal((CONCEPTS, LATENT)).astype(np.float32)
  shift = rng.standard_normal(LATENT).astype(np.float32)
  basis = np.linalg.qr(rng.standard_normal((DIM, LATENT)))[0].T
  return concepts, shift, basis.astype(np.float32)


def synthetic_points(n, seed, parts):
  """(n, DIM) float32 hyperboloid points, (n,) bool unsafe truth.

  Directions: a concept plus SPREAD noise in the LATENT space (an unsafe
  point also moved along a common shift), mapped into DIM dimensions, plus
  NOISE isotropic noise; distance from the origin around SAFE_RADIUS or
  UNSAFE_RADIUS, lifted with exp_map0.
  """
  concepts, shift, basis = parts
  rng = np.random.default_rng(seed)
  which = rng.integers(0, len(concepts), n)
  unsafe = rng.random(n) < UNSAFE_FRACTION
  out = np.empty((n, DIM), np.float32)
  for start in range(0, n, 65536):  # bounded temporaries
    sl = slice(start, min(start + 65536, n))
    m = sl.stop - sl.start
    z = concepts[which[sl]] + SPREAD * rng.standard_normal(
        (m, LATENT), dtype=np.float32)
    z[unsafe[sl]] += shift
    u = z @ basis
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    u += NOISE * rng.standard_normal((m, DIM), dtype=np.float32) / np.float32(
        math.sqrt(DIM))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    radius = np.where(unsafe[sl], UNSAFE_RADIUS, SAFE_RADIUS) + (
        RADIUS_SD * rng.standard_normal(m))
    radius = np.maximum(radius, 0.05)
    # exp_map0 of a tangent vector of norm r: space norm sinh(sqrt(c) r)/sqrt(c)
    out[sl] = u * (np.sinh(math.sqrt(CURV) * radius) / math.sqrt(CURV))[
        :, None].astype(np.float32)
  return out, unsafe


def numpy_search(queries, points, points_t, k):
  """NumPy brute force: all distances, then the k nearest (ties: index)."""
  q_t = np.sqrt(1 / CURV + np.sum(queries * queries, -1))
  z = -CURV * (queries @ points.T - np.outer(q_t, points_t))
  dist = np.arccosh(np.maximum(z, np.float32(1 + 1e-8))) / math.sqrt(CURV)
  part = np.argpartition(dist, k, axis=1)[:, :k]
  rows = np.arange(len(queries))[:, None]
  order = np.lexsort((part, dist[rows, part]), axis=1)
  return part[rows, order]


def peak_rss_gib():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--n", type=int, default=1_000_000)
  parser.add_argument("--queries", type=int, default=1000,
                      help="queries for recall@10")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--single", type=int, default=20,
                      help="batch-1 queries per timing run")
  parser.add_argument("--approx", default="auto",
                      choices=("auto", "hnsw", "ivf"))
  args = parser.parse_args()
  print(f"machine: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs; jax {jax.__version__} on "
        f"{jax.devices()[0].platform}")
  parts = generator(0)
  points, truth = synthetic_points(args.n, 1, parts)
  queries, _ = synthetic_points(max(args.queries, 256), 2, parts)
  dist0 = np.asarray(safety.origin_distance(points, CURV))
  bound = float(np.percentile(dist0[~truth], 95))
  progress(f"{args.n} points, d {DIM}: safe distance {dist0[~truth].mean():.2f}"
           f", unsafe {dist0[truth].mean():.2f}, b {bound:.2f}; peak RSS "
           f"{peak_rss_gib():.1f} GiB")

  start = time.perf_counter()
  index = index_lib.Index.from_arrays(points, [""] * args.n, CURV,
                                      bound=bound)
  index.backend("exact")
  exact_build = time.perf_counter() - start
  progress(f"exact back-end ready in {exact_build:.1f} s; peak RSS "
           f"{peak_rss_gib():.1f} GiB")
  start = time.perf_counter()
  from hysac_jax.index import backends  # pylint: disable=g-import-not-at-top
  structure, params = backends.build_faiss(points, CURV, args.approx)
  approx_build = time.perf_counter() - start
  progress(f"approx back-end {params} built in {approx_build:.1f} s; peak "
           f"RSS {peak_rss_gib():.1f} GiB")
  exact = index.backend("exact")
  approx = backends.Approx(points, CURV, structure, params)
  points_t = backends.time_component(points, CURV).astype(np.float32)

  # Recall@10 of approx against exact, and exact against NumPy.
  q = queries[:args.queries]
  want, _ = exact.search(q, K)
  got, _ = approx.search(q, K)
  recall = np.mean([len(set(a) & set(b)) / K for a, b in zip(want, got)])
  base = numpy_search(q[:64], points, points_t, K)
  agree = np.mean([len(set(a) & set(b)) / K for a, b in zip(base, want[:64])])
  progress(f"recall@10 approx vs exact {recall:.4f} ({len(q)} queries); "
           f"exact vs NumPy {agree:.4f} (64 queries)")

  # Interleaved: each repeat times every contender in turn, so that a load
  # change on this shared machine hits all of them alike.
  single = queries[:args.single]
  contenders = {
      "numpy": lambda x: numpy_search(x, points, points_t, K),
      "exact": lambda x: exact.search(x, K),
      "approx": lambda x: approx.search(x, K)}
  tasks = {(name, batch): (
      (lambda fn=fn: [fn(single[i:i + 1]) for i in range(len(single))])
      if batch == 1 else (lambda fn=fn: fn(queries[:256])))
           for name, fn in contenders.items() for batch in (1, 256)}
  times = {key: [] for key in tasks}
  for repeat in range(args.repeats + 1):  # the first is the warm-up
    for key, task in tasks.items():
      start = time.perf_counter()
      task()
      if repeat:
        times[key].append(time.perf_counter() - start)
    progress(f"repeat {repeat}/{args.repeats} done" if repeat else
             "warm-up done")
  results = {name: (len(single) / statistics.median(times[name, 1]),
                    256 / statistics.median(times[name, 256]))
             for name in contenders}
  print(f"\nN = {args.n}, d = {DIM}, k = {K}, median of {args.repeats}")
  print(f"build: exact {exact_build:.1f} s, approx ({params['kind']}) "
        f"{approx_build:.1f} s")
  print(f"recall@10 approx vs exact: {recall:.4f}")
  print(f"{'':8s} {'q/s batch 1':>12s} {'x NumPy':>8s} "
        f"{'q/s batch 256':>14s} {'x NumPy':>8s}")
  for name, (b1, b256) in results.items():
    print(f"{name:8s} {b1:12.1f} {b1 / results['numpy'][0]:8.1f} "
          f"{b256:14.1f} {b256 / results['numpy'][1]:8.1f}")
  print(f"peak RSS {peak_rss_gib():.1f} GiB (the gallery alone: "
        f"{points.nbytes / 2**30:.2f} GiB)")


if __name__ == "__main__":
  main()
