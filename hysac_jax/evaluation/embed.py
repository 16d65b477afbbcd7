"""Embedding many inputs with fixed batch shapes, so each compiles once.

- `embed_split`: one pass over a dataset split of quadruples, for the
  training loop's validation and eval.py's report alike; each process
  embeds its shard of every global batch and the rows are gathered.
- `encode_batched`, `embed_texts`, `embed_images`: strings, token ids or an
  image set through a `serving.Model` (predict, eval.py --task). Images are
  decoded on a small thread pool (PIL releases the GIL) under a progress
  bar.
"""

import concurrent.futures
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from hysac_jax import serving
from hysac_jax.data import labelled_images
from hysac_jax.data.tokenizer import tokenize

IMAGE_BATCH = 64
TEXT_BATCH = 256
DECODE_WORKERS = 4


def gather_rows(x):
  """Concatenates a sharded (global) array's rows on every host, as numpy."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def embed_split(encode_fn, batches, desc="embedding"):
  """Runs `encode_fn` over an evaluation pass and keeps the real rows.

  Args:
    encode_fn: host batch -> (dict S/U/V/G of (B, D) arrays, metrics dict
      or None); arrays may be sharded global arrays.
    batches: an iterator of padded, masked batches (one pass).
    desc: progress-bar label.

  Returns:
    (embeddings, metrics): dict of (N, D) float32 numpy arrays over the whole
    split (padding removed, each example once; rows in global-batch order,
    which is split order on one process and a permutation within each
    global batch on several, the same for S, U, V and G); metrics averaged
    over real rows.
  """
  chunks, masks, sums, count = [], [], {}, 0
  show = jax.process_index() == 0
  for batch in tqdm(batches, desc=desc, disable=not show, leave=False):
    emb, metrics = encode_fn(batch)
    mask_global = gather_rows(_global_mask(batch, emb))
    chunks.append({k: gather_rows(v) for k, v in emb.items()})
    masks.append(mask_global.astype(bool))
    n = int(mask_global.sum())
    if metrics:
      for k, v in jax.device_get(metrics).items():
        sums[k] = sums.get(k, 0.0) + float(v) * n
    count += n
  mask = np.concatenate(masks)
  out = {k: np.concatenate([c[k] for c in chunks])[mask] for k in chunks[0]}
  return out, {k: v / max(count, 1) for k, v in sums.items()}


def _global_mask(batch, emb):
  """The batch mask laid out like the (possibly sharded) embeddings."""
  mask = np.asarray(batch["mask"]).astype(np.float32)
  any_emb = next(iter(emb.values()))
  if jax.process_count() == 1 or not isinstance(any_emb, jax.Array):
    # Host-local rows (numpy): gathered across processes like the mask.
    return mask
  # Rows are split like the embeddings' first axis.
  sharding = any_emb.sharding
  rows = jax.sharding.PartitionSpec(sharding.spec[0])
  return jax.make_array_from_process_local_data(
      jax.sharding.NamedSharding(sharding.mesh, rows), mask)


def encode_batched(encode, x, batch, desc=None):
  """`encode` over rows of `x` in batches padded to a power of two <= batch,
  so that a handful of shapes is compiled whatever the count.

  Returns:
    (N, D) NumPy, in the order of `x`.
  """
  out = []
  starts = range(0, len(x), batch)
  for start in tqdm(starts, desc=desc, disable=desc is None or
                    len(starts) < 2, file=sys.stderr):
    chunk = x[start:start + batch]
    size = min(batch, 1 << (len(chunk) - 1).bit_length())
    out.append(np.asarray(encode(serving.pad_rows(chunk, size)))[:len(chunk)])
  return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def embed_texts(model, texts, batch_size=TEXT_BATCH, desc=None):
  """(M, D) float32 embeddings of M strings, in order (`encode_batched`)."""
  texts = list(texts)
  if not texts:
    raise ValueError("no text to embed")
  ids = tokenize(texts, max_len=model.context_length)
  return encode_batched(model.encode_text, ids, batch_size,
                        desc).astype(np.float32)


def _try_load(image_set, i, image_size):
  try:
    return image_set.load(i, image_size), None
  except labelled_images.UnreadableImage as e:
    return None, str(e)


def embed_images(model, image_set, batch_size=IMAGE_BATCH, desc="images",
                 skip_unreadable=False, workers=DECODE_WORKERS):
  """Embeds every image of `image_set` (an `ImageSet`).

  Args:
    model: a `serving.Model`.
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
        out = np.asarray(model.encode_image(serving.pad_rows(np.stack(rows), size)))
        emb.append(out[:len(rows)].astype(np.float32))
      bar.update(len(indices))
  if not emb:
    raise ValueError(f"no readable image among {n} ({len(skipped)} skipped)")
  return np.concatenate(emb), np.asarray(kept, np.int64), skipped
