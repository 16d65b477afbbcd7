"""The grain input pipeline: batch contents, shuffling, sharding, eval
padding, resumable state, workers, text-only batches."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from hysac_jax import config as config_lib
from hysac_jax.data import build
from hysac_jax.data import pipeline
from hysac_jax.data import preprocess
from hysac_jax.data import schema
from hysac_jax.data import synthetic
from hysac_jax.data import tokenizer

SIZES = (40, 13, 8)  # train, validation, test
IMAGE_SIZE = 16


@pytest.fixture(scope="module")
def data_config(tmp_path_factory):
  c = config_lib.base_config().data
  c.name = "synthetic_visu"
  c.data_dir = str(tmp_path_factory.mktemp("tfds"))
  c.batch_size_per_device = 2
  c.eval_batch_size_per_device = 2
  c.num_workers = 0
  c.synthetic_sizes = SIZES
  return c


@pytest.fixture(scope="module")
def source(data_config):
  builder = pipeline.open_builder(data_config, IMAGE_SIZE)
  return builder.as_data_source(decoders=schema.skip_image_decoding())


def _make(data_config, split, **kw):
  kw.setdefault("local_device_count", 1)
  kw.setdefault("process_index", 0)
  kw.setdefault("process_count", 1)
  return pipeline.make_dataset(data_config, split, IMAGE_SIZE, **kw)


def test_builds_the_synthetic_set_at_the_model_image_size(data_config,
                                                          source):
  assert {s: len(source[s]) for s in source} == dict(
      zip(("train", "validation", "test"), SIZES))
  name = synthetic.synthetic_config(IMAGE_SIZE, *SIZES).name
  assert name in str(pipeline.open_builder(data_config, IMAGE_SIZE).data_path)


def test_batch_has_contract_shapes_and_the_planned_examples(data_config,
                                                            source):
  it = _make(data_config, "train", local_device_count=4, seed=1)
  batch = next(it)
  b = 2 * 4  # per device x local devices
  assert batch["safe_image"].shape == (b, IMAGE_SIZE, IMAGE_SIZE, 3)
  assert batch["unsafe_image"].dtype == np.float32
  assert batch["safe_ids"].shape == (b, 77)
  assert batch["unsafe_ids"].dtype == np.int32 and batch["mask"].all()
  # Row r is exactly the preprocessed, tokenized example the plan names.
  indices, _ = it.plan.examples(0)
  for r, i in enumerate(indices):
    rec = source["train"][int(i)]
    np.testing.assert_array_equal(
        batch["unsafe_image"][r],
        preprocess.clip_preprocess(rec["unsafe_image"], IMAGE_SIZE))
    np.testing.assert_array_equal(
        batch["safe_ids"][r], tokenizer.tokenize(rec["safe_caption"].decode())[0])


def test_captions_are_tokenized_at_the_given_context_length(data_config,
                                                            source):
  """A 32-position text tower gets (B, 32) ids: the same tokens as at 77,
  cut before the padding."""
  short = next(_make(data_config, "train", seed=1, context_length=32))
  full = next(_make(data_config, "train", seed=1))
  assert short["safe_ids"].shape == (2, 32)
  for key in ("safe_ids", "unsafe_ids"):
    np.testing.assert_array_equal(short[key], full[key][:, :32])
    assert (full[key][:, 32:] == full[key][0, -1]).all()  # only padding cut


def test_training_order_is_deterministic_by_seed_and_changes_per_epoch():
  plan = pipeline.BatchPlan(num_examples=40, batch_size=4, process_index=0,
                            process_count=1, train=True, seed=3)
  same = pipeline.BatchPlan(num_examples=40, batch_size=4, process_index=0,
                            process_count=1, train=True, seed=3)
  other = pipeline.BatchPlan(num_examples=40, batch_size=4, process_index=0,
                             process_count=1, train=True, seed=4)
  epoch0 = np.concatenate([plan.examples(b)[0] for b in range(10)])
  epoch1 = np.concatenate([plan.examples(b)[0] for b in range(10, 20)])
  np.testing.assert_array_equal(
      epoch0, np.concatenate([same.examples(b)[0] for b in range(10)]))
  assert not np.array_equal(
      epoch0, np.concatenate([other.examples(b)[0] for b in range(10)]))
  assert sorted(epoch0) == sorted(epoch1) == list(range(40))
  assert not np.array_equal(epoch0, epoch1)


def test_same_seed_same_batches_end_to_end(data_config):
  a = [next(_make(data_config, "train", seed=5))["safe_image"]]
  b = [next(_make(data_config, "train", seed=5))["safe_image"]]
  c = [next(_make(data_config, "train", seed=6))["safe_image"]]
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


@pytest.mark.parametrize("n,procs,batch", [(40, 2, 4), (43, 3, 2),
                                           (17, 4, 1)])
def test_training_shards_are_disjoint_and_drop_only_the_remainder(n, procs,
                                                                  batch):
  plans = [pipeline.BatchPlan(n, batch, p, procs, train=True, seed=0)
           for p in range(procs)]
  steps = plans[0].steps_per_epoch
  assert steps == n // (batch * procs)
  for epoch in range(2):
    seen = [np.concatenate([pl.examples(epoch * steps + s)[0]
                            for s in range(steps)]) for pl in plans]
    flat = np.concatenate(seen)
    assert len(set(flat)) == len(flat) == steps * batch * procs  # no overlap
    for s in range(steps):
      assert all(pl.examples(epoch * steps + s)[1].all() for pl in plans)


@pytest.mark.parametrize("train", [True, False])
def test_process_blocks_concatenate_to_the_single_process_global_batch(train):
  # The global array assembled from the processes' local batches (process 0's
  # rows, then process 1's, ...) must not depend on the process count: then
  # a run resumed on another topology sees the same batches, and evaluation
  # embeddings come back in split order.
  n, procs, batch = 29, 3, 4
  single = pipeline.BatchPlan(n, batch * procs, 0, 1, train=train, seed=3)
  plans = [pipeline.BatchPlan(n, batch, p, procs, train=train, seed=3)
           for p in range(procs)]
  for step in range(2 * single.steps_per_epoch if train else
                    single.steps_per_epoch):
    idx, mask = zip(*(pl.examples(step) for pl in plans))
    want_idx, want_mask = single.examples(step)
    np.testing.assert_array_equal(np.concatenate(mask), want_mask)
    np.testing.assert_array_equal(np.concatenate(idx), want_idx)


@pytest.mark.parametrize("n,procs,batch", [(13, 2, 2), (13, 3, 4), (8, 2, 4),
                                           (5, 4, 3)])
def test_eval_padding_counts_each_example_exactly_once(n, procs, batch):
  plans = [pipeline.BatchPlan(n, batch, p, procs, train=False)
           for p in range(procs)]
  steps = plans[0].steps_per_epoch
  assert steps == -(-n // (batch * procs))
  valid = []
  for pl in plans:
    for s in range(steps):
      idx, mask = pl.examples(s)
      valid.extend(idx[mask].tolist())
  assert sorted(valid) == list(range(n))


def test_eval_iterators_of_all_processes_cover_the_split_once(data_config,
                                                              source):
  n = SIZES[1]
  procs = 3
  total_mask, steps, ids = 0, set(), []
  for p in range(procs):
    batches = list(_make(data_config, "validation", process_index=p,
                         process_count=procs))
    steps.add(len(batches))
    for b in batches:
      assert b["safe_image"].shape[0] == 2
      total_mask += int(b["mask"].sum())
      ids.extend(map(tuple, b["unsafe_ids"][b["mask"]]))
  assert len(steps) == 1  # every process runs the same number of steps
  assert total_mask == n
  want = sorted(tuple(tokenizer.tokenize(
      source["validation"][i]["unsafe_caption"].decode())[0])
                for i in range(n))
  assert sorted(ids) == want


def test_state_round_trip_resumes_at_the_exact_next_batch(data_config):
  it = _make(data_config, "train", seed=2, num_epochs=3)
  steps = it.steps_per_epoch
  assert steps == SIZES[0] // 2
  for _ in range(steps - 1):  # stop just before an epoch boundary
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # as a checkpoint stores it
  expected = [next(it) for _ in range(3)]
  resumed = _make(data_config, "train", seed=2, num_epochs=3)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  assert len(it) == 3 * steps


def test_set_state_rejects_a_state_from_another_batch_size(data_config):
  state = _make(data_config, "train").get_state()
  other = _make(data_config, "train", local_device_count=2)
  with pytest.raises(ValueError, match="global_batch_size"):
    other.set_state(state)


def test_workers_give_the_same_batches_and_resume(data_config):
  ref = _make(data_config, "train", seed=9, num_epochs=1)
  want = [next(ref) for _ in range(4)]
  it = _make(data_config, "train", seed=9, num_epochs=1, num_workers=2)
  try:
    got = [next(it) for _ in range(2)]
    state = it.get_state()
  finally:
    it.close()
  # The state is a batch count, so it resumes under another worker count.
  resumed = _make(data_config, "train", seed=9, num_epochs=1, num_workers=0)
  resumed.set_state(state)
  got += [next(resumed) for _ in range(2)]
  for w, g in zip(want, got):
    for k in w:
      np.testing.assert_array_equal(g[k], w[k])


def test_augmentation_is_deterministic_and_off_for_eval(data_config):
  aug = data_config.copy_and_resolve_references()
  aug.augment = True
  a = next(_make(aug, "train", seed=1))["safe_image"]
  b = next(_make(aug, "train", seed=1))["safe_image"]
  plain = next(_make(data_config, "train", seed=1))["safe_image"]
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, plain)
  ev = next(_make(aug, "validation"))["safe_image"]
  np.testing.assert_array_equal(
      ev, next(_make(data_config, "validation"))["safe_image"])


def test_text_only_batches_from_visu_text(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  rows = [{"safe": f"safe text {i}", "nsfw": f"unsafe text {i}", "tag": "v"}
          for i in range(5)]
  with open(manual / "test.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  it = pipeline.make_text_dataset(str(tmp_path / "tfds"), "test", 2,
                                  manual_dir=str(manual), process_index=0,
                                  process_count=1)
  batches = list(it)
  assert len(batches) == 3 and set(batches[0]) == {"safe_ids", "unsafe_ids",
                                                    "mask"}
  mask = np.concatenate([b["mask"] for b in batches])
  assert mask.tolist() == [True] * 5 + [False]
  ids = np.concatenate([b["safe_ids"] for b in batches])[mask]
  np.testing.assert_array_equal(
      np.sort(ids, axis=0),
      np.sort(tokenizer.tokenize([r["safe"] for r in rows]), axis=0))


def test_split_smaller_than_a_global_batch_is_an_error(data_config):
  with pytest.raises(ValueError, match="smaller than one global batch"):
    _make(data_config, "train", local_device_count=64)


def test_build_dataset_rejects_unknown_names(tmp_path):
  with pytest.raises(ValueError, match="unknown dataset"):
    build.build_dataset("imagenet", str(tmp_path))


def test_jpeg_draft_reaches_the_decoder():
  rng = np.random.default_rng(0)

  def jpeg(h, w):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(
        buf, "JPEG")
    return buf.getvalue()

  records = [{"id": f"{i}".encode(), "safe_caption": b"a photo",
              "unsafe_caption": b"another photo", "safe_image": jpeg(96, 128),
              "unsafe_image": jpeg(64, 64)} for i in range(2)]
  kw = dict(batch_size=2, image_size=16, train=False, process_index=0,
            process_count=1)
  plain = next(pipeline.make_iterator(records, **kw))
  draft = next(pipeline.make_iterator(records, jpeg_draft=True, **kw))
  for key in schema.IMAGE_KEYS:
    want = np.stack([preprocess.clip_preprocess(r[key], 16, jpeg_draft=True)
                     for r in records])
    np.testing.assert_array_equal(draft[key], want)
  assert not np.array_equal(draft["safe_image"], plain["safe_image"])


def test_input_wait_counts_the_time_next_blocks():
  ticks = iter(range(100))
  records = [{"id": b"0", "safe_caption": b"a", "unsafe_caption": b"b"}] * 4
  it = pipeline.make_iterator(records, batch_size=2, train=False,
                              text_only=True, process_index=0,
                              process_count=1, clock=lambda: next(ticks))
  assert it.take_wait() == 0 and it.wait_seconds == 0
  next(it)  # the clock reads 0 then 1
  next(it)  # 2 then 3
  assert it.wait_seconds == 2 and it.take_wait() == 2
  assert it.take_wait() == 0
  with pytest.raises(StopIteration):
    next(it)  # 4 then 5: the blocked time still counts
  assert it.wait_seconds == 3 and it.take_wait() == 1
