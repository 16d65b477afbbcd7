"""The grain input pipeline: TFDS array_record files -> batches of numpy.

  it = make_dataset(config.data, "train", image_size=224, seed=config.seed,
                    num_epochs=config.train.epochs)
  batch = next(it)   # {"safe_image", "unsafe_image": float32 (B, H, W, 3),
                     #  "safe_ids", "unsafe_ids": int32 (B, 77), "mask": bool (B,)}
  state = it.get_state()   # JSON-safe dict; store it in the checkpoint
  it.set_state(state)      # the next batch is the one after the last consumed

B is the per-process batch: `batch_size_per_device * local devices`; the
global batch is B * process_count and splits evenly across devices.

Which example lands where is a pure function of (seed, epoch, process, batch
index), computed in `BatchPlan`:
- training: each epoch draws a permutation of the split from (seed, epoch);
  global batch j of the epoch takes permutation entries [j*G, (j+1)*G) and
  process p the block [p*B, (p+1)*B) of that window. The last partial global
  batch is dropped, so every process runs the same number of steps.
- evaluation: no shuffle; the split is padded up to a whole number of global
  batches with copies of example 0 whose `mask` is False, so each example is
  counted exactly once across processes.

Each batch is decoded and preprocessed as a unit, in grain worker processes
(`num_workers > 0`) or in reader threads, and prefetched. The iterator state
is the number of batches consumed; restoring rebuilds the pipeline from that
batch on, so it does not depend on the worker count.
"""

import dataclasses
import functools
import os
import sys
import threading
import time

import grain
import numpy as np

from hysac_jax.data import build
from hysac_jax.data import preprocess
from hysac_jax.data import schema
from hysac_jax.data import tokenizer as tokenizer_lib

_FOREVER = sys.maxsize // 4  # "no epoch limit" for MapDataset.range
_TOKENIZER_LOCK = threading.Lock()


def _tokenizer():
  # transformers' lazy imports are not thread-safe: the first load in each
  # process (main or grain worker) must not race between reader threads.
  with _TOKENIZER_LOCK:
    return tokenizer_lib.load_tokenizer()


@dataclasses.dataclass(frozen=True)
class BatchPlan:
  """Maps (batch index, row) to a source example; see the module docstring.

  Attributes:
    num_examples: examples in the split (N).
    batch_size: per-process batch (B).
    process_index, process_count: this process (p) and their number (P).
    train: shuffle per epoch and drop the remainder (else pad and mask).
    seed: shuffle seed.
  """
  num_examples: int
  batch_size: int
  process_index: int
  process_count: int
  train: bool
  seed: int = 0

  @property
  def global_batch_size(self):
    return self.batch_size * self.process_count

  @property
  def steps_per_epoch(self):
    g = self.global_batch_size
    if self.train:
      return self.num_examples // g
    return -(-self.num_examples // g)

  @functools.lru_cache(maxsize=2)
  def permutation(self, epoch):
    """The order of the split in `epoch` (identity when not training)."""
    if not self.train:
      return np.arange(self.num_examples)
    return np.random.default_rng([self.seed, epoch]).permutation(
        self.num_examples)

  def examples(self, batch_index):
    """Source indices and validity of one per-process batch.

    Returns:
      (indices int64 (B,), mask bool (B,)).
    """
    epoch, step = divmod(batch_index, self.steps_per_epoch)
    # Process p takes a contiguous block of the global batch, so that the
    # global array `make_array_from_process_local_data` assembles holds the
    # examples in split order whatever the number of processes.
    rows = np.arange(self.batch_size)
    globals_ = (step * self.global_batch_size
                + self.process_index * self.batch_size + rows)
    mask = globals_ < self.num_examples
    order = self.permutation(epoch)
    return order[np.where(mask, globals_, 0)], mask


class _LoadBatch:
  """grain map: batch index -> dict of numpy arrays (runs in workers)."""

  def __init__(self, source, plan, image_size, augment, text_only,
               jpeg_draft=False, context_length=tokenizer_lib.CONTEXT_LENGTH):
    self.source, self.plan = source, plan
    self.context_length = context_length
    self.image_size, self.augment = image_size, augment
    self.text_only, self.jpeg_draft = text_only, jpeg_draft

  def _image(self, data, rng):
    if rng is not None:
      return preprocess.random_resized_crop_uint8(data, self.image_size, rng)
    return preprocess.resize_crop(data, self.image_size, self.jpeg_draft)

  def __call__(self, batch_index):
    indices, mask = self.plan.examples(int(batch_index))
    records = [self.source[int(i)] for i in indices]
    texts = []
    for r in records:
      texts += [_text(r["safe_caption"]), _text(r["unsafe_caption"])]
    ids = tokenizer_lib.tokenize(texts, max_len=self.context_length,
                                 tokenizer=_tokenizer())
    ids = ids.reshape(len(records), 2, -1)
    out = {"safe_ids": ids[:, 0], "unsafe_ids": ids[:, 1], "mask": mask}
    if self.text_only:
      return out
    for key in schema.IMAGE_KEYS:
      images = []
      for row, (i, r) in enumerate(zip(indices, records)):
        rng = None
        if self.augment:  # Seeded by position, so a resumed run repeats it.
          rng = np.random.default_rng(
              [self.plan.seed, int(batch_index), row, len(key)])
        try:
          images.append(self._image(r[key], rng))
        except OSError as e:
          raise OSError(f"cannot decode {key} of example {int(i)} "
                        f"(id {_text(r['id'])!r}): {e}") from e
      # uint8 until `_normalise_images` (main process): 4x less to move
      # from the workers.
      out[key] = np.stack(images)
    return out


def _normalise_images(batch):
  for key in schema.IMAGE_KEYS:
    if key in batch:
      batch[key] = preprocess.normalise(batch[key])
  return batch


def _text(value):
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class InputIterator:
  """Iterator over batches with a JSON-safe, worker-count-free state.

  Attributes:
    plan: the `BatchPlan` (steps_per_epoch, global_batch_size, ...).
    num_batches: batches this iterator yields in total.
    wait_seconds: total time `next()` has blocked waiting for a batch
      (the first batch's pipeline start-up included); see `take_wait`.
  """

  def __init__(self, source, plan, num_batches, loader, num_workers,
               num_threads, prefetch, clock=time.perf_counter):
    self.plan, self.num_batches = plan, num_batches
    self._source, self._loader = source, loader
    self._num_workers, self._num_threads = num_workers, num_threads
    self._prefetch = prefetch
    self._next = 0
    self._it = None
    self._clock = clock
    self.wait_seconds = 0.0
    self._untaken = 0.0

  @property
  def steps_per_epoch(self):
    return self.plan.steps_per_epoch

  def _start(self):
    ds = grain.MapDataset.range(self._next, self.num_batches).map(self._loader)
    ds = ds.to_iter_dataset(grain.ReadOptions(
        num_threads=self._num_threads,
        # grain caps the reader threads at the buffer size.
        prefetch_buffer_size=max(self._prefetch, self._num_threads)))
    if self._num_workers > 0:
      # absl only matters when grain starts worker processes.
      from absl import flags
      if not flags.FLAGS.is_parsed():
        # grain's worker processes read absl flags; outside an absl app
        # (tests, notebooks) the defaults are what we want.
        flags.FLAGS.mark_as_parsed()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=self._num_workers, per_worker_buffer_size=2))
    self._it = iter(ds.map(_normalise_images))

  def __iter__(self):
    return self

  def __next__(self):
    start = self._clock()
    if self._it is None:
      self._start()
    try:
      batch = next(self._it)
    finally:
      waited = self._clock() - start
      self.wait_seconds += waited
      self._untaken += waited
    self._next += 1
    return batch

  def take_wait(self):
    """Seconds `next()` blocked since the last call (input wait per log
    interval: near 0 when the workers keep up, the step's starvation when
    they do not)."""
    waited, self._untaken = self._untaken, 0.0
    return waited

  def __len__(self):
    return self.num_batches

  def close(self):
    """Stops worker processes and reader threads now (else at exit)."""
    if self._it is not None and hasattr(self._it, "close"):
      self._it.close()
    self._it = None

  def get_state(self):
    """{"next_batch": int, ...}: JSON-serialisable."""
    p = self.plan
    return {"next_batch": self._next, "num_examples": p.num_examples,
            "global_batch_size": p.global_batch_size, "seed": p.seed}

  def set_state(self, state):
    """Continues after the last batch consumed when `state` was taken."""
    p = self.plan
    for key, now in (("num_examples", p.num_examples),
                     ("global_batch_size", p.global_batch_size),
                     ("seed", p.seed)):
      if key in state and state[key] != now:
        raise ValueError(f"iterator state was saved with {key}={state[key]},"
                         f" this pipeline has {key}={now}")
    self._next = int(state["next_batch"])
    self._it = None  # Rebuilt lazily from the restored position.


def make_iterator(source, *, batch_size, image_size=None, train,
                  seed=0, num_epochs=None, augment=False, text_only=False,
                  process_index=None, process_count=None, num_workers=0,
                  num_threads=None, prefetch=2, jpeg_draft=False,
                  context_length=tokenizer_lib.CONTEXT_LENGTH,
                  clock=time.perf_counter):
  """A batch iterator over any random-access source of records.

  Args:
    source: indexable records with "id", "safe_caption", "unsafe_caption"
      and (unless `text_only`) encoded "safe_image"/"unsafe_image" bytes.
    batch_size: per-process batch size.
    image_size: output side length (required unless `text_only`).
    train: shuffle by (seed, epoch) and drop the remainder; else one pass,
      padded and masked.
    seed: shuffle seed.
    num_epochs: training epochs to yield (None: unlimited).
    augment: random-resized-crop instead of the centre crop.
    text_only: only token ids and mask.
    process_index, process_count: default `jax.process_index/count()`.
    num_workers: grain worker processes (0: reader threads in this process).
    num_threads: reader threads (default: 1 with workers, else 4).
    prefetch: batches buffered ahead.
    jpeg_draft: decode JPEGs at a reduced scale before the centre-crop
      resize (`preprocess` module docstring); the augmentation path always
      decodes at full size.
    context_length: token ids per caption (the text tower's positions).
    clock: time source of the input-wait accounting (tests).
  """
  if process_index is None or process_count is None:
    import jax  # Not at module level: grain workers need no JAX.
    process_index = jax.process_index() if process_index is None else (
        process_index)
    process_count = jax.process_count() if process_count is None else (
        process_count)
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} outside "
                     f"[0, {process_count})")
  if not text_only and not image_size:
    raise ValueError("image_size is required for image batches")
  plan = BatchPlan(num_examples=len(source), batch_size=batch_size,
                   process_index=process_index, process_count=process_count,
                   train=train, seed=seed)
  if plan.steps_per_epoch == 0:
    raise ValueError(
        f"split of {plan.num_examples} examples is smaller than one global "
        f"batch of {plan.global_batch_size}")
  epochs = 1 if not train else (num_epochs or _FOREVER // plan.steps_per_epoch)
  loader = _LoadBatch(source, plan, image_size, augment and train, text_only,
                      jpeg_draft, context_length)
  if num_threads is None:
    num_threads = 1 if num_workers else 4
  return InputIterator(source, plan, plan.steps_per_epoch * epochs, loader,
                       num_workers, num_threads, prefetch, clock)


def _builder_kwargs(data_config, image_size):
  name = data_config.name
  kwargs = {}
  if name == "synthetic_visu":
    # The builder registers itself with TFDS on import: only when named.
    from hysac_jax.data import synthetic
    sizes = data_config.synthetic_sizes
    kwargs["config"] = synthetic.synthetic_config(
        image_size=image_size or 32, num_train=sizes[0],
        num_validation=sizes[1], num_test=sizes[2],
        seed=data_config.synthetic_seed)
  elif data_config.skip_invalid:
    kwargs["skip_invalid"] = True
  return kwargs


def open_builder(data_config, image_size=None):
  """Builds (if needed) and returns the TFDS builder `config.data` names."""
  return build.build_dataset(
      data_config.name, os.path.expanduser(data_config.data_dir),
      manual_dir=data_config.manual_dir or None,
      **_builder_kwargs(data_config, image_size))


def prepare(data_config, image_size):
  """Builds the dataset on process 0 while the others wait, once per run.

  Every process opens the TFDS files afterwards; letting them all build at
  once would race on the same directory.
  """
  # Not at module level: grain workers need no JAX.
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    open_builder(data_config, image_size)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("hysac_jax: dataset built")


def check_data(data_config, image_size=None):
  """Fails fast (FileNotFoundError) when the dataset `config.data` names is
  not built and cannot be: its manual_dir is missing. Creates nothing."""
  build.check_buildable(
      data_config.name, os.path.expanduser(data_config.data_dir),
      manual_dir=data_config.manual_dir or None,
      **_builder_kwargs(data_config, image_size))


def make_dataset(data_config, split, image_size, *, seed=0, num_epochs=None,
                 train=None, process_index=None, process_count=None,
                 local_device_count=None, num_workers=None,
                 context_length=tokenizer_lib.CONTEXT_LENGTH):
  """The trainer's entry point: image quadruple batches for one split.

  Args:
    data_config: `config.data` (name, data_dir, manual_dir,
      batch_size_per_device, eval_batch_size_per_device, num_workers,
      augment; optional jpeg_draft, synthetic_sizes, synthetic_seed,
      skip_invalid).
    split: "train", "validation" or "test".
    image_size: model input side (the vision config's image_size).
    seed: shuffle (and augmentation) seed.
    num_epochs: training epochs (None: unlimited).
    train: default `split == "train"`.
    process_index, process_count: override `jax.process_*()` (tests).
    local_device_count: override `jax.local_device_count()` (tests).
    num_workers: override `data_config.num_workers`.
    context_length: token ids per caption (the text tower's positions).

  Returns:
    An `InputIterator` of per-process batches.
  """
  train = split == "train" if train is None else train
  if local_device_count is None:
    import jax  # Not at module level: grain workers need no JAX.
    local_device_count = jax.local_device_count()
  per_device = (data_config.batch_size_per_device if train
                else data_config.eval_batch_size_per_device)
  builder = open_builder(data_config, image_size)
  source = builder.as_data_source(
      split=split, decoders=schema.skip_image_decoding())
  return make_iterator(
      source, batch_size=per_device * local_device_count,
      image_size=image_size, train=train, seed=seed, num_epochs=num_epochs,
      augment=data_config.augment,
      jpeg_draft=data_config.jpeg_draft, context_length=context_length,
      process_index=process_index, process_count=process_count,
      num_workers=(data_config.num_workers if num_workers is None
                   else num_workers))


def make_text_dataset(data_dir, split, batch_size, *, manual_dir=None,
                      process_index=None, process_count=None, num_workers=0,
                      **builder_kwargs):
  """Text-only evaluation batches from `visu_text`: one padded pass.

  Returns:
    An `InputIterator` of {"safe_ids", "unsafe_ids": int32 (B, 77),
    "mask": bool (B,)}, B = batch_size (per process).
  """
  builder = build.build_dataset("visu_text", data_dir, manual_dir=manual_dir,
                                **builder_kwargs)
  source = builder.as_data_source(split=split)
  return make_iterator(source, batch_size=batch_size, train=False,
                       text_only=True, process_index=process_index,
                       process_count=process_count, num_workers=num_workers)
