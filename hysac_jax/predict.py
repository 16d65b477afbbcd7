"""Embed images and captions with a HySAC model, flag unsafe ones, retrieve.

    python -m hysac_jax.predict --model DIR --image photo.jpg \
        --text "a dog on a beach" [--pool captions.txt] [--top-k 5] \
        [--redirect] [--embedding] [--bounds bounds.json]

`--model` is any directory `hysac_jax.serving.load_model` reads: an export
(`OUT/hf`, `OUT/orbax`, `OUT/stablehlo`), a training run or a converted
model. One JSON line is printed per input, in the order the `--image` and
`--text` values appear on the command line (`--image a.jpg --text "a dog"
--image b.jpg` answers a.jpg, "a dog", b.jpg; each flag may repeat):

    {"type": "image", "input": "photo.jpg",
     "distance_from_origin": 1.93,         # SPEC §4: farther = less safe
     "unsafe": false, "unsafe_score": -0.41, "threshold": 2.34,
     "embedding": [...],                   # with --embedding
     "redirected": {"moved": false, ...},  # with --redirect
     "top_k": [{"rank": 1, "index": 17, "label": "...", "distance": 0.8}, ...],
     "top_k_traversed": [...]}             # with --pool

`unsafe` is `distance_from_origin > threshold`, the threshold being the
safety-traversal threshold b' of the input's modality (SPEC §4; from the
model's bounds). `unsafe_score` = distance − b' (> 0 means unsafe). Without
bounds, `unsafe` is null and a `note` says so.

`--pool` is a caption file (one caption per line, blank lines skipped) or a
saved embedding pool, `.npz` with `embeddings` float32 (N, D) (points of
this model), `labels` str (N,), `modality` ("text" or "image") and `curv`;
`--save-pool FILE.npz` writes the embedded caption file in that form. Pool
entries are ranked by −distance on the hyperboloid (cosine in "euc" mode).
`top_k_traversed` ranks again after safety traversal of the query toward
the origin with the bound of the pool's modality (as in the evaluation).

`--index IDX` (an index of `python -m hysac_jax.index build`, embedded by
this model: another one is refused) answers `top_k` from the index instead,
each hit with the item's `unsafe` flag, after the `--traversal` (none,
release, geodesic) of the query, leaving out unsafe items with
`--safe-only`, by the `--backend` exact (default) or approx; the record's
`"index"` says which traversal and back-end answered.
`--redirect` also applies that traversal to the reported embedding and
distance (with the input's own modality when there is no pool).

`unsafe` uses the model's traversal alpha (in b'): an export's
`traversal_alpha` from `hysac_head.json`, a run's `config.eval.traversal_alpha`
(the alpha `eval.py` reports with), 0.8 for a converted model;
`--traversal-alpha` overrides it. Each record says which (`alpha`).

Exit codes (`hysac_jax.cli`): 0 every input answered; 3 partial: some inputs
(a missing, unreadable, truncated or oversized image, an empty caption) got
an `{"type", "input", "error"}` line, the others were answered; 1 a model,
bounds, pool or index that cannot be read (or an index of another model):
one `{"error": ..., "model", "pool" or "index": ...}` line on stdout and
one `python -m hysac_jax.predict: error: ...` line on stderr, nothing else;
2 bad command-line flags.
"""

import argparse
import dataclasses
import json
import math
import os
import sys
import zipfile

import jax.numpy as jnp
import numpy as np

from hysac_jax import checkpoint as ckpt_lib
from hysac_jax import cli
from hysac_jax import input_file
from hysac_jax import finite
from hysac_jax import index as index_lib
from hysac_jax import lorentz
from hysac_jax import safety
from hysac_jax import serving
from hysac_jax.data import preprocess
from hysac_jax.data.tokenizer import load_tokenizer, tokenize
from hysac_jax.evaluation import embed as embed_lib
from hysac_jax.formats import gallery
from hysac_jax.formats import torch_state

BATCH = 32
NO_BOUNDS_NOTE = ("no bounds: unsafe classification and traversal need the "
                  "bounds of the training run (bounds.json); pass --bounds "
                  "FILE")
NON_FINITE_ERROR = ("the model gave a non-finite embedding or distance from "
                    "the origin for this input (NaN or infinite weights?): "
                    "no verdict")
EUC_NOTE = ("a Euclidean-mode (euc) model has no distance-based safety: "
            "features are unit vectors")


class InputError(ValueError):
  """One input that cannot be answered (the others still are)."""


class PoolError(ValueError):
  """A --pool file that cannot be used."""


# --------------------------------------------------------------------------
# Inputs.


def read_image(path, image_size):
  """An image file -> (image_size, image_size, 3) float32 CLIP pixels.

  Raises:
    InputError: naming the file, for a missing, unreadable, truncated or
      oversized one (PIL's decompression-bomb limit, or a file over
      `input_file.MAX_IMAGE_BYTES`), or one that is no regular file (a FIFO,
      socket or device).
  """
  # PIL loads with the first image, not for text-only calls.
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    # Regular files only (a FIFO would block), at most MAX_IMAGE_BYTES.
    data = input_file.read_bytes(path, input_file.MAX_IMAGE_BYTES, "image")
    return preprocess.clip_preprocess(data, image_size)
  except (input_file.NotRegularFileError, input_file.FileTooLargeError) as e:
    raise InputError(str(e)) from None
  except FileNotFoundError:
    raise InputError(f"image file not found: {path}") from None
  except IsADirectoryError:
    raise InputError(f"image path is a directory: {path}") from None
  except (OSError, ValueError, SyntaxError, MemoryError,
          Image.DecompressionBombError) as e:
    # PIL decode errors; DecompressionBombError (more than twice PIL's pixel
    # limit) is no OSError.
    raise InputError(f"unreadable image {path}: {type(e).__name__}: "
                     f"{e}") from None


def check_text(text, context_length):
  """Validates a caption; returns (token ids (L,), truncated?).

  Raises:
    InputError: for an empty (or whitespace-only) caption.
  """
  if not text or not text.strip():
    raise InputError("empty text")
  n = len(load_tokenizer()(text)["input_ids"])
  return tokenize(text, max_len=context_length)[0], n > context_length


# --------------------------------------------------------------------------
# Pools.


@dataclasses.dataclass
class Pool:
  """Retrieval candidates: embeddings of one modality with labels.

  Attributes:
    embeddings: (N, D) float32 points of the model.
    labels: N strings (captions, or image names).
    modality: "text" or "image".
    curv: curvature of the model that embedded them (None if unknown).
  """
  embeddings: np.ndarray
  labels: list
  modality: str = "text"
  curv: float | None = None


def save_pool(pool, path):
  """Writes a pool as `.npz` (embeddings, labels, modality, curv)."""
  np.savez(path, embeddings=np.asarray(pool.embeddings, np.float32),
           labels=np.asarray(pool.labels, dtype=str),
           modality=np.asarray(pool.modality),
           curv=np.asarray(np.nan if pool.curv is None else pool.curv,
                           np.float64))


def load_pool(path, model):
  """A caption file (embedded now) or a saved `.npz` pool, checked against
  `model` (embedding width, curvature)."""
  if os.path.isdir(path):
    raise PoolError(f"pool {path} is a directory: expected a caption file "
                    "(one caption per line) or a .npz pool (--save-pool)")
  if not os.path.isfile(path):
    raise PoolError(f"pool file not found: {path}")
  if path.endswith(".npz"):
    if not zipfile.is_zipfile(path):
      raise PoolError(f"pool {path} is not a readable .npz: not a zip "
                      "archive (truncated, or not written by np.savez)")
    try:
      with np.load(path, allow_pickle=False) as z:
        missing = [k for k in ("embeddings", "labels", "modality")
                   if k not in z]
        if missing:
          raise PoolError(f"pool {path} lacks {missing} (has {sorted(z)})")
        curv = float(z["curv"]) if "curv" in z else math.nan
        pool = Pool(np.asarray(z["embeddings"], np.float32),
                    [str(s) for s in z["labels"]], str(z["modality"]),
                    None if math.isnan(curv) else curv)
    except PoolError:
      raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
      # A truncated or corrupt archive: BadZipFile is no OSError.
      raise PoolError(f"pool {path} is not a readable .npz: "
                      f"{type(e).__name__}: {e}") from None
    _check_pool(pool, model, path)
    return pool
  try:
    text = input_file.read_text(path, input_file.MAX_TEXT_BYTES, "pool")
  except OSError as e:
    raise PoolError(str(e)) from None
  except ValueError as e:
    raise PoolError(f"pool {path} is neither .npz nor UTF-8 text: "
                    f"{e}") from None
  captions = [line.strip() for line in text.splitlines() if line.strip()]
  if not captions:
    raise PoolError(f"pool {path} holds no captions")
  ids = tokenize(captions, max_len=model.context_length)
  emb = embed_lib.encode_batched(model.encode_text, ids, BATCH,
                                 desc="embedding pool")
  return Pool(emb, captions, "text", model.curv)


def _check_pool(pool, model, path):
  emb = pool.embeddings
  if emb.ndim != 2 or emb.shape[0] != len(pool.labels) or not len(emb):
    raise PoolError(f"pool {path}: embeddings {emb.shape} do not match "
                    f"{len(pool.labels)} labels")
  if pool.modality not in safety.SAFE_GROUP:
    raise PoolError(f"pool {path}: modality {pool.modality!r} is not "
                    "'text' or 'image'")
  if pool.curv is not None and not math.isclose(pool.curv, model.curv,
                                                rel_tol=1e-5):
    raise PoolError(f"pool {path} was embedded by another model (curv "
                    f"{pool.curv:.6g}, this model {model.curv:.6g})")


# --------------------------------------------------------------------------
# Answers.


def rank(queries, pool, curv, mode, k):
  """Top-k pool entries per query (ties: lower index first).

  Args:
    queries: (Q, D) points.
    pool: `Pool`.
    curv: curvature.
    mode: "hyp" (by −distance) or "euc" (by cosine).
    k: how many.

  Returns:
    Q lists of {"rank", "index", "label", "distance" or "similarity"}.
  """
  q = jnp.asarray(queries, jnp.float32)
  p = jnp.asarray(pool.embeddings, jnp.float32)
  if mode == "euc":
    score = np.asarray(q @ p.T)
    key = "similarity"
    value = score
  else:
    value = np.asarray(lorentz.pairwise_dist(q, p, curv))
    score, key = -value, "distance"
  order = np.argsort(-score, axis=1, kind="stable")[:, :k]
  return [[{"rank": r + 1, "index": int(i), "label": pool.labels[i],
            key: float(value[row, i])} for r, i in enumerate(idx)]
          for row, idx in enumerate(order)]


@dataclasses.dataclass
class IndexQuery:
  """Retrieval from a built index (`hysac_jax.index`).

  Attributes:
    index: `hysac_jax.index.Index`, checked against the model.
    traversal: "none", "release" or "geodesic".
    safe_only: leave out items flagged unsafe.
    backend: "exact" or "approx".
  """
  index: object
  traversal: str = "none"
  safe_only: bool = False
  backend: str = "exact"

  def hits(self, emb, top_k):
    """Q lists of `Index.search` records."""
    return self.index.search(emb, top_k, backend=self.backend,
                             traversal=self.traversal,
                             safe_only=self.safe_only)

  def describe(self):
    return {"traversal": self.traversal, "safe_only": self.safe_only,
            "backend": self.backend}


def answer(model, emb, modality, pool=None, top_k=5, redirect=False,
           embedding=False, index=None):
  """The JSON records of a batch of embeddings of one modality.

  Args:
    model: `serving.Model`.
    emb: (N, D) points of the inputs.
    modality: "image" or "text".
    pool: optional `Pool` for retrieval.
    top_k: retrievals per query.
    redirect: apply safety traversal to the reported embedding.
    embedding: include the embedding.
    index: optional `IndexQuery` (instead of `pool`).

  Returns:
    N dicts (without "type" / "input").
  """
  records = [{} for _ in range(len(emb))]
  dist = _verdicts(model, emb, modality, records)
  can_traverse = model.mode == "hyp" and model.bounds is not None
  target = pool.modality if pool is not None else modality
  traversed = model.traverse_to_safe(emb, target) if can_traverse else None
  shown = emb
  if redirect:
    shown = _redirected(model, emb, traversed, target, records)
  if embedding:
    for rec, e in zip(records, np.asarray(shown)):
      rec["embedding"] = [float(v) for v in e]
  # Fail closed: an input whose embedding or distance is not finite (NaN
  # weights, say) gets an error record, never a verdict or a retrieval.
  finite_rows = np.all(np.isfinite(np.asarray(emb)), axis=-1)
  if dist is not None:
    finite_rows &= np.isfinite(dist)
  for i in np.flatnonzero(~finite_rows):
    records[i] = {"error": NON_FINITE_ERROR}
  rows = np.flatnonzero(finite_rows)
  if index is not None and len(rows):
    for i, hits in zip(rows, index.hits(np.asarray(emb)[rows], top_k)):
      records[i].update(top_k=hits, index=index.describe())
  if pool is not None and len(rows):
    _rank_into(records, rows, model, emb, traversed, pool, top_k)
  return records


def _verdicts(model, emb, modality, records):
  """Fills each record's distance and unsafe verdict; returns the distances
  from the origin (None in "euc" mode)."""
  if model.mode != "hyp":
    for rec in records:
      rec.update(distance_from_origin=None, unsafe=None, unsafe_score=None,
                 note=EUC_NOTE)
    return None
  dist = np.asarray(safety.origin_distance(emb, model.curv))
  for rec, d in zip(records, dist):
    rec["distance_from_origin"] = float(d)
  if model.bounds is None:
    for rec in records:
      rec.update(unsafe=None, unsafe_score=None, note=NO_BOUNDS_NOTE)
    return dist
  unsafe, _ = model.classify_unsafe(emb, modality)
  threshold = model.threshold(modality)
  for rec, u, d in zip(records, unsafe, dist):
    rec.update(unsafe=bool(u), unsafe_score=float(d - threshold),
               threshold=threshold, alpha=model.traversal_alpha)
  return dist


def _redirected(model, emb, traversed, target, records):
  """Fills "redirected"; returns the embeddings to report (the traversed
  ones when traversal applies)."""
  if traversed is None:
    for rec in records:
      rec["redirected"] = None
    return emb
  moved = np.any(traversed != np.asarray(emb), axis=-1)
  new_dist = np.asarray(safety.origin_distance(traversed, model.curv))
  for rec, m, d in zip(records, moved, new_dist):
    rec["redirected"] = {"moved": bool(m), "bound_of": target,
                         "distance_from_origin": float(d)}
  return traversed


def _rank_into(records, rows, model, emb, traversed, pool, top_k):
  """Fills "top_k" (and "top_k_traversed") of the records `rows` from the
  in-memory pool."""
  emb = np.asarray(emb)[rows]
  for i, hits in zip(rows, rank(emb, pool, model.curv, model.mode, top_k)):
    records[i]["top_k"] = hits
  if traversed is None:
    for i in rows:
      records[i]["top_k_traversed"] = None
    return
  for i, hits in zip(rows, rank(np.asarray(traversed)[rows], pool,
                                model.curv, model.mode, top_k)):
    records[i]["top_k_traversed"] = hits


def predict(model, images=(), texts=(), pool=None, top_k=5, redirect=False,
            embedding=False, inputs=None, index=None):
  """Answers every input; bad ones get an "error" record.

  Args:
    model: `serving.Model`.
    images: image file paths.
    texts: captions.
    pool, top_k, redirect, embedding, index: as in `answer`.
    inputs: [("image" or "text", value), ...] in the order to answer;
      default the images, then the texts.

  Returns:
    A list of dicts, one per input in order, each with "type" and "input".
  """
  if inputs is None:
    inputs = [("image", i) for i in images] + [("text", t) for t in texts]
  records = [{"type": modality, "input": item} for modality, item in inputs]
  for modality in ("image", "text"):
    good, arrays = [], []
    for rec in records:
      if rec["type"] != modality:
        continue
      item = rec["input"]
      try:
        if modality == "image":
          arrays.append(read_image(item, model.image_size))
        else:
          ids, truncated = check_text(item, model.context_length)
          arrays.append(ids)
          if truncated:
            rec["truncated"] = True
        good.append(rec)
      except InputError as e:
        rec["error"] = str(e)
    if good:
      encode = model.encode_image if modality == "image" else (
          model.encode_text)
      emb = embed_lib.encode_batched(encode, np.stack(arrays), BATCH)
      for rec, extra in zip(good, answer(model, emb, modality, pool, top_k,
                                         redirect, embedding, index)):
        rec.update(extra)
  return records


# --------------------------------------------------------------------------
# CLI.


PROG = "python -m hysac_jax.predict"
# What `serving.load_model` raises for a model, --bounds or weights that
# cannot be read (OSError: a missing --bounds file, unreadable weights).
MODEL_ERRORS = (serving.ModelDirError, torch_state.StateDictError,
                ckpt_lib.CheckpointError, OSError, ValueError, KeyError)


def _fail(prog, message, **context):
  """A model, bounds or pool that cannot be read: one JSON error record on
  stdout (for the consumer of the JSON lines), one error line on stderr."""
  print(finite.dumps({"error": message, **context}), flush=True)
  return cli.fail(prog, message, cli.EXIT_ERROR)


class _InOrder(argparse.Action):
  """--image / --text values, kept in command-line order in `inputs`."""

  def __call__(self, parser, namespace, values, option_string=None):
    setattr(namespace, self.dest, getattr(namespace, self.dest) + values)
    namespace.inputs = (getattr(namespace, "inputs", None) or []) + [
        (self.dest, v) for v in values]


def _parser(prog=PROG):
  parser = argparse.ArgumentParser(
      prog=prog,
      description="Embed images and captions with a HySAC model; print one "
                  "JSON line per input (distance from the origin, unsafe "
                  "flag, optional embedding and retrievals).")
  parser.add_argument("--model", required=True,
                      help="export, training run or converted directory")
  parser.add_argument("--image", nargs="+", default=[], metavar="PATH",
                      action=_InOrder, help="image files (repeatable)")
  parser.add_argument("--text", nargs="+", default=[], metavar="TEXT",
                      action=_InOrder, help="captions (repeatable)")
  parser.add_argument("--traversal-alpha", type=float, default=None,
                      help="alpha of the unsafe threshold b' = b + "
                           "tanh((b - alpha)/c) + 1 (default: the model's "
                           "own: an export's traversal_alpha, a run's "
                           "config.eval.traversal_alpha, 0.8 for a "
                           "converted model)")
  parser.add_argument("--bounds", default=None,
                      help="bounds JSON (default: the model's own)")
  parser.add_argument("--checkpoint", default=ckpt_lib.BEST_RECALL,
                      choices=ckpt_lib.KINDS,
                      help="which checkpoint of a training run")
  parser.add_argument("--redirect", action="store_true",
                      help="apply safety traversal to the query")
  parser.add_argument("--pool", default=None,
                      help="captions (one per line) or a saved .npz pool")
  parser.add_argument("--save-pool", default=None, metavar="FILE.npz",
                      help="save the embedded --pool captions")
  parser.add_argument("--top-k", type=int, default=5,
                      help="how many --pool entries each input retrieves "
                           "(default 5)")
  parser.add_argument("--embedding", action="store_true",
                      help="print the embeddings")
  add_index_flags(parser, required=False)
  parser.set_defaults(inputs=[])
  return parser


def add_index_flags(parser, required):
  """--index, --traversal, --safe-only, --backend (predict and
  `python -m hysac_jax.index search`)."""
  parser.add_argument("--index", required=required, default=None,
                      help="an index of python -m hysac_jax.index build "
                           "(embedded by this model): answer top_k from it")
  parser.add_argument("--traversal", default="none",
                      choices=index_lib.TRAVERSALS,
                      help="with --index: move each query farther than b' "
                           "toward the origin first (default none)")
  parser.add_argument("--safe-only", action="store_true",
                      help="with --index: leave out items flagged unsafe")
  parser.add_argument("--backend", default="exact",
                      choices=index_lib.BACKENDS,
                      help="with --index: exact (JAX) or approx (FAISS)")


def check_alpha_flag(parser, alpha):
  """A usage error unless --traversal-alpha (when given) is finite."""
  if alpha is not None:
    try:
      finite.check_number(alpha, "", "--traversal-alpha")
    except finite.NonFiniteError as e:
      parser.error(str(e))


def open_index(args, model):
  """The `IndexQuery` of --index, checked against `model`.

  Raises:
    gallery.GalleryError, index.SearchError: naming the index.
  """
  index = index_lib.open(args.index, load_approx=args.backend == "approx")
  index.check_model(model)
  index.check_options(args.traversal, args.safe_only)
  if args.backend == "approx":
    index.backend("approx")  # an index without one fails here, not later
  return IndexQuery(index, args.traversal, args.safe_only, args.backend)


def main(argv=None, prog=PROG):
  """The CLI; `prog` names it in error lines (`python -m hysac_jax.index
  search` runs it too)."""
  parser = _parser(prog)
  args = parser.parse_args(argv)
  if args.top_k < 1:
    parser.error("--top-k must be at least 1")
  check_alpha_flag(parser, args.traversal_alpha)
  if not args.image and not args.text and not args.save_pool:
    parser.error("nothing to do: give --image and/or --text")
  if args.save_pool and not args.pool:
    parser.error("--save-pool needs --pool CAPTIONS.txt")
  if args.index and args.pool:
    parser.error("give --pool or --index, not both")
  if not args.index and (args.traversal != "none" or args.safe_only or
                         args.backend != "exact"):
    parser.error("--traversal, --safe-only and --backend need --index")
  try:
    model = serving.load_model(args.model, bounds_path=args.bounds,
                               checkpoint=args.checkpoint,
                               traversal_alpha=args.traversal_alpha)
  except MODEL_ERRORS as e:
    return _fail(prog, str(e), model=args.model)
  pool = None
  if args.pool:
    try:
      pool = load_pool(args.pool, model)
    except PoolError as e:
      return _fail(prog, str(e), pool=args.pool)
    if args.save_pool:
      try:
        save_pool(pool, args.save_pool)
      except OSError as e:
        return _fail(prog, f"cannot write --save-pool {args.save_pool}: {e}",
                     pool=args.save_pool)
      print(f"saved pool of {len(pool.labels)} to {args.save_pool}",
            file=sys.stderr)
  index = None
  if args.index:
    try:
      index = open_index(args, model)
    except (gallery.GalleryError, index_lib.SearchError,
            finite.NonFiniteError) as e:
      return _fail(prog, str(e), index=args.index)
  records = predict(model, pool=pool, top_k=args.top_k,
                    redirect=args.redirect, embedding=args.embedding,
                    inputs=args.inputs, index=index)
  for rec in records:
    print(finite.dumps(rec))
  return cli.EXIT_PARTIAL if any("error" in r for r in records) else (
      cli.EXIT_OK)


if __name__ == "__main__":
  sys.exit(main())
