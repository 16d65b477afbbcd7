"""Embedding images and texts with a loaded model, for the evaluation tasks.

The tasks use a model only through `load_model` below and the attributes
`encode_image(pixels)` ((B, H, W, 3) float32 CLIP-normalised NHWC -> (B, D)),
`encode_text(ids)`, `curv`, `mode` ("hyp"/"euc"), `image_size` and
`context_length`, `bounds`, `traversal_alpha` of a `serving.Model`.

Batches are padded to one fixed size (zeros; the padded rows are dropped), so
each tower compiles once, and decoding runs on a small thread pool (PIL
releases the GIL) while a progress bar counts images.
"""

from __future__ import annotations

import concurrent.futures
import sys

import numpy as np
from tqdm import tqdm

from hysac_jax.data import labelled_images

IMAGE_BATCH = 64
TEXT_BATCH = 256
DECODE_WORKERS = 4


def load_model(path, checkpoint="best_recall"):
  """Any model directory (a run, a converted model, an export) as a
  `serving.Model`. The one place these tasks load a model."""
  from hysac_jax import serving  # pylint: disable=g-import-not-at-top
  return serving.load_model(path, checkpoint=checkpoint)


def _padded(rows, size):
  rows = np.asarray(rows)
  if len(rows) == size:
    return rows
  pad = np.zeros((size - len(rows),) + rows.shape[1:], rows.dtype)
  return np.concatenate([rows, pad])


def embed_texts(model, texts, batch_size=TEXT_BATCH, desc=None):
  """(M, D) float32 embeddings of M strings, in order.

  Every batch is padded to `min(batch_size, M)` rows, so one shape compiles.
  """
  from hysac_jax.data.tokenizer import tokenize  # pylint: disable=g-import-not-at-top
  texts = list(texts)
  if not texts:
    raise ValueError("no text to embed")
  ids = tokenize(texts, max_len=model.context_length)
  size = min(batch_size, len(texts))
  out = []
  for start in tqdm(range(0, len(texts), size), desc=desc, file=sys.stderr,
                    disable=desc is None or len(texts) <= size):
    chunk = ids[start:start + size]
    emb = np.asarray(model.encode_text(_padded(chunk, size)))
    out.append(emb[:len(chunk)])
  return np.concatenate(out).astype(np.float32)


def _try_load(image_set, i, image_size):
  try:
    return image_set.load(i, image_size), None
  except labelled_images.UnreadableImage as e:
    return None, str(e)


def embed_images(model, image_set, batch_size=IMAGE_BATCH, desc="images",
                 skip_unreadable=False, workers=DECODE_WORKERS):
  """Embeds every image of `image_set` (an `ImageSet`).

  Args:
    model: a serving model (module docstring).
    image_set: `labelled_images.ImageSet` (or anything with `__len__` and
      `load(i, image_size)` raising `UnreadableImage`).
    batch_size: images per encoder call; every call gets exactly
      `min(batch_size, N)` rows (zero padding), so one compile.
    desc: progress-bar label (None: no bar).
    skip_unreadable: leave unreadable images out (listed in the result)
      instead of raising.
    workers: decoding threads.

  Returns:
    (emb (K, D) float32, kept (K,) int64 indices into the set, skipped: list
    of error messages, one per unreadable image).

  Raises:
    UnreadableImage: the first unreadable image, without skip_unreadable.
  """
  n = len(image_set)
  if n == 0:
    raise ValueError("no image to embed")
  size = min(batch_size, n)
  image_size = model.image_size
  emb, kept, skipped = [], [], []
  with concurrent.futures.ThreadPoolExecutor(workers) as pool, tqdm(
      total=n, desc=desc, file=sys.stderr, disable=desc is None) as bar:
    for start in range(0, n, size):
      indices = range(start, min(start + size, n))
      loaded = list(pool.map(lambda i: _try_load(image_set, i, image_size),
                             indices))
      rows = []
      for i, (pixels, error) in zip(indices, loaded):
        if error is None:
          rows.append(pixels)
          kept.append(i)
        elif skip_unreadable:
          skipped.append(error)
        else:
          raise labelled_images.UnreadableImage(
              error + " (pass --skip_unreadable to leave such images out)")
      if rows:
        out = np.asarray(model.encode_image(_padded(np.stack(rows), size)))
        emb.append(out[:len(rows)].astype(np.float32))
      bar.update(len(indices))
  if not emb:
    raise ValueError(f"no readable image among {n} ({len(skipped)} skipped)")
  return np.concatenate(emb), np.asarray(kept, np.int64), skipped
