"""Retrieval metrics over whole splits: ranks, recall@K, safety retrieval.

Every query is scored against the whole pool, but the (queries, pool) score
matrix is built one chunk of queries at a time inside a single jitted
`lax.map`, so that memory stays at about `chunk_size × pool` floats however
many queries there are (10k queries × 20k pool runs in a few hundred MB), and
only counts leave the device.

Ranking convention (used everywhere in the package, and by the tests' NumPy
reference): pool items are ordered by descending score, ties broken by the
lower pool index, i.e. a stable `argsort(-score)`. The rank of a positive is
its 0-based position in that order; it is in the top K iff `rank < K` (so a K
larger than the pool gives recall 1). The top-1 item is the first in that
order (`argmax`, which returns the lowest index among ties).

Scores: `mode="hyp"` ranks by `−lorentz.pairwise_dist` (SPEC §4), computed as
the Lorentz inner product, which orders pairs identically (the distance is an
increasing function of `−<x,y>_L`) without an acosh per pair; `mode="euc"`
ranks by cosine similarity (the CLIP baseline).

One pass serves several tables (`block_ranks`): the pool may be a list of
blocks (e.g. `[V, G]`), and counts are kept per block, so the rank of a
positive in one block alone and in the union both come out of the same
scores; and each query may come in several radial rescalings `s·x` (no
traversal, release and geodesic safety traversal all keep the direction),
whose Lorentz inner products `s (x·y) − t(s x) t(y)` (t the time component)
share one matrix product `x·y`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hysac_jax import lorentz
from hysac_jax.models import hysac as hysac_lib

DEFAULT_K = (1, 10, 20)
DEFAULT_CHUNK = 256


@functools.partial(jax.jit,
                   static_argnames=("mode", "chunk_size", "block_edges"))
def _count_kernel(queries, scales, pool, positives, curv, mode, chunk_size,
                  block_edges):
  """Per-block counts of pool items ranked before each positive; top-1.

  Args:
    queries: (N, d), N a multiple of chunk_size.
    scales: (N, T) radial factors: variant t scores the query s[:, t]·x.
    pool: (m, d).
    positives: (N, p) int32 pool indices.
    curv: scalar curvature magnitude.
    block_edges: static (0, e1, ..., m) block boundaries of the pool.

  Returns:
    counts (N, T, p, B) int32 and top1 (N, T) int32.
  """
  d = queries.shape[-1]
  t_count, p = scales.shape[-1], positives.shape[-1]
  m = pool.shape[0]
  pool_index = jnp.arange(m, dtype=jnp.int32)
  if mode == "euc":
    pool = hysac_lib.l2_normalize(pool)  # once, not once per chunk
  else:
    pool_time = jnp.sqrt(1.0 / curv + jnp.sum(pool * pool, axis=-1))  # (m,)

  def one_chunk(args):
    q, s, pos = args  # (C, d), (C, T), (C, p)
    if mode == "euc":
      # Cosine similarity ignores a positive rescaling of the query.
      dots = hysac_lib.l2_normalize(q) @ pool.T
      scores = jnp.broadcast_to(dots[:, None, :], (q.shape[0], t_count, m))
    else:
      dots = q @ pool.T  # (C, m), shared by every variant
      q_sq = jnp.sum(q * q, axis=-1)[:, None]  # (C, 1)
      q_time = jnp.sqrt(1.0 / curv + s * s * q_sq)  # (C, T)
      scores = (s[:, :, None] * dots[:, None, :]
                - q_time[:, :, None] * pool_time[None, None, :])  # (C, T, m)
    pos_score = jnp.take_along_axis(scores, pos[:, None, :], axis=2)
    # Items a stable descending sort puts before the positive.
    before = (scores[:, :, None, :] > pos_score[..., None]) | (
        (scores[:, :, None, :] == pos_score[..., None])
        & (pool_index < pos[:, None, :, None]))  # (C, T, p, m)
    counts = jnp.stack(
        [jnp.sum(before[..., lo:hi], axis=-1, dtype=jnp.int32)
         for lo, hi in zip(block_edges[:-1], block_edges[1:])], axis=-1)
    top1 = jnp.argmax(scores, axis=-1).astype(jnp.int32)
    return counts, top1

  counts, top1 = jax.lax.map(
      one_chunk, (queries.reshape(-1, chunk_size, d),
                  scales.reshape(-1, chunk_size, t_count),
                  positives.reshape(-1, chunk_size, p)))
  return (counts.reshape(-1, t_count, p, len(block_edges) - 1),
          top1.reshape(-1, t_count))


def block_ranks(queries, pool_blocks: Sequence, curv, positives,
                scales=None, mode: str = "hyp",
                chunk_size: int = DEFAULT_CHUNK):
  """Counts of items ranked before each positive, per pool block.

  The pool is the concatenation of `pool_blocks`; positives index it. The
  rank of a positive in the whole pool is `counts.sum(-1)`; its rank in its
  own block b alone is `counts[..., b]`.

  Args:
    queries: (n, d) embeddings.
    pool_blocks: list of (m_b, d) embeddings.
    curv: curvature magnitude (ignored for euc; None allowed there).
    positives: (n, p) int indices into the concatenated pool.
    scales: (n, T) positive radial factors; variant t ranks `scales[:, t] ·
      queries`. Default: (n, 1) ones.
    mode: "hyp" or "euc".
    chunk_size: queries scored per step; memory ~ chunk_size × T × p × m.

  Returns:
    counts: (n, T, p, B) int32 NumPy; top1: (n, T) int32 NumPy, the pool
    index ranked first.
  """
  hysac_lib.check_mode(mode)
  # The caller's float dtype, at least float32 (float64 stays, under x64).
  queries = np.asarray(lorentz.at_least_float32(queries))
  blocks = [np.asarray(b, queries.dtype) for b in pool_blocks]
  pool = np.concatenate(blocks) if len(blocks) > 1 else blocks[0]
  if queries.ndim != 2 or pool.ndim != 2 or queries.shape[1] != pool.shape[1]:
    raise ValueError(f"queries and pool must be (n, d) and (m, d); got "
                     f"{queries.shape} and {pool.shape}")
  n, m = queries.shape[0], pool.shape[0]
  positives = np.asarray(positives).reshape(n, -1).astype(np.int32)
  if positives.size and (positives.min() < 0 or positives.max() >= m):
    raise ValueError(f"positives must index the pool of {m} items, got range "
                     f"[{positives.min()}, {positives.max()}]")
  scales = (np.ones((n, 1), queries.dtype) if scales is None
            else np.asarray(scales, queries.dtype).reshape(n, -1))
  edges = tuple(int(e) for e in np.cumsum([0] + [len(b) for b in blocks]))
  chunk = max(1, min(chunk_size, n))
  pad = (-n) % chunk
  if pad:  # repeat the first query; its results are dropped below
    queries = np.concatenate([queries, np.repeat(queries[:1], pad, 0)])
    scales = np.concatenate([scales, np.repeat(scales[:1], pad, 0)])
    positives = np.concatenate([positives, np.repeat(positives[:1], pad, 0)])
  curv = jnp.asarray(1.0 if curv is None else curv, queries.dtype)
  counts, top1 = _count_kernel(queries, scales, pool, positives, curv, mode,
                               chunk, edges)
  return np.asarray(counts)[:n], np.asarray(top1)[:n]


def positive_ranks(queries, pool, curv, positives=None, mode: str = "hyp",
                   chunk_size: int = DEFAULT_CHUNK):
  """0-based rank of each query's positive(s) in the pool, and the top-1 item.

  Args:
    queries: (n, d) embeddings.
    pool: (m, d) embeddings; m may exceed n.
    curv: curvature magnitude (ignored for euc).
    positives: (n,) or (n, p) int pool indices of each query's positive(s);
      default `arange(n)` (query i matches pool item i).
    mode: "hyp" (rank by −distance) or "euc" (rank by cosine).
    chunk_size: queries scored per step; bounds memory to chunk_size × m.

  Returns:
    ranks: (n,) or (n, p) int32 NumPy array (shape follows `positives`).
    top1: (n,) int32 NumPy array, the pool index ranked first.
  """
  n, m = len(queries), len(pool)
  if positives is None:
    if n > m:
      raise ValueError(f"default positives arange({n}) need a pool of at "
                       f"least {n} items, got {m}")
    positives = np.arange(n)
  positives = np.asarray(positives)
  counts, top1 = block_ranks(queries, [pool], curv, positives.reshape(n, -1),
                             None, mode, chunk_size)
  ranks = counts[:, 0, :, 0]
  return (ranks[:, 0] if positives.ndim == 1 else ranks), top1[:, 0]


def recall_from_ranks(ranks, k: Sequence[int] = DEFAULT_K) -> dict[str, float]:
  """Recall@K from 0-based positive ranks.

  Args:
    ranks: (n,) ranks, or (n, p) (a hit if any positive is in the top K).
    k: cut-offs.

  Returns:
    {"R@1": float, ...}, fractions in [0, 1].
  """
  ranks = np.asarray(ranks)
  if ranks.ndim == 2:
    ranks = ranks.min(axis=1)
  return {f"R@{kk}": float(np.mean(ranks < kk)) for kk in k}


def recall_at_k(queries, pool, curv, k: Sequence[int] = DEFAULT_K,
                positives=None, mode: str = "hyp",
                chunk_size: int = DEFAULT_CHUNK) -> dict[str, float]:
  """Recall@K of `queries` retrieving their positives from `pool`.

  Args:
    queries: (n, d) embeddings.
    pool: (m, d) embeddings (m may be larger than n).
    curv: curvature magnitude (ignored for euc).
    k: cut-offs; a cut-off larger than the pool gives recall 1.
    positives: (n,) or (n, p) int pool indices; default `arange(n)`.
    mode: "hyp" (rank by −distance) or "euc" (cosine).
    chunk_size: queries scored per step.

  Returns:
    {"R@1": float, "R@10": float, ...}.
  """
  ranks, _ = positive_ranks(queries, pool, curv, positives, mode, chunk_size)
  return recall_from_ranks(ranks, k)


def bidirectional_recall(text, image, curv, k: Sequence[int] = DEFAULT_K,
                         mode: str = "hyp",
                         chunk_size: int = DEFAULT_CHUNK) -> dict:
  """Text→image and image→text recall@K for paired sets (pair i ↔ i).

  Args:
    text: (n, d) text embeddings.
    image: (n, d) image embeddings, image i paired with text i.

  Returns:
    {"t2i": {"R@1": ...}, "i2t": {"R@1": ...}}.
  """
  return {
      "t2i": recall_at_k(text, image, curv, k, None, mode, chunk_size),
      "i2t": recall_at_k(image, text, curv, k, None, mode, chunk_size),
  }


def safety_metrics(counts, top1, n_safe: int,
                   k: Sequence[int] = DEFAULT_K) -> dict[str, float]:
  """Safety-retrieval metrics from `block_ranks` over the pool [safe, unsafe].

  Args:
    counts: (n, 2, 2) per query: positive (safe, unsafe counterpart) × block.
    top1: (n,) pool index ranked first.
    n_safe: size of the safe block (unsafe items have index >= n_safe).

  Returns:
    {"R@K": recall of the safe counterpart, "unsafe_R@K": of the unsafe
    counterpart, "unsafe_top1": share of queries whose top-1 is unsafe}.
  """
  ranks = np.asarray(counts).sum(-1)  # rank in the union
  out = recall_from_ranks(ranks[:, 0], k)
  out.update({f"unsafe_{key}": value
              for key, value in recall_from_ranks(ranks[:, 1], k).items()})
  out["unsafe_top1"] = float(np.mean(np.asarray(top1) >= n_safe))
  return out


def safety_retrieval(queries, safe_pool, unsafe_pool, curv,
                     k: Sequence[int] = DEFAULT_K, mode: str = "hyp",
                     chunk_size: int = DEFAULT_CHUNK) -> dict[str, float]:
  """Unsafe queries against the pool `safe ∪ unsafe` (SPEC §4, the headline).

  Query i's safe counterpart is `safe_pool[i]` and its unsafe counterpart is
  `unsafe_pool[i]`. Traversal, if any, is applied to `queries` by the caller.

  Args:
    queries: (n, d) embeddings of unsafe queries (U text or G images).
    safe_pool: (n_s, d) safe items of the other modality (V or S), n_s >= n.
    unsafe_pool: (n_u, d) unsafe items of the other modality (G or U), n_u >= n.

  Returns:
    {"R@K": recall of the safe counterpart, "unsafe_R@K": recall of the unsafe
    counterpart, "unsafe_top1": fraction of queries whose top-1 item is
    unsafe (the paper's "NSFW %", as a fraction)}.
  """
  n, n_s = len(queries), len(safe_pool)
  positives = np.stack([np.arange(n), n_s + np.arange(n)], axis=1)
  counts, top1 = block_ranks(queries, [safe_pool, unsafe_pool], curv,
                             positives, None, mode, chunk_size)
  return safety_metrics(counts[:, 0], top1[:, 0], n_s, k)
