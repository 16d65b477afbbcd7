"""Nearest gallery items by Lorentz distance: an exact and an approximate way.

On the hyperboloid the geodesic distance `acosh(-c <x,y>_L) / sqrt(c)` is
decreasing in the Lorentz inner product `<x,y>_L = x·y − x_t y_t`, so the
nearest items are those of largest `<x,y>_L`, the plain inner product of
the augmented vectors `[x, −x_t]` (query) and `[y, y_t]` (item).

- `exact`: that score against every item, chunk by chunk in one jitted
  `lax.scan` (memory: queries × `chunk` floats), with a running top-k; the
  items are split in blocks across the local devices, whose top-k are
  merged. Ties go to the lower item index, as everywhere in the
  package (`predict.rank`, `evaluation.retrieval`).
- `approx`: FAISS. Augmented item vectors have unequal norms (`||y||² + y_t²
  = 2||y||² + 1/c` grows with the distance from the origin), which costs an
  inner-product HNSW or IVF most of its recall. One more coordinate
  equalises them: items `[y, y_t, sqrt(M² − ||[y, y_t]||²)]` and queries
  `[x, −x_t, 0]`, M the largest item norm, give `||q − p||² = ||q||² + M² −
  2 <x,y>_L`, so L2 nearest neighbours are the Lorentz nearest. An
  `IndexHNSWFlat` (M=32, efConstruction 80, efSearch 256) serves up to
  `HNSW_MAX` items, an `IndexIVFFlat` (nlist = 2 sqrt(N), nprobe 24,
  k-means on at most 64 × nlist items, 10 iterations) more: HNSW's build
  grows faster with N and its recall at fixed efSearch falls (0.93 at 10⁵
  on the benchmark's data), IVF's does not (0.998 at 10⁶). Each query takes
  `RERANK` × k candidates, re-scored exactly; ties again to the lower index.

Both return `(indices (Q, k) int64, distances (Q, k) float32)`, with -1 /
inf where fewer than k items are allowed (`allowed`: the `--safe-only`
mask).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


CHUNK = 65536
HNSW_MAX = 50_000
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 256
IVF_NPROBE = 24
IVF_TRAIN_PER_LIST = 64
IVF_NITER = 10
RERANK = 4
APPROX_KINDS = ("auto", "hnsw", "ivf", "none")


def time_component(points, curv):
  """(N, d) or (d,) space components -> time components sqrt(1/c + |x|²),
  float64 (summed in float64, CHUNK rows at a time: no float64 copy of a
  large gallery)."""
  points = np.asarray(points)
  if points.ndim == 1:
    return time_component(points[None], curv)[0]
  sq = np.concatenate([np.einsum("ij,ij->i", p, p) for p in (
      np.asarray(points[s:s + CHUNK], np.float64)
      for s in range(0, len(points), CHUNK))]) if len(points) else np.zeros(0)
  return np.sqrt(1.0 / curv + sq)


# --------------------------------------------------------------------------
# Exact.


@functools.partial(jax.jit, static_argnames=("k", "chunk"))
def _exact_top_k(queries, items, items_t, allowed, curv, k, chunk):
  """Top-k by Lorentz inner product over `items` (rows a multiple of chunk).

  Args:
    queries: (Q, d); items: (M, d), M = n · chunk; items_t: (M,) time
      components; allowed: (M,) bool (False: padding or filtered out).

  Returns:
    ((Q, k) scores, -inf for a not-allowed pick; (Q, k) int32 indices).
  """
  q_t = jnp.sqrt(1.0 / curv + jnp.sum(queries * queries, axis=-1))
  n_chunks = items.shape[0] // chunk
  per_chunk = min(k, chunk)

  def step(carry, c):
    best, best_i = carry
    rows = jax.lax.dynamic_slice_in_dim(items, c * chunk, chunk)
    rows_t = jax.lax.dynamic_slice_in_dim(items_t, c * chunk, chunk)
    ok = jax.lax.dynamic_slice_in_dim(allowed, c * chunk, chunk)
    score = (jnp.matmul(queries, rows.T, precision=jax.lax.Precision.HIGHEST)
             - q_t[:, None] * rows_t[None, :])
    score = jnp.where(ok[None, :], score, -jnp.inf)
    top, top_i = jax.lax.top_k(score, per_chunk)
    # The running best come first and hold lower indices, and top_k keeps
    # the first of equal values: ties go to the lower index.
    merged = jnp.concatenate([best, top], axis=1)
    merged_i = jnp.concatenate([best_i, top_i + c * chunk], axis=1)
    keep, pos = jax.lax.top_k(merged, k)
    return (keep, jnp.take_along_axis(merged_i, pos, axis=1)), None

  init = (jnp.full((queries.shape[0], k), -jnp.inf, queries.dtype),
          jnp.full((queries.shape[0], k), -1, jnp.int32))
  (best, best_i), _ = jax.lax.scan(step, init, jnp.arange(n_chunks))
  return best, best_i


def pair_inner(queries, picked, curv):
  """(Q, d) queries, (Q, m, d) items -> (Q, m) float64 Lorentz inner
  products, each query with its own items."""
  q = np.asarray(queries, np.float64)
  y = np.asarray(picked, np.float64)
  y_t = np.sqrt(1.0 / curv + np.einsum("qmd,qmd->qm", y, y))
  return np.einsum("qd,qmd->qm", q, y) - time_component(q, curv)[:, None] * y_t


def distances(queries, items, indices, curv):
  """Lorentz distances of each query to its picked items (inf where -1).

  SPEC §1's `acosh(−c <x,y>_L) / sqrt(c)` on float64 inner products of the
  k picks: accurate to ~1e-7 for near pairs too, and a few NumPy calls, not
  a device round trip per query (which cost a batch-1 query more than
  FAISS's search itself).
  """
  safe = np.where(indices < 0, 0, indices)
  inner = pair_inner(queries, items[safe], curv)
  out = np.arccosh(np.maximum(-curv * inner, 1.0)) / math.sqrt(curv)
  return np.where(indices < 0, np.inf, out).astype(np.float32)


def _sharded_search(mesh, k, chunk):
  """A jitted (queries, items, items_t, allowed, curv) -> (Q, k) indices:
  each device's top-k of its rows (`_exact_top_k`), merged. Device i holds
  the i-th block of rows, so the merge, in device order, still breaks ties
  by the lower index."""
  rows, whole = P("data"), P()

  def local(queries, items, items_t, allowed, curv):
    best, idx = _exact_top_k(queries, items, items_t, allowed, curv, k, chunk)
    offset = jax.lax.axis_index("data") * items.shape[0]
    return best[None], jnp.where(idx >= 0, idx + offset, -1)[None]

  per_device = jax.shard_map(local, mesh=mesh,
                             in_specs=(whole, rows, rows, rows, whole),
                             out_specs=(rows, rows),
                             # The scan's carry starts replicated (-inf).
                             check_vma=False)

  @jax.jit
  def search(queries, items, items_t, allowed, curv):
    best, idx = per_device(queries, items, items_t, allowed, curv)
    q = queries.shape[0]
    best = jnp.moveaxis(best, 0, 1).reshape(q, -1)  # (Q, devices * k)
    idx = jnp.moveaxis(idx, 0, 1).reshape(q, -1)
    _, pos = jax.lax.top_k(best, k)
    return jnp.take_along_axis(idx, pos, axis=1)

  return search


class Exact:
  """Exact search: every item scored on device, `CHUNK` items at a time.

  The items are split in blocks of rows across `devices` (default: every
  local device), so a gallery may fill the memory of all of them; each
  device ranks its block and the blocks' top-k are merged.

  Args:
    points: (N, d) float32 items.
    curv: curvature magnitude.
    chunk: items per matmul (a smaller block is one chunk).
    devices: the devices holding the items.
  """

  name = "exact"

  def __init__(self, points, curv, chunk=CHUNK, devices=None):
    self.points = np.asarray(points, np.float32)
    self.curv = float(curv)
    devices = list(jax.local_devices() if devices is None else devices)
    self._mesh = Mesh(np.asarray(devices), ("data",))
    n, n_dev = len(self.points), len(devices)
    per_device = -(-max(n, 1) // n_dev)
    self.chunk = min(chunk, 1 << max(per_device - 1, 0).bit_length())
    rows = -(-per_device // self.chunk) * self.chunk * n_dev
    pad = rows - n
    padded = np.concatenate([self.points, np.zeros(
        (pad, self.points.shape[1]), np.float32)]) if pad else self.points
    place = NamedSharding(self._mesh, P("data"))
    self._items = jax.device_put(padded, place)
    del padded
    self._items_t = jax.device_put(np.concatenate([
        time_component(self.points, self.curv), np.zeros(pad)]).astype(
            np.float32), place)
    self._rows = rows
    self._allowed = place
    self._search = {}

  def search(self, queries, k, allowed=None):
    """(Q, d) queries -> ((Q, k) int64 indices, (Q, k) float32 distances)."""
    n = len(self.points)
    mask = np.zeros(self._rows, bool)
    mask[:n] = True if allowed is None else allowed
    k_run = min(k, self._rows)
    if k_run not in self._search:
      self._search[k_run] = _sharded_search(self._mesh, k_run, self.chunk)
    idx = self._search[k_run](
        jnp.asarray(queries, jnp.float32), self._items, self._items_t,
        jax.device_put(mask, self._allowed), jnp.float32(self.curv))
    idx = np.asarray(idx).astype(np.int64)
    idx = np.where(mask[np.maximum(idx, 0)] & (idx >= 0), idx, -1)
    if k_run < k:
      idx = np.pad(idx, ((0, 0), (0, k - k_run)), constant_values=-1)
    return idx, distances(queries, self.points, idx, self.curv)


# --------------------------------------------------------------------------
# Approximate (FAISS).


def augment_items(points, curv, max_sq_norm):
  """(N, d) items -> (N, d + 2) float32 `[y, y_t, sqrt(M² − |y|² − y_t²)]`."""
  points = np.asarray(points, np.float32)
  y_t = time_component(points, curv)
  sq = 2 * y_t**2 - 1.0 / curv  # |y|² + y_t²
  extra = np.sqrt(np.maximum(max_sq_norm - sq, 0.0))
  return np.concatenate([points, y_t[:, None].astype(np.float32),
                         extra[:, None].astype(np.float32)], axis=1)


def augment_queries(queries, curv):
  """(Q, d) queries -> (Q, d + 2) float32 `[x, −x_t, 0]`."""
  queries = np.asarray(queries, np.float32)
  x_t = time_component(queries, curv).astype(np.float32)
  return np.concatenate([queries, -x_t[:, None],
                         np.zeros((len(queries), 1), np.float32)], axis=1)


def max_sq_norm(points, curv):
  """M²: the largest squared norm of the augmented items `[y, y_t]`."""
  return float(np.max(2 * time_component(points, curv)**2 - 1.0 / curv))


def choose_kind(n, kind="auto"):
  """"hnsw" up to `HNSW_MAX` items, else "ivf" (or `kind` itself)."""
  if kind == "auto":
    return "hnsw" if n <= HNSW_MAX else "ivf"
  return kind


def build_faiss(points, curv, kind="auto", seed=0):
  """The FAISS structure over the equalised augmented items.

  Returns:
    (faiss index, params dict for the manifest: kind, M², and the kind's
    parameters).
  """
  import faiss  # pylint: disable=g-import-not-at-top  # optional dependency
  n, d = points.shape
  kind = choose_kind(n, kind)
  m_sq = max_sq_norm(points, curv)
  params = {"kind": kind, "max_sq_norm": m_sq, "rerank": RERANK}
  if kind == "hnsw":
    index = faiss.IndexHNSWFlat(d + 2, HNSW_M)
    index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    params.update(m=HNSW_M, ef_construction=HNSW_EF_CONSTRUCTION,
                  ef_search=HNSW_EF_SEARCH)
  elif kind == "ivf":
    nlist = max(1, int(round(2 * math.sqrt(n))))
    index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d + 2), d + 2, nlist)
    index.cp.niter = IVF_NITER
    index.cp.seed = seed
    sample = np.random.default_rng(seed).permutation(n)[
        :IVF_TRAIN_PER_LIST * nlist]
    index.train(augment_items(points[np.sort(sample)], curv, m_sq))
    params.update(nlist=nlist, nprobe=min(IVF_NPROBE, nlist),
                  train=len(sample), niter=IVF_NITER)
  else:
    raise ValueError(f"approximate index kind {kind!r}: expected one of "
                     f"{APPROX_KINDS[:-1]}")
  for start in range(0, n, CHUNK):  # bounded extra memory while adding
    index.add(augment_items(points[start:start + CHUNK], curv, m_sq))
  return index, params


def rerank(queries, points, candidates, curv, k):
  """The k best of FAISS's candidates by exact Lorentz inner product (ties:
  lower index). candidates: (Q, C) int64, -1 for none."""
  q = np.asarray(queries, np.float32)
  out = np.full((len(q), k), -1, np.int64)
  for row, cand in enumerate(candidates):
    cand = np.unique(cand[cand >= 0])  # sorted: lower index first
    if not len(cand):
      continue
    score = pair_inner(q[row:row + 1], points[cand][None], curv)[0]
    order = np.lexsort((cand, -score))[:k]
    out[row, :len(order)] = cand[order]
  return out


class Approx:
  """FAISS search over the equalised augmented items, re-ranked exactly.

  Args:
    points: (N, d) float32 items (the same rows FAISS holds).
    curv: curvature magnitude.
    faiss_index: from `build_faiss` (or `faiss.read_index`).
    params: its params dict.
  """

  name = "approx"

  def __init__(self, points, curv, faiss_index, params):
    self.points = np.asarray(points, np.float32)
    self.curv = float(curv)
    self.index, self.params = faiss_index, dict(params)

  def _search_params(self, allowed):
    import faiss  # pylint: disable=g-import-not-at-top  # optional dependency
    kw = {}
    if allowed is not None:
      bits = np.packbits(np.asarray(allowed, bool), bitorder="little")
      self._bits = bits  # the selector reads this buffer during search
      kw["sel"] = faiss.IDSelectorBitmap(len(allowed), faiss.swig_ptr(bits))
    if self.params["kind"] == "hnsw":
      return faiss.SearchParametersHNSW(efSearch=self.params["ef_search"],
                                        **kw)
    return faiss.SearchParametersIVF(nprobe=self.params["nprobe"], **kw)

  def search(self, queries, k, allowed=None):
    """(Q, d) queries -> ((Q, k) int64 indices, (Q, k) float32 distances)."""
    n_cand = min(len(self.points), max(k * self.params["rerank"], k))
    params = self._search_params(allowed)
    if self.params["kind"] == "hnsw":
      params.efSearch = max(params.efSearch, n_cand)
    _, cand = self.index.search(augment_queries(queries, self.curv), n_cand,
                                params=params)
    idx = rerank(queries, self.points, cand, self.curv, k)
    return idx, distances(queries, self.points, idx, self.curv)
