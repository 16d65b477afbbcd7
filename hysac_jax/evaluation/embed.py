"""Embedding a dataset split once: one pass of padded batches -> arrays.

Used by the training loop's validation and by eval.py alike; each process
embeds its shard of every global batch and the rows are gathered.
"""

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm


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
