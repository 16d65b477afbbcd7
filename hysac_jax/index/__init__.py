"""A Lorentz-distance index of a gallery: build once, search with safety.

    import hysac_jax.index
    index = hysac_jax.index.open("gallery_idx")
    hits = index.search(points, 10, traversal="geodesic", safe_only=True)

`hits[q]` lists the k nearest items of query q by geodesic distance (ties:
the lower item index), each `{"rank", "index", "label", "distance",
"unsafe"}`, the `top_k` records of `python -m hysac_jax.predict --pool`
with the item's flag added. The same records come from both back-ends
(`backends`): "exact" (JAX, on the local devices) and "approx" (FAISS;
the index must have been built with one). `traversal` ("none", "release", "geodesic")
first moves a query farther than b' toward the origin, with the bound of
the gallery's modality (`safety.traverse_to_safe`, as the evaluation's
safety retrieval); `safe_only` leaves out items flagged unsafe at the b'
of the model the index was built with.

Building (`build.build`, `python -m hysac_jax.index build`) and the layout
on disk (`hysac_jax.formats.gallery`) are described there.
"""

import hashlib
import json
import os

import jax
import numpy as np
from flax import traverse_util

from hysac_jax import finite
from hysac_jax import safety
from hysac_jax.formats import gallery
from hysac_jax.index import backends

TRAVERSALS = ("none",) + safety.TRAVERSAL_METHODS
BACKENDS = ("exact", "approx")
# Leaves up to this size are hashed whole; larger ones by a strided sample
# and their float64 sum (a merged LoRA changes every entry).
_HASH_WHOLE = 1 << 16
# One compiled program per chunk shape, rather than eager ops over a whole
# gallery.
_origin_distance = jax.jit(safety.origin_distance, static_argnames=("mode",))


class SearchError(ValueError):
  """A search that cannot be answered (bad points, k, traversal, model)."""


def model_fingerprint(model):
  """A short hex digest of what a model's embeddings depend on: its mode,
  curvature, input sizes and weights (hashed by leaf; large leaves by a
  strided sample and their sum)."""
  h = hashlib.sha256()
  h.update(json.dumps({"mode": model.mode, "curv": repr(model.curv),
                       "image_size": model.image_size,
                       "context_length": model.context_length}).encode())
  flat = traverse_util.flatten_dict(model.params)
  for path in sorted(flat):
    leaf = np.asarray(flat[path])
    h.update(repr((path, leaf.shape, str(leaf.dtype))).encode())
    values = leaf.reshape(-1)
    if values.size > _HASH_WHOLE:
      h.update(np.float64(np.sum(values, dtype=np.float64)).tobytes())
      values = values[::values.size // _HASH_WHOLE]
    h.update(np.ascontiguousarray(values).tobytes())
  return h.hexdigest()[:16]


def model_record(model, modality):
  """What an index records of the model that embeds its items."""
  record = {"fingerprint": model_fingerprint(model), "kind": model.kind,
            "source": model.source, "curv": model.curv, "mode": model.mode,
            "traversal_alpha": model.traversal_alpha, "bound": None,
            "threshold": None, "bounds_source": model.bounds_source}
  if model.bounds is not None and model.mode == "hyp":
    record["bound"] = model.safe_bound(modality)
    record["threshold"] = model.threshold(modality)
  return record


class Index:
  """Gallery items with their flags, and the back-ends that search them.

  Attributes:
    points: (N, d) float32 space components.
    labels: N strings (image paths or captions).
    distance: (N,) float32 distances from the origin.
    unsafe: (N,) int8: 1 unsafe, 0 safe, -1 unknown (built without bounds).
    modality: "image" or "text".
    model: the `model_record` of the model the items were embedded with.
    directory: where it was read from (None for `from_arrays`).
    approx_params: the FAISS structure's parameters, or None.
  """

  def __init__(self, points, labels, distance, unsafe, modality, model,
               directory=None, faiss_index=None, approx_params=None):
    self.points = np.asarray(points, np.float32)
    self.labels = [str(s) for s in labels]
    self.distance = np.asarray(distance, np.float32)
    self.unsafe = np.asarray(unsafe, np.int8)
    self.modality, self.model, self.directory = modality, model, directory
    self.curv = float(model["curv"])
    self.approx_params = approx_params
    self._faiss = faiss_index
    self._backends = {}

  def __len__(self):
    return len(self.labels)

  @classmethod
  def from_arrays(cls, points, labels, curv, modality="image", bound=None,
                  alpha=safety.DEFAULT_ALPHA, approx=None):
    """An in-memory index of `points`, flagged at b' of `bound` when given.

    Args:
      points: (N, d) space components.
      labels: N names.
      curv: curvature magnitude.
      modality: of the items ("image" or "text").
      bound: b, the safe group's 95th-percentile distance (None: no flags,
        no traversal).
      alpha: alpha of b'.
      approx: None, or a FAISS kind ("auto", "hnsw", "ivf") to build.
    """
    points = np.asarray(points, np.float32)
    distance = np.concatenate([
        np.asarray(_origin_distance(points[s:s + backends.CHUNK], curv))
        for s in range(0, len(points), backends.CHUNK)])
    model = {"fingerprint": None, "curv": float(curv),
             "traversal_alpha": alpha, "bound": bound, "threshold": None}
    unsafe = np.full(len(points), gallery.UNKNOWN, np.int8)
    if bound is not None:
      threshold = finite.check_number(
          safety.safety_threshold(float(bound), float(curv), alpha),
          "index", "threshold")
      model["threshold"] = threshold
      unsafe = np.asarray(safety.unsafe_at(distance, threshold), np.int8)
    faiss_index = params = None
    if approx is not None:
      faiss_index, params = backends.build_faiss(points, curv, approx)
    return cls(points, labels, distance, unsafe, modality, model,
               faiss_index=faiss_index, approx_params=params)

  def backend(self, name="exact"):
    """The "exact" or "approx" back-end (made once, on first use)."""
    if name not in BACKENDS:
      raise SearchError(f"backend {name!r}: expected one of {BACKENDS}")
    if name not in self._backends:
      if name == "exact":
        self._backends[name] = backends.Exact(self.points, self.curv)
      else:
        if self._faiss is None:
          where = self.directory or "this index"
          raise SearchError(f"{where} has no approximate structure (built "
                            "with --approx none): use --backend exact, or "
                            "rebuild with --approx auto")
        self._backends[name] = backends.Approx(self.points, self.curv,
                                               self._faiss,
                                               self.approx_params)
    return self._backends[name]

  def traverse(self, points, traversal):
    """Queries moved toward the origin (`safety.traverse_to_safe`) with
    the bound of the gallery's modality; `traversal="none"`: unchanged."""
    self.check_options(traversal)
    if traversal == "none":
      return np.asarray(points, np.float32)
    bound = finite.check_number(self.model["bound"], "index", "model.bound")
    alpha = finite.check_number(self.model["traversal_alpha"], "index",
                                "model.traversal_alpha")
    return np.asarray(safety.traverse_to_safe(points, self.curv, bound, alpha,
                                              traversal))

  def search(self, points, k=10, *, backend="exact", traversal="none",
             safe_only=False):
    """The k nearest items of each query.

    Args:
      points: (Q, d) query points of the model the index was built with.
      k: hits per query (>= 1; fewer when fewer items are allowed).
      backend: "exact" or "approx".
      traversal: "none", "release" or "geodesic".
      safe_only: leave out items flagged unsafe (and, failing closed, those
        whose flag is unknown: such an index refuses).

    Returns:
      Q lists of {"rank", "index", "label", "distance", "unsafe"}.

    Raises:
      SearchError: k < 1, points of the wrong shape or not finite, a
        traversal or filter the index has no bounds for.
    """
    points = np.asarray(points, np.float32)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
      raise SearchError(f"k={k!r}: expected an integer of at least 1")
    if points.ndim != 2 or points.shape[1] != self.points.shape[1]:
      raise SearchError(f"query points of shape {points.shape}: expected "
                        f"(Q, {self.points.shape[1]})")
    bad = np.flatnonzero(~np.all(np.isfinite(points), axis=1))
    if len(bad):
      raise SearchError(f"query {int(bad[0])} holds a non-finite value (NaN "
                        f"or infinity): no search ({len(bad)} such)")
    self.check_options(traversal, safe_only)
    allowed = self.unsafe == gallery.SAFE if safe_only else None
    queries = self.traverse(points, traversal)
    idx, dist = self.backend(backend).search(queries, int(k), allowed)
    return [[self._hit(r, int(i), float(d))
             for r, (i, d) in enumerate(zip(row_i[row_i >= 0],
                                            row_d[row_i >= 0]))]
            for row_i, row_d in zip(idx, dist)]

  def check_options(self, traversal="none", safe_only=False):
    """Raises `SearchError` for a traversal or filter the index cannot do
    (unknown, or without the bounds it needs)."""
    if traversal not in TRAVERSALS:
      raise SearchError(f"traversal {traversal!r}: expected one of "
                        f"{TRAVERSALS}")
    where = self.directory or "this index"
    if traversal != "none" and self.model.get("bound") is None:
      raise SearchError(f"--traversal {traversal} needs the bounds of the "
                        f"model the index was built with; {where} has none "
                        "(build it with --bounds FILE)")
    # Fail closed: an unknown flag is no "safe".
    if safe_only and np.any(self.unsafe == gallery.UNKNOWN):
      raise SearchError(f"--safe-only needs unsafe flags, and {where} was "
                        "built without bounds (build it with --bounds FILE)")

  def _hit(self, rank, i, distance):
    flag = int(self.unsafe[i])
    return {"rank": rank + 1, "index": i, "label": self.labels[i],
            "distance": distance,
            "unsafe": None if flag == gallery.UNKNOWN else bool(flag)}

  def check_model(self, model):
    """Raises `SearchError` unless `model` is the one the index was built
    with (same weights fingerprint, same threshold b')."""
    where = self.directory or "the index"
    mine = self.model
    theirs = model_fingerprint(model)
    if mine.get("fingerprint") != theirs:
      raise SearchError(
          f"index {where} was built with another model (fingerprint "
          f"{mine.get('fingerprint')} from {json.dumps(mine.get('source'))}; "
          f"this model {theirs}): query it with that model, or rebuild the "
          "index")
    now = model_record(model, self.modality)["threshold"]
    if now != mine.get("threshold"):
      raise SearchError(
          f"index {where} flags its items at b'={mine.get('threshold')}, "
          f"this model's bounds give b'={now}: pass the bounds and alpha it "
          "was built with, or rebuild the index")


def open(directory, load_approx=True):  # pylint: disable=redefined-builtin
  """Reads an index directory written by `python -m hysac_jax.index build`.

  Raises:
    gallery.GalleryError: naming the directory, manifest or shard at fault.
  """
  directory = os.fspath(directory)
  manifest = gallery.read_manifest(directory)
  items = gallery.read_items(directory, manifest)
  faiss_index = None
  params = manifest.get("approx")
  if load_approx and params is not None:
    path = os.path.join(directory, gallery.APPROX_FILE)
    import faiss  # pylint: disable=g-import-not-at-top  # optional dependency
    try:
      faiss_index = faiss.read_index(path)
    except RuntimeError as e:
      raise gallery.GalleryError(
          f"{path} is corrupt or missing: {str(e).splitlines()[-1]}"
      ) from None
    if faiss_index.ntotal != manifest["count"]:
      raise gallery.GalleryError(f"{path} holds {faiss_index.ntotal} items, "
                                 f"the manifest {manifest['count']}")
  return Index(items["points"], items["labels"], items["distance"],
               items["unsafe"], manifest["modality"], manifest["model"],
               directory=directory, faiss_index=faiss_index,
               approx_params=params)
