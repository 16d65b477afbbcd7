"""The on-disk layout of a gallery index (`python -m hysac_jax.index build`).

    IDX/
      manifest.json       written last: what the index holds (below)
      shard-00000.npz     items 0 .. S-1 of the source, embedded
      shard-00001.npz     ...
      approx.faiss        the approximate back-end's structure (optional)

A shard is an `.npz` with `points` float32 (n, d) (space components on the
hyperboloid), `labels` str (n,) (image paths or captions), `distance`
float32 (n,) (from the origin), `unsafe` int8 (n,) (1 unsafe, 0 safe, -1
unknown: no bounds) and `skipped` str (k,) (one message per unreadable
source item). The manifest:

    {"format": "hysac_jax.index", "version": 1, "modality": "image",
     "count": N, "dim": d, "model": {"fingerprint": ..., "curv": ...,
     "threshold": b' or null, ...}, "source": {...},
     "shards": [{"file": "shard-00000.npz", "count": n}, ...],
     "skipped": [...], "approx": {"kind": "ivf", ...} or null}

A build writes into the sibling `.IDX.building/` (with `progress.json`,
the manifest's model and source, so a rerun can resume only the same
build) and renames it to `IDX` when complete, so an index is whole or
absent. Every read names the file that fails (`GalleryError`); zip CRCs
catch a corrupt shard's bytes.
"""

import json
import os
import re
import shutil
import zipfile

import numpy as np

from hysac_jax import finite

FORMAT = "hysac_jax.index"
VERSION = 1
MANIFEST = "manifest.json"
PROGRESS = "progress.json"
APPROX_FILE = "approx.faiss"
SHARD_KEYS = ("points", "labels", "distance", "unsafe", "skipped")
UNKNOWN, SAFE, UNSAFE = -1, 0, 1
_SHARD = re.compile(r"shard-(\d{5})\.npz")


class GalleryError(ValueError):
  """An index directory or file that cannot be used; names it."""


def shard_name(i):
  """The file name of shard `i`."""
  return f"shard-{i:05d}.npz"


def building_dir(final):
  """The sibling directory a build of `final` writes into."""
  parent, name = os.path.split(os.path.abspath(final))
  return os.path.join(parent, f".{name}.building")


def _write_json(path, obj):
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    finite.dump(obj, f, indent=1)
    f.write("\n")
  os.replace(tmp, path)


def _read_json(path, what):
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise GalleryError(f"{what} {path} is missing") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise GalleryError(f"{what} {path} is not valid JSON: {e}") from None


def begin(final, progress):
  """Starts or resumes the build of `final`; returns its building dir.

  Args:
    final: the index directory to be.
    progress: JSON-able dict describing the build (model fingerprint,
      source, shard size): a partial build is resumed only if its own
      `progress.json` is equal.

  Raises:
    GalleryError: a partial build of another model or source is there.
  """
  work = building_dir(final)
  path = os.path.join(work, PROGRESS)
  if os.path.isdir(work) and os.path.isfile(path):
    before = _read_json(path, "build progress")
    if before != json.loads(finite.dumps(progress)):
      after = json.loads(finite.dumps(progress))
      differ = [k for k in list(after) + sorted(set(before) - set(after))
                if before.get(k) != after.get(k)]
      raise GalleryError(
          f"a partial build at {work} was started with another "
          f"{', '.join(differ)}: rerun that build, or remove {work} to "
          "start afresh")
    return work
  if os.path.isdir(work):  # killed before progress.json: nothing to keep
    shutil.rmtree(work)
  os.makedirs(work)
  _write_json(path, progress)
  return work


def done_shards(work):
  """The shard indices already written in a building dir (complete files
  only: a shard is renamed into place when written)."""
  return sorted(int(m.group(1)) for m in map(_SHARD.fullmatch,
                                              os.listdir(work)) if m)


def write_shard(work, i, points, labels, distance, unsafe, skipped):
  """Writes shard `i` atomically (a temporary file, then renamed)."""
  path = os.path.join(work, shard_name(i))
  # A write killed midway leaves only this, which `done_shards` ignores.
  tmp = os.path.join(work, f".{shard_name(i)}.tmp.npz")
  np.savez(tmp, points=np.asarray(points, np.float32),
           labels=np.asarray(list(labels), dtype=str),
           distance=np.asarray(distance, np.float32),
           unsafe=np.asarray(unsafe, np.int8),
           skipped=np.asarray(list(skipped), dtype=str))
  os.replace(tmp, path)


def read_shard(path, dim=None):
  """A shard as a dict of `SHARD_KEYS` arrays.

  Raises:
    GalleryError: "shard PATH is corrupt: ..." for a missing, truncated or
      damaged file, a missing array or arrays of mismatched shapes.
  """
  where = f"shard {path}"
  if not os.path.isfile(path):
    raise GalleryError(f"{where} is missing")
  try:
    with np.load(path, allow_pickle=False) as z:
      missing = [k for k in SHARD_KEYS if k not in z]
      if missing:
        raise GalleryError(f"{where} is corrupt: lacks {missing}")
      shard = {k: np.asarray(z[k]) for k in SHARD_KEYS}
  except GalleryError:
    raise
  except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
    raise GalleryError(f"{where} is corrupt: {type(e).__name__}: "
                       f"{' '.join(str(e).split())}") from None
  n = len(shard["labels"])
  points = shard["points"]
  if (points.ndim != 2 or len(points) != n or len(shard["distance"]) != n
      or len(shard["unsafe"]) != n or (dim is not None and n
                                       and points.shape[1] != dim)):
    raise GalleryError(f"{where} is corrupt: points {points.shape}, "
                       f"{n} labels, {len(shard['distance'])} distances, "
                       f"{len(shard['unsafe'])} flags (dim {dim})")
  return shard


def finalize(work, final, manifest):
  """Writes `manifest.json` in `work` and renames `work` to `final`."""
  os.remove(os.path.join(work, PROGRESS))
  _write_json(os.path.join(work, MANIFEST),
              {"format": FORMAT, "version": VERSION, **manifest})
  if os.path.lexists(final):  # an --overwrite: the old index goes last
    old = final.rstrip(os.sep) + ".replaced"
    os.rename(final, old)
    os.rename(work, final)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.rename(work, final)


def read_manifest(directory):
  """The manifest of an index directory, checked.

  Raises:
    GalleryError: naming the directory or the manifest and what is wrong.
  """
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    what = "a file" if os.path.exists(directory) else "missing"
    hint = ""
    if os.path.isdir(building_dir(directory)):
      hint = (f" (a build is unfinished in {building_dir(directory)}: "
              "rerun it to resume)")
    raise GalleryError(f"index {directory} is {what}: expected a directory "
                       f"written by python -m hysac_jax.index build{hint}")
  path = os.path.join(directory, MANIFEST)
  if not os.path.isfile(path):
    raise GalleryError(f"index {directory} has no {MANIFEST}: not an index "
                       "written by python -m hysac_jax.index build")
  manifest = _read_json(path, "index manifest")
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    raise GalleryError(f"{path} is not a {FORMAT} manifest")
  if manifest.get("version") != VERSION:
    raise GalleryError(f"{path}: version {manifest.get('version')!r}, this "
                       f"code reads version {VERSION}")
  for key in ("modality", "count", "dim", "model", "shards"):
    if key not in manifest:
      raise GalleryError(f"{path} lacks {key!r}")
  finite.check_number(manifest["model"].get("curv"), path, "model.curv",
                      positive=True)
  threshold = manifest["model"].get("threshold")
  if threshold is not None:
    finite.check_number(threshold, path, "model.threshold")
  return manifest


def read_items(directory, manifest):
  """Every shard of an index, concatenated and checked against the manifest.

  Returns:
    dict of `points` (N, d) float32, `labels` (N,) str, `distance` (N,)
    float32, `unsafe` (N,) int8.
  """
  parts = []
  for entry in manifest["shards"]:
    path = os.path.join(directory, entry["file"])
    shard = read_shard(path, manifest["dim"])
    if len(shard["labels"]) != entry["count"]:
      raise GalleryError(f"shard {path} is corrupt: {len(shard['labels'])} "
                         f"items, the manifest says {entry['count']}")
    if not len(shard["labels"]):  # all its items unreadable: (0, 0) points
      shard["points"] = np.zeros((0, manifest["dim"]), np.float32)
    # Fail closed: a NaN point or distance would rank or flag at random.
    for key in ("points", "distance"):
      try:
        finite.check_finite_array(shard[key], f"shard {path}", key)
      except finite.NonFiniteError as e:
        raise GalleryError(f"{e} (corrupt)") from None
    parts.append(shard)
  keys = ("points", "labels", "distance", "unsafe")
  if not parts:
    raise GalleryError(f"index {directory} holds no shard")
  items = {k: np.concatenate([p[k] for p in parts]) for k in keys}
  if len(items["labels"]) != manifest["count"]:
    raise GalleryError(f"index {directory}: {len(items['labels'])} items in "
                       f"its shards, the manifest says {manifest['count']}")
  return items
