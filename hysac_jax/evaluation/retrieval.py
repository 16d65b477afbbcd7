"""Retrieval metrics over whole splits: ranks, recall@K, safety retrieval.

Every query is scored against the whole pool, but the (queries, pool) score
matrix is built one chunk of queries at a time inside a single jitted
`lax.map`, so that memory stays at `chunk_size × pool` floats however many
queries there are (10k queries × 20k pool runs in a few hundred MB).

Ranking convention (used everywhere in the package, and by the tests' NumPy
reference): pool items are ordered by descending score, ties broken by the
lower pool index, i.e. a stable `argsort(-score)`. The rank of a positive is
its 0-based position in that order; it is in the top K iff `rank < K` (so a K
larger than the pool gives recall 1). The top-1 item is the first in that
order (`argmax`, which returns the lowest index among ties).

Scores: `mode="hyp"` ranks by `−lorentz.pairwise_dist` (SPEC §4); `mode="euc"`
ranks by cosine similarity (the CLIP baseline).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hysac_jax import lorentz

DEFAULT_K = (1, 10, 20)
DEFAULT_CHUNK = 512


def _check_mode(mode: str) -> None:
  if mode not in ("hyp", "euc"):
    raise ValueError(f"mode must be 'hyp' or 'euc', got {mode!r}")


def pairwise_scores(queries, pool, curv, mode: str = "hyp"):
  """Similarity of every query to every pool item (higher = closer).

  Args:
    queries: (n, d) space components (hyp) or features (euc).
    pool: (m, d) same kind as `queries`.
    curv: curvature magnitude c > 0 (ignored for euc).
    mode: "hyp" for `−d_L(q, p)`, "euc" for cosine similarity.

  Returns:
    (n, m) float32 scores.
  """
  _check_mode(mode)
  queries = jnp.asarray(queries, jnp.float32)
  pool = jnp.asarray(pool, jnp.float32)
  if mode == "hyp":
    return -lorentz.pairwise_dist(queries, pool, curv)
  queries = queries / jnp.maximum(
      jnp.linalg.norm(queries, axis=-1, keepdims=True), 1e-12)
  pool = pool / jnp.maximum(jnp.linalg.norm(pool, axis=-1, keepdims=True),
                            1e-12)
  return queries @ pool.T


@functools.partial(jax.jit, static_argnames=("mode", "chunk_size"))
def _ranks_chunked(queries, pool, positives, curv, mode, chunk_size):
  """Ranks of positives and top-1 index, for padded, chunk-aligned queries.

  Args:
    queries: (n_chunks * chunk_size, d).
    pool: (m, d).
    positives: (n_chunks * chunk_size, p) int32 pool indices.
    curv: scalar.

  Returns:
    ranks (n, p) int32 and top1 (n,) int32.
  """
  d = queries.shape[-1]
  p = positives.shape[-1]
  m = pool.shape[0]
  if mode == "euc":
    # Normalise the pool once, not once per chunk.
    pool = pool / jnp.maximum(jnp.linalg.norm(pool, axis=-1, keepdims=True),
                              1e-12)
  pool_index = jnp.arange(m, dtype=jnp.int32)

  def one_chunk(args):
    q, pos = args  # (C, d), (C, p)
    if mode == "hyp":
      scores = -lorentz.pairwise_dist(q, pool, curv)
    else:
      q = q / jnp.maximum(jnp.linalg.norm(q, axis=-1, keepdims=True), 1e-12)
      scores = q @ pool.T  # (C, m)
    pos_score = jnp.take_along_axis(scores, pos, axis=1)  # (C, p)
    # Number of pool items that a stable descending sort puts first.
    before = (scores[:, None, :] > pos_score[:, :, None]) | (
        (scores[:, None, :] == pos_score[:, :, None])
        & (pool_index[None, None, :] < pos[:, :, None]))
    ranks = jnp.sum(before, axis=-1, dtype=jnp.int32)  # (C, p)
    top1 = jnp.argmax(scores, axis=-1).astype(jnp.int32)
    return ranks, top1

  ranks, top1 = jax.lax.map(
      one_chunk, (queries.reshape(-1, chunk_size, d),
                  positives.reshape(-1, chunk_size, p)))
  return ranks.reshape(-1, p), top1.reshape(-1)


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
  _check_mode(mode)
  queries = np.asarray(queries, np.float32)
  pool = np.asarray(pool, np.float32)
  if queries.ndim != 2 or pool.ndim != 2 or queries.shape[1] != pool.shape[1]:
    raise ValueError(f"queries and pool must be (n, d) and (m, d); got "
                     f"{queries.shape} and {pool.shape}")
  n, m = queries.shape[0], pool.shape[0]
  if positives is None:
    if n > m:
      raise ValueError(f"default positives arange({n}) need a pool of at "
                       f"least {n} items, got {m}")
    positives = np.arange(n)
  positives = np.asarray(positives)
  squeeze = positives.ndim == 1
  positives = positives.reshape(n, -1).astype(np.int32)
  if positives.size and (positives.min() < 0 or positives.max() >= m):
    raise ValueError(f"positives must index the pool of {m} items, got range "
                     f"[{positives.min()}, {positives.max()}]")
  chunk = max(1, min(chunk_size, n))
  pad = (-n) % chunk
  if pad:
    queries = np.concatenate([queries, np.repeat(queries[:1], pad, 0)])
    positives = np.concatenate([positives, np.repeat(positives[:1], pad, 0)])
  curv = jnp.asarray(1.0 if curv is None else curv, jnp.float32)
  ranks, top1 = _ranks_chunked(queries, pool, positives, curv, mode, chunk)
  ranks = np.asarray(ranks)[:n]
  top1 = np.asarray(top1)[:n]
  return (ranks[:, 0] if squeeze else ranks), top1


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
  pool = np.concatenate([np.asarray(safe_pool, np.float32),
                         np.asarray(unsafe_pool, np.float32)])
  positives = np.stack([np.arange(n), n_s + np.arange(n)], axis=1)
  ranks, top1 = positive_ranks(queries, pool, curv, positives, mode,
                               chunk_size)
  out = recall_from_ranks(ranks[:, 0], k)
  out.update({f"unsafe_{key}": value
              for key, value in recall_from_ranks(ranks[:, 1], k).items()})
  out["unsafe_top1"] = float(np.mean(top1 >= n_s))
  return out
