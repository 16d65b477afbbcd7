"""Embedding a gallery into an index directory, shard by shard, resumably.

A gallery is one modality: the image files under a directory (recursively,
`labelled_images.IMAGE_EXTENSIONS`, sorted by path), a TFDS image dataset
(a name or a prepared directory, one split), or a caption file (one caption
a line, blank lines skipped). Its items are cut into shards of
`shard_size` source items; each shard is embedded with the serving model
(every local device), flagged at the model's b' of the modality and written
as soon as it is done (`gallery.write_shard`). A rerun of the same build
(same model, source and shard size) skips the shards already written. The
index appears, with its FAISS structure, only when every shard is there.

Unreadable images are skipped and listed (in their shard, then in the
manifest's `skipped`), as `--skip_unreadable` does in eval.py. A
non-finite embedding or distance stops the build (fail closed): no item
gets a verdict it was not computed for.
"""

import hashlib
import os
import sys

import numpy as np
from tqdm import tqdm

from hysac_jax import finite
from hysac_jax import input_file
from hysac_jax import outdir
from hysac_jax import safety
from hysac_jax.data import labelled_images
from hysac_jax.evaluation import embed as embed_lib
from hysac_jax.formats import gallery
from hysac_jax.index import backends
from hysac_jax import index as index_lib

SHARD_SIZE = 2048


class BuildError(ValueError):
  """A gallery source or build that cannot be used; names it."""


def image_files(root):
  """The image files under `root` (recursively, hidden ones left out),
  sorted by path.

  Raises:
    BuildError: root is no directory or holds no image.
  """
  if not os.path.isdir(root):
    raise BuildError(f"--images {root}: no such directory (or TFDS "
                     "dataset)")
  found = sorted(
      os.path.join(d, f) for d, dirs, files in os.walk(root)
      for f in files if f.lower().endswith(labelled_images.IMAGE_EXTENSIONS)
      and not f.startswith(".") and not any(
          p.startswith(".") for p in os.path.relpath(d, root).split(os.sep)
          if p != "."))
  if not found:
    raise BuildError(f"--images {root} holds no image file "
                     f"({', '.join(labelled_images.IMAGE_EXTENSIONS)})")
  return found


def image_source(images, split="test"):
  """`images` as an `ImageSet`: a directory of files, else a TFDS dataset
  (a prepared dataset directory or a registered name) and its split."""
  if os.path.isdir(images) and not labelled_images.is_tfds_dir(images):
    paths = image_files(images)
    return labelled_images.ImageSet(
        images, ["image"], np.zeros(len(paths), np.int64), paths,
        lambda i: labelled_images.read_file(paths[i]))
  if os.path.exists(images) and not os.path.isdir(images):
    raise BuildError(f"--images {images} is a file: expected a directory "
                     "of images or a TFDS dataset")
  if not os.path.exists(images) and (os.sep in images or
                                     images.startswith(".")):
    raise BuildError(f"--images {images}: no such directory")
  try:
    return labelled_images.from_tfds(images, split)
  except ValueError as e:
    raise BuildError(f"--images {images}: neither a directory of images "
                     f"nor a usable TFDS dataset: {e}") from None


def caption_source(path):
  """The captions of a file, one a line (blank lines skipped)."""
  try:
    text = input_file.read_text(path, input_file.MAX_TEXT_BYTES,
                                "caption file")
  except FileNotFoundError:
    raise BuildError(f"--captions {path}: no such file") from None
  except (OSError, ValueError) as e:
    raise BuildError(f"--captions {path}: {e}") from None
  captions = [line.strip() for line in text.splitlines() if line.strip()]
  if not captions:
    raise BuildError(f"--captions {path} holds no caption")
  return captions


def _digest(labels):
  h = hashlib.sha256()
  for label in labels:
    h.update(label.encode("utf-8", "surrogateescape") + b"\0")
  return h.hexdigest()[:16]


def _embed_shard(model, modality, source, start, stop):
  """(points, labels, skipped) of source items [start, stop)."""
  if modality == "text":
    texts = source[start:stop]
    return embed_lib.embed_texts(model, texts), texts, []
  subset = source.subset(range(start, stop))
  try:
    points, kept, skipped = embed_lib.embed_images(
        model, subset, desc=None, skip_unreadable=True)
  except ValueError as e:  # every image of the shard is unreadable
    if not str(e).startswith("no readable image"):
      raise
    return (np.zeros((0, 0), np.float32), [],
            _errors(subset, model.image_size))
  return points, [subset.item_names[i] for i in kept], skipped


def _errors(image_set, image_size):
  errors = []
  for i in range(len(image_set)):
    try:
      image_set.load(i, image_size)
    except labelled_images.UnreadableImage as e:
      errors.append(str(e))
  return errors


def _flags(model, points, modality, labels, threshold):
  """(distance, unsafe int8) of a shard; raises on a non-finite one."""
  if not len(labels):  # every source item of the shard was unreadable
    return np.zeros(0, np.float32), np.zeros(0, np.int8)
  distance = np.asarray(safety.origin_distance(points, model.curv))
  bad = np.flatnonzero(~(np.all(np.isfinite(points), axis=1)
                         & np.isfinite(distance)))
  if len(bad):
    raise BuildError(f"the model gave a non-finite embedding or distance "
                     f"for {labels[bad[0]]} ({len(bad)} such in its shard; "
                     "NaN or infinite weights?): no verdict, no index")
  if threshold is None:
    return distance, np.full(len(points), gallery.UNKNOWN, np.int8)
  return distance, np.asarray(safety.unsafe_at(distance, threshold), np.int8)


def build(model, out, *, images=None, captions=None, split="test",
          shard_size=SHARD_SIZE, approx="auto", overwrite=False,
          on_shard=None, progress_bar=True, build_args=None):
  """Builds (or resumes building) the index `out` of a gallery.

  Args:
    model: `serving.Model` ("hyp" mode).
    out: the index directory to write.
    images: a directory of images, or a TFDS dataset name or directory.
    captions: a caption file (instead of `images`).
    split: the TFDS split.
    shard_size: source items per shard.
    approx: the FAISS structure ("auto", "hnsw", "ivf") or "none".
    overwrite: replace an existing index at `out`.
    on_shard: called with the shard number after each shard is written
      (progress hooks, tests).
    progress_bar: show a tqdm bar on stderr.
    build_args: how the model was loaded ({"model": path, "bounds",
      "traversal_alpha", "checkpoint"}), recorded so that a search can
      load it again.

  Returns:
    The manifest written.

  Raises:
    BuildError, gallery.GalleryError, outdir.OutputExistsError: naming the
      source, the output or the partial build at fault.
  """
  _check_build_args(model, images, captions, shard_size, approx)
  outdir.check(out, overwrite, "--out")
  modality, source, names, described = _gallery_source(images, captions,
                                                       split)
  record = index_lib.model_record(model, modality)
  described.update(count=len(names), digest=_digest(names))
  work = gallery.begin(out, {"model": record["fingerprint"],
                             "threshold": record["threshold"],
                             "modality": modality, "source": described,
                             "shard_size": shard_size})
  n_shards = -(-len(names) // shard_size)
  done = set(gallery.done_shards(work))
  kept = sum(min(shard_size, len(names) - i * shard_size) for i in done
             if i < n_shards)
  # `initial`: the resumed shards count as done, not in the rate.
  with tqdm(total=len(names), initial=kept, desc=f"indexing {modality}s",
            file=sys.stderr, disable=not progress_bar, unit=modality) as bar:
    for i in range(n_shards):
      if i in done:
        continue
      start, stop = i * shard_size, min((i + 1) * shard_size, len(names))
      points, labels, skipped = _embed_shard(model, modality, source, start,
                                             stop)
      if not len(labels):
        points = np.zeros((0, 0), np.float32)
      distance, unsafe = _flags(model, points, modality, labels,
                                record["threshold"])
      gallery.write_shard(work, i, points, labels, distance, unsafe, skipped)
      bar.update(stop - start)
      if on_shard is not None:
        on_shard(i)
  return _finish(work, out, modality, record, described, n_shards, approx,
                 build_args)


def _check_build_args(model, images, captions, shard_size, approx):
  """Raises BuildError naming the flag a build cannot start with."""
  if (images is None) == (captions is None):
    raise BuildError("give exactly one of --images and --captions")
  if model.mode != "hyp":
    raise BuildError("a Euclidean-mode (euc) model has no Lorentz distance "
                     "to index")
  if shard_size < 1:
    raise BuildError(f"--shard-size {shard_size}: expected at least 1")
  if approx not in backends.APPROX_KINDS:
    raise BuildError(f"--approx {approx!r}: expected one of "
                     f"{backends.APPROX_KINDS}")


def _gallery_source(images, captions, split):
  """(modality, source, item names, the source as the manifest records
  it)."""
  if images is None:
    source = caption_source(captions)
    return "text", source, source, {"captions": os.path.abspath(captions)}
  source = image_source(images, split)
  described = {"images": os.path.abspath(images) if os.path.exists(images)
               else images, "split": None if os.path.isdir(images) and
               not labelled_images.is_tfds_dir(images) else split}
  return "image", source, source.item_names, described


def _finish(work, out, modality, record, described, n_shards, approx,
            build_args):
  """Checks the shards, builds the FAISS structure, writes the manifest and
  moves the index into place."""
  shards, skipped, dim = [], [], None
  parts = []
  for i in range(n_shards):
    shard = gallery.read_shard(os.path.join(work, gallery.shard_name(i)))
    n = len(shard["labels"])
    if n:
      if dim is not None and shard["points"].shape[1] != dim:
        raise gallery.GalleryError(
            f"shard {gallery.shard_name(i)} in {work} has dimension "
            f"{shard['points'].shape[1]}, the others {dim}")
      dim = shard["points"].shape[1]
      parts.append(shard["points"])
    shards.append({"file": gallery.shard_name(i), "count": n})
    skipped += [str(s) for s in shard["skipped"]]
  if not parts:
    raise BuildError(f"no readable item among {described['count']} "
                     f"({len(skipped)} skipped; the first: "
                     f"{skipped[0] if skipped else '-'})")
  params = None
  if approx != "none":
    import faiss  # pylint: disable=g-import-not-at-top  # optional dependency
    points = np.concatenate(parts)
    kind = backends.choose_kind(len(points), approx)
    print(f"building the approximate index ({kind}) over {len(points)} "
          "items", file=sys.stderr, flush=True)
    structure, params = backends.build_faiss(points, record["curv"], approx)
    faiss.write_index(structure, os.path.join(work, gallery.APPROX_FILE))
  manifest = {"modality": modality, "count": sum(s["count"] for s in shards),
              "dim": dim, "model": record, "source": described,
              "shards": shards, "skipped": skipped, "approx": params,
              "build_args": build_args}
  gallery.finalize(work, out, manifest)
  if skipped:
    print(f"note: skipped {len(skipped)} unreadable item(s), listed in "
          f"{os.path.join(out, gallery.MANIFEST)} (skipped); the first: "
          f"{skipped[0]}", file=sys.stderr, flush=True)
  return finite.to_json_safe(manifest)
