"""COCO-style caption files for image–caption retrieval.

Two layouts are read:

- **Karpathy split JSON** (`dataset_coco.json`, `dataset_flickr30k.json`):
  `{"images": [{"filepath"?, "filename", "split", "sentences": [{"raw"}]}]}`.
  Images of one split are kept ("test" by default; the file's "val" is
  asked for as "val" or "validation"). Image paths are
  `IMAGES/filepath/filename`, IMAGES defaulting to the JSON's directory.
- **COCO annotations** (`annotations/captions_val2017.json`):
  `{"images": [{"id", "file_name"}], "annotations": [{"image_id",
  "caption"}]}`, every image with at least one caption; paths are
  `IMAGES/file_name`, IMAGES defaulting to `<json dir>/../val2017` (the
  name after `captions_`).
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
from tqdm import tqdm

from hysac_jax import input_file

# Lists of up to this many entries (images or annotations) are checked
# without a progress bar: they take well under a second.
QUIET_ENTRIES = 10_000


@dataclasses.dataclass
class CaptionSet:
  """Images with their captions.

  Attributes:
    name: the caption file.
    image_paths: N image files.
    captions: M caption strings.
    caption_image: (M,) int64 index of each caption's image.
  """
  name: str
  image_paths: list[str]
  captions: list[str]
  caption_image: np.ndarray


def _load_json(path):
  # Regular files only (a FIFO would block), at most MAX_TEXT_BYTES.
  try:
    text = input_file.read_text(path, input_file.MAX_TEXT_BYTES,
                                "caption file")
  except (input_file.NotRegularFileError, input_file.FileTooLargeError,
          IsADirectoryError) as e:
    raise ValueError(str(e)) from None
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"caption file {path} is not valid JSON: {e}") from None


def _entries(items, path, what):
  """`items` (a list), with a tqdm bar on stderr when there are more than
  `QUIET_ENTRIES` of them."""
  return tqdm(items, desc=f"checking {what} of {os.path.basename(path)}",
              unit=" entries", leave=False,
              disable=len(items) <= QUIET_ENTRIES)


def _caption_text(value, path, entry, field):
  """A caption string, stripped; ValueError naming the entry and field for
  anything else (null or a number would become the text "None" / "12345")."""
  if not isinstance(value, str):
    raise ValueError(f"caption file {path}: {entry}.{field} must be a "
                     f"string, got {type(value).__name__} {value!r:.40}")
  return value.strip()


def _karpathy(data, path, images_dir, split):
  wanted = {"validation": "val"}.get(split, split)
  images_dir = images_dir or os.path.dirname(path)
  image_paths, captions, owner = [], [], []
  for i, image in enumerate(_entries(data["images"], path, "images")):
    if not isinstance(image, dict):
      raise ValueError(f"caption file {path}: images[{i}] must be an object, "
                       f"got {type(image).__name__}")
    if image.get("split") != wanted:
      continue
    if "filename" not in image or "sentences" not in image:
      raise ValueError(f"caption file {path}: images[{i}] lacks 'filename' "
                       "or 'sentences'")
    if not isinstance(image["sentences"], list):
      raise ValueError(f"caption file {path}: images[{i}].sentences must be "
                       "a list of {\"raw\": ...} objects")
    texts = []
    for j, sentence in enumerate(image["sentences"]):
      entry = f"images[{i}].sentences[{j}]"
      if not isinstance(sentence, dict) or "raw" not in sentence:
        raise ValueError(f"caption file {path}: {entry} must be an object "
                         f"with a 'raw' caption, got {sentence!r:.40}")
      text = _caption_text(sentence["raw"], path, entry, "raw")
      if text:
        texts.append(text)
    if not texts:
      continue
    owner += [len(image_paths)] * len(texts)
    captions += texts
    image_paths.append(os.path.join(images_dir, str(image.get("filepath", "")),
                                    str(image["filename"])))
  if not image_paths:
    splits = sorted({str(im.get("split")) for im in data["images"]})
    raise ValueError(f"caption file {path} has no captioned image in split "
                     f"{wanted!r} (its splits: {splits})")
  return image_paths, captions, owner


def _coco(data, path, images_dir):
  if images_dir is None:
    stem = os.path.splitext(os.path.basename(path))[0]
    images_dir = os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(path))), stem.replace("captions_", "", 1))
  if "annotations" not in data:
    raise ValueError(f"caption file {path} has 'images' but no "
                     "'annotations'")
  files = {}
  for i, image in enumerate(_entries(data["images"], path, "images")):
    if not isinstance(image, dict) or "id" not in image or (
        "file_name" not in image):
      raise ValueError(f"caption file {path}: images[{i}] lacks 'id' or "
                       "'file_name'")
    if image["id"] in files:
      # Overwriting would silently drop an image and pair its captions
      # with the other file.
      raise ValueError(f"caption file {path}: images[{i}].id "
                       f"{image['id']!r} is listed twice")
    files[image["id"]] = image["file_name"]
  by_image = {}
  if not isinstance(data["annotations"], list):
    raise ValueError(f"caption file {path}: 'annotations' must be a list")
  for i, ann in enumerate(_entries(data["annotations"], path,
                                   "annotations")):
    if not isinstance(ann, dict):
      raise ValueError(f"caption file {path}: annotations[{i}] must be an "
                       f"object, got {type(ann).__name__}")
    if ann.get("image_id") not in files:
      raise ValueError(f"caption file {path}: annotations[{i}] refers to "
                       f"unknown image_id {ann.get('image_id')!r}")
    text = _caption_text(ann.get("caption"), path, f"annotations[{i}]",
                         "caption")
    if text:
      by_image.setdefault(ann["image_id"], []).append(text)
  image_paths, captions, owner = [], [], []
  for image_id, file_name in files.items():
    if image_id not in by_image:
      continue
    owner += [len(image_paths)] * len(by_image[image_id])
    captions += by_image[image_id]
    image_paths.append(os.path.join(images_dir, file_name))
  if not image_paths:
    raise ValueError(f"caption file {path} has no captioned image")
  return image_paths, captions, owner


def read_captions(path, images_dir=None, split="test") -> CaptionSet:
  """Reads a Karpathy-split or a COCO annotations caption JSON.

  Args:
    path: the JSON file.
    images_dir: where the images are (module docstring for defaults).
    split: the Karpathy split to keep (ignored for COCO annotations).

  Raises:
    FileNotFoundError: a missing file; ValueError: a file of neither
    layout, one without a captioned image, an entry of the wrong type (a
    caption that is no string, an image that is no object), an image id
    listed twice, a file that is no regular file or is over
    `input_file.MAX_TEXT_BYTES` (each naming the file, the entry and the
    field).
  """
  path = os.path.expanduser(os.fspath(path))
  images_dir = os.path.expanduser(images_dir) if images_dir else None
  data = _load_json(path)
  if not isinstance(data, dict) or not isinstance(data.get("images"), list):
    raise ValueError(f"caption file {path} is neither a Karpathy split JSON "
                     "nor COCO annotations: no 'images' list")
  first = next((im for im in data["images"] if isinstance(im, dict)), {})
  if "sentences" in first:
    image_paths, captions, owner = _karpathy(data, path, images_dir, split)
  else:
    image_paths, captions, owner = _coco(data, path, images_dir)
  return CaptionSet(path, image_paths, captions,
                    np.asarray(owner, np.int64))
