"""Labelled image sets for zero-shot classification and unsafe detection.

An `ImageSet` is a list of images with integer labels and class names; its
images are decoded one at a time (`load(i)`), so a set of any size is read
lazily. Sources:

- `from_folder(root)`: an image-folder tree `root/<class>/*.jpg|png|...`,
  classes in sorted folder order;
- `from_tfds(name_or_dir, split)`: any TFDS image-classification dataset with
  an `image` and a `label` (ClassLabel) feature, read with
  `builder.as_data_source()` (random access over array_record files; no
  TensorFlow). Class names come from `info.features["label"].names`;
- `from_synthetic(attribute, ...)`: the classification view of the embedded
  synthetic ViSU set (`synthetic.classification_view`).

Errors name what is wrong: a dataset without a `label` feature, an empty
class folder, an unreadable image (`UnreadableImage`, with its name).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence

import numpy as np

from hysac_jax import input_file

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif",
                    ".tiff")


class UnreadableImage(ValueError):
  """An image that cannot be decoded; the message names it."""


@dataclasses.dataclass
class ImageSet:
  """Images with labels, decoded on demand.

  Attributes:
    name: what the set is (a path or a dataset name), for messages.
    class_names: C names; label i is `class_names[i]`.
    labels: (N,) int64 labels.
    item_names: N names of the images (file paths, or "split[i]").
    read: i -> uint8 (H, W, 3) array or encoded bytes; may raise
      `UnreadableImage`.
    tfds_name: the TFDS builder name ("cifar10") for a TFDS set, else None.
  """
  name: str
  class_names: list[str]
  labels: np.ndarray
  item_names: list[str]
  read: Callable[[int], object]
  tfds_name: str | None = None

  def __len__(self):
    return len(self.labels)

  def load(self, i, image_size):
    """Image i as CLIP pixels: float32 (image_size, image_size, 3).

    Raises:
      UnreadableImage: naming the image.
    """
    # PIL and preprocessing load with the first image read, not on import.
    from PIL import Image  # pylint: disable=g-import-not-at-top
    from hysac_jax.data import preprocess  # pylint: disable=g-import-not-at-top
    try:
      image = self.read(i)
      if isinstance(image, np.ndarray):
        image = _rgb(image)
      return preprocess.clip_preprocess(image, image_size)
    except UnreadableImage:
      raise
    except (OSError, ValueError, SyntaxError, MemoryError,
            Image.DecompressionBombError) as e:
      raise UnreadableImage(f"unreadable image {self.item_names[i]}: "
                            f"{type(e).__name__}: {e}") from None

  def subset(self, indices: Sequence[int]) -> "ImageSet":
    """The images at `indices`, in that order (same classes)."""
    indices = list(indices)
    read = self.read
    return ImageSet(self.name, self.class_names, self.labels[indices],
                    [self.item_names[i] for i in indices],
                    lambda j: read(indices[j]), self.tfds_name)


def _rgb(pixels):
  """uint8 (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) -> (H, W, 3)."""
  pixels = np.asarray(pixels)
  if pixels.ndim == 2:
    pixels = pixels[..., None]
  if pixels.ndim != 3 or pixels.shape[-1] not in (1, 3, 4):
    raise ValueError(f"expected an (H, W, C) image, got shape {pixels.shape}")
  if pixels.shape[-1] == 1:
    pixels = np.repeat(pixels, 3, axis=-1)
  return np.asarray(pixels[..., :3], np.uint8)


def read_file(path):
  """The bytes of an image file; `UnreadableImage` naming it if it cannot
  be read, is no regular file (a FIFO would block) or is over
  `input_file.MAX_IMAGE_BYTES`."""
  try:
    return input_file.read_bytes(path, input_file.MAX_IMAGE_BYTES, "image")
  except (input_file.NotRegularFileError, input_file.FileTooLargeError) as e:
    raise UnreadableImage(f"unreadable image {path}: {e}") from None
  except OSError as e:
    raise UnreadableImage(f"unreadable image {path}: {type(e).__name__}: "
                          f"{e.strerror or e}") from None


def from_folder(root, classes: Sequence[str] | None = None) -> ImageSet:
  """An image-folder tree: `root/<class>/<image>` (recursively within class).

  Args:
    root: the directory.
    classes: the expected class folders in label order (e.g. ("safe",
      "unsafe")); default every sub-folder, sorted.

  Raises:
    FileNotFoundError: root or an expected class folder is missing.
    ValueError: no class folder, a class folder without images, or (with
      `classes`) a folder beside the expected ones.
  """
  root = os.path.abspath(os.path.expanduser(os.fspath(root)))
  if not os.path.isdir(root):
    raise FileNotFoundError(f"image folder {root} does not exist")
  if classes is None:
    classes = sorted(d for d in os.listdir(root)
                     if os.path.isdir(os.path.join(root, d))
                     and not d.startswith("."))
    if not classes:
      raise ValueError(f"image folder {root} has no class sub-folders "
                       "(expected ROOT/<class>/*.jpg)")
  else:
    for name in classes:  # a missing expected folder is named first
      if not os.path.isdir(os.path.join(root, name)):
        raise FileNotFoundError(
            f"class folder {os.path.join(root, name)} does not exist")
    # A folder beside the expected ones would be silently left out.
    extra = sorted(d for d in os.listdir(root)
                   if os.path.isdir(os.path.join(root, d))
                   and not d.startswith(".") and d not in classes)
    if extra:
      raise ValueError(f"image folder {root} holds {extra[0]}/ beside the "
                       f"expected class folders {', '.join(classes)}: "
                       "remove or move it")
  paths, labels = [], []
  for label, name in enumerate(classes):
    folder = os.path.join(root, name)
    if not os.path.isdir(folder):
      raise FileNotFoundError(f"class folder {folder} does not exist")
    found = sorted(
        os.path.join(d, f) for d, _, files in os.walk(folder) for f in files
        if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))
    if not found:
      raise ValueError(f"class folder {folder} holds no image "
                       f"({', '.join(IMAGE_EXTENSIONS)})")
    paths += found
    labels += [label] * len(found)
  return ImageSet(root, list(classes), np.asarray(labels, np.int64), paths,
                  lambda i: read_file(paths[i]))


def is_tfds_dir(path) -> bool:
  """True for a prepared TFDS dataset directory (holds dataset_info.json)."""
  return os.path.isfile(os.path.join(os.fspath(path), "dataset_info.json"))


def from_tfds(name_or_dir, split="test", data_dir=None,
              image_key="image", label_key="label") -> ImageSet:
  """A prepared TFDS image-classification dataset, read without TensorFlow.

  Args:
    name_or_dir: a registered dataset name ("cifar10", "imagenet2012",
      "name:version") or a prepared dataset directory
      (`DATA_DIR/name/config/version`, holding dataset_info.json).
    split: split name or TFDS slice ("test", "validation[:1000]").
    data_dir: TFDS data directory for a name (default TFDS's).
    image_key, label_key: feature names.

  Raises:
    ValueError: the dataset has no such feature, its label is no
      ClassLabel, it is not prepared, or the split is unknown.
  """
  # TFDS is heavy: imported for TFDS sources only.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  where = os.fspath(name_or_dir)
  try:
    if is_tfds_dir(where):
      builder = tfds.builder_from_directory(where)
    else:
      builder = tfds.builder(where, data_dir=data_dir)
  except (tfds.core.registered.DatasetNotFoundError, ValueError,
          OSError) as e:
    message = " ".join(str(e).split()).split(" Available datasets:")[0]
    raise ValueError(f"TFDS dataset {where}: {message[:300]}") from None
  features = builder.info.features
  for key, what in ((image_key, "image"), (label_key, "label")):
    if key not in features:
      raise ValueError(f"TFDS dataset {where} has no {key!r} feature (an "
                       f"{what} is needed; features: {sorted(features)})")
  label = features[label_key]
  if not isinstance(label, tfds.features.ClassLabel):
    raise ValueError(f"TFDS dataset {where}: feature {label_key!r} is a "
                     f"{type(label).__name__}, not a ClassLabel with names")
  if not builder.is_prepared():
    raise ValueError(
        f"TFDS dataset {where} is not prepared in {builder.data_dir}: "
        "prepare it first (tensorflow_datasets builder "
        "download_and_prepare(file_format='array_record'))")
  try:
    # Images stay encoded: PIL decodes them in `ImageSet.load` (with the
    # same error handling as files), and reading the labels decodes nothing.
    source = builder.as_data_source(
        split=split, decoders={image_key: tfds.decode.SkipDecoding()})
  except (ValueError, KeyError, NotImplementedError) as e:
    raise ValueError(f"TFDS dataset {where}, split {split!r}: "
                     f"{' '.join(str(e).split())[:300]}") from None
  n = len(source)
  labels = np.asarray([source[i][label_key] for i in range(n)], np.int64)
  item_names = [f"{builder.name} {split}[{i}]" for i in range(n)]

  def read(i):
    image = source[i][image_key]
    return image if isinstance(image, bytes) else np.asarray(image)

  return ImageSet(f"{builder.name}/{split}", list(label.names), labels,
                  item_names, read, builder.name)


def from_synthetic(attribute="shape", split="test", num=1024, seed=0,
                   image_size=32) -> ImageSet:
  """The classification view of synthetic ViSU (shapes or colours)."""
  # The synthetic builder imports TFDS: loaded for this view only.
  from hysac_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  images, labels, classes = synthetic.classification_view(
      attribute, split, num, seed, image_size)
  return ImageSet(f"synthetic_visu:{attribute}", classes, labels,
                  [f"synthetic_visu {split}[{i}]" for i in range(num)],
                  lambda i: images[i])
