"""Benchmark: the full evaluation report vs a per-query Python loop.

Both compute the same metrics on the same random embeddings (SPEC §4): the
four pairings in both directions, safety retrieval U→V∪G and G→S∪U without
traversal and with release and geodesic traversal, unsafe classification
(AUROC, best-threshold accuracy, accuracy at b'). The loop baseline is what a
straightforward port of the release does: one query at a time, a NumPy row of
distances, a stable argsort, membership in the top K; traversal point by
point; classification threshold by threshold.

The loop is too slow to run in full on a small CPU, so it is timed on the
first `--loop-queries` queries of every retrieval table and extrapolated
linearly to all queries (its cost is exactly linear in the number of
queries); its traversal and classification parts run in full. The output says
so.

  .venv/bin/python benchmarks/bench_eval.py            # 5000 quadruples, d 768
  .venv/bin/python benchmarks/bench_eval.py --n 1000 --repeats 2
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time

import jax
import numpy as np

# This checkout's package first (not an installed copy), then `timing`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import progress  # pylint: disable=g-import-not-at-top,wrong-import-position

from hysac_jax import evaluation
from hysac_jax import safety

K = (1, 10, 20)


# ----------------------------------------------------------------------------
# Data


def make_quadruples(n, d, c, seed=0):
  """Random aligned quadruples at HySAC-like distances from the origin.

  All four members of a quadruple share a latent direction, U and G a second
  one (so recall is neither 0 nor 1 and unsafe queries favour unsafe items);
  safe groups sit at distance ~0.8 from the origin, unsafe ones at ~2.6
  (both ± 0.15).
  """
  rng = np.random.default_rng(seed)
  latent = rng.normal(size=(n, d))
  unsafe_latent = rng.normal(size=(n, d))  # what U_i and G_i share

  def group(radius, noise, shared=0.0):
    v = latent + shared * unsafe_latent + noise * rng.normal(size=(n, d))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    r = np.clip(radius + 0.15 * rng.normal(size=(n, 1)), 0.05, None)
    return (np.sinh(np.sqrt(c) * r) / np.sqrt(c) * v).astype(np.float32)

  return (group(0.8, 1.0), group(2.6, 1.0, 3.0), group(0.8, 1.0),
          group(2.6, 1.0, 3.0))


# ----------------------------------------------------------------------------
# The per-query loop baseline


def loop_dist_row(q, pool, c):
  qt = math.sqrt(1 / c + float(q @ q))
  pt = np.sqrt(1 / c + np.sum(pool * pool, axis=1))
  inner = pool @ q - qt * pt
  return np.arccosh(np.maximum(-c * inner, 1 + 1e-8)) / math.sqrt(c)


def loop_ranking(queries, pool, c, positives, n_queries):
  """Per query: hit@K for each positive column, and the top-1 index."""
  hits = np.zeros((positives.shape[1], len(K)))
  unsafe_top1 = []
  for i in range(n_queries):
    order = np.argsort(loop_dist_row(queries[i], pool, c), kind="stable")
    for j in range(positives.shape[1]):
      for a, k in enumerate(K):
        hits[j, a] += positives[i, j] in order[:k]
    unsafe_top1.append(order[0])
  return hits / n_queries, np.array(unsafe_top1)


def loop_traverse(emb, c, bound, mode):
  threshold = bound + math.tanh((bound - 0.8) / c) + 1
  out = emb.copy()
  for i, x in enumerate(emb):
    norm = float(np.linalg.norm(x))
    if math.asinh(math.sqrt(c) * norm) / math.sqrt(c) > threshold:
      target = threshold if mode == "release" else \
          math.sinh(math.sqrt(c) * threshold) / math.sqrt(c)
      out[i] = x / norm * target
  return out


def loop_classification(safe_scores, unsafe_scores, threshold):
  scores = np.r_[safe_scores, unsafe_scores]
  labels = np.r_[np.zeros(len(safe_scores)), np.ones(len(unsafe_scores))]
  best, tpr, fpr = 0.0, [], []
  for t in np.unique(scores):
    pred = scores > t
    best = max(best, float(np.mean(pred == labels)))
    tpr.append(np.mean(scores[labels == 1] >= t))
    fpr.append(np.mean(scores[labels == 0] >= t))
  fpr, tpr = np.r_[fpr[::-1], 0.0][::-1], np.r_[tpr[::-1], 0.0][::-1]
  auc = float(np.sum(np.diff(fpr[::-1]) * (tpr[::-1][1:] + tpr[::-1][:-1])
                     / 2))
  acc = float(np.mean((scores > threshold) == labels))
  return {"auroc": auc, "best_accuracy": best, "accuracy_at_bounds": acc}


def loop_report(groups, c, loop_queries):
  """Runs the loop baseline; returns (seconds extrapolated to all queries,
  seconds actually spent)."""
  n = len(groups["S"])
  m = min(loop_queries, n)
  spent = 0.0
  extrapolated = 0.0
  bounds = safety.compute_bounds(*groups.values(), c)

  def timed_ranking(queries, pool, positives):
    nonlocal spent, extrapolated
    t0 = time.perf_counter()
    loop_ranking(queries, pool, c, positives, m)
    dt = time.perf_counter() - t0
    spent += dt
    extrapolated += dt * n / m

  single = np.arange(n)[:, None]
  for t, i in (("S", "V"), ("S", "G"), ("U", "V"), ("U", "G")):
    timed_ranking(groups[t], groups[i], single)
    timed_ranking(groups[i], groups[t], single)
  both = np.stack([np.arange(n), n + np.arange(n)], axis=1)
  for query, safe_g, unsafe_g, bound_g in (("U", "V", "G", "V"),
                                           ("G", "S", "U", "S")):
    pool = np.concatenate([groups[safe_g], groups[unsafe_g]])
    for how in ("none", "release", "geodesic"):
      q = groups[query]
      t0 = time.perf_counter()
      if how != "none":
        q = loop_traverse(q, c, bounds[bound_g]["up_95"], how)
      dt = time.perf_counter() - t0
      spent += dt
      extrapolated += dt
      timed_ranking(q, pool, both)
  t0 = time.perf_counter()
  for safe_g, unsafe_g, bound_g in (("S", "U", "S"), ("V", "G", "V")):
    dist = {g: np.arcsinh(math.sqrt(c) * np.linalg.norm(
        groups[g].astype(np.float64), axis=1)) / math.sqrt(c)
            for g in (safe_g, unsafe_g)}
    b = bounds[bound_g]["up_95"]
    loop_classification(dist[safe_g], dist[unsafe_g],
                        b + math.tanh((b - 0.8) / c) + 1)
  dt = time.perf_counter() - t0
  spent += dt
  extrapolated += dt
  return extrapolated, spent


# ----------------------------------------------------------------------------


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--n", type=int, default=5000)
  parser.add_argument("--dim", type=int, default=768)
  parser.add_argument("--curv", type=float, default=1.0)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--loop-queries", type=int, default=100,
                      help="queries per retrieval table timed in the loop "
                      "baseline (extrapolated linearly to --n)")
  args = parser.parse_args()

  groups = dict(zip("SUVG", make_quadruples(args.n, args.dim, args.curv)))
  c = args.curv
  progress(f"{args.n} quadruples ready (dim {args.dim})")

  t0 = time.perf_counter()
  report = evaluation.evaluate(*groups.values(), c)
  first = time.perf_counter() - t0
  progress(f"evaluate: first call (with jit compile) {first:.2f} s")
  ours = []
  for i in range(args.repeats):
    t0 = time.perf_counter()
    evaluation.evaluate(*groups.values(), c)
    ours.append(time.perf_counter() - t0)
    progress(f"evaluate: run {i + 1}/{args.repeats} {ours[-1]:.2f} s")

  loops = []
  for i in range(args.repeats):
    loops.append(loop_report(groups, c, args.loop_queries))
    progress(f"loop baseline: run {i + 1}/{args.repeats} {loops[-1][1]:.1f} s"
             f" spent, {loops[-1][0]:.1f} s extrapolated")
  loop_full = statistics.median(x for x, _ in loops)
  loop_spent = statistics.median(x for _, x in loops)
  med = statistics.median(ours)

  print(f"## bench_eval: full report, {args.n} quadruples, dim {args.dim}\n")
  print(f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{platform.processor() or platform.platform()}, jax "
        f"{jax.__version__} on {jax.devices()[0].platform}")
  print(f"- command: `.venv/bin/python benchmarks/bench_eval.py --n {args.n} "
        f"--dim {args.dim} --repeats {args.repeats} --loop-queries "
        f"{args.loop_queries}`")
  print(f"- loop baseline timed on the first {args.loop_queries} of "
        f"{args.n} queries of each of the 14 retrieval tables "
        f"({loop_spent:.1f} s measured) and extrapolated linearly to all "
        f"queries; its traversal and classification ran in full.\n")
  print("| implementation | median of "
        f"{args.repeats} (s) | vs loop |")
  print("|---|---|---|")
  print(f"| per-query Python loop (extrapolated) | {loop_full:.1f} | 1× |")
  print(f"| hysac_jax.evaluation.evaluate | {med:.2f} | "
        f"{loop_full / med:.0f}× |")
  print(f"| ... first call, incl. jit compile | {first:.2f} | "
        f"{loop_full / first:.0f}× |")
  sr = report["safety_retrieval"]["U->V+G"]
  print(f"\n(sanity: S-V t2i R@1 {report['retrieval']['S-V']['t2i']['R@1']:.3f},"
        f" U->V+G unsafe top-1 none/release/geodesic "
        f"{sr['none']['unsafe_top1']:.3f}/{sr['release']['unsafe_top1']:.3f}/"
        f"{sr['geodesic']['unsafe_top1']:.3f}, text AUROC "
        f"{report['classification']['text']['auroc']:.3f})")


if __name__ == "__main__":
  main()
