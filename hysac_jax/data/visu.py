"""`visu`: the ViSU quadruples, built from files the user already has.

`manual_dir` layout (the split file names are configurable, `split_files`):

  <manual_dir>/
    visu_dpo_train_nsfw_unfiltered_images.json        # train
    visu_validation_dpo_corrected_nsfw_images.json    # validation
    visu_test_dpo_corrected_nsfw_images.json          # test
    coco/train2017/000000000009.jpg ...               # COCO 2017 images
    coco/val2017/...  coco/test2017/...
    <unsafe images, at each record's nsfw_im_path>

Each split file maps a record id to
`{"coco_id": int, "safe": str, "nsfw": str, "nsfw_im_path": str, "tag": str?}`,
possibly wrapped as `{"info": ..., "data": {...}}`. `nsfw_im_path` is
absolute or relative to `manual_dir`. The COCO image is looked up in
train2017, val2017 and test2017, in that order. Images are stored as their
original encoded bytes; every one is fully decoded once at build time so that
missing, unreadable or truncated files surface here, not mid-training.
"""

import concurrent.futures
import json
import os

import tensorflow_datasets as tfds

from hysac_jax.data import bad_input
from hysac_jax.data import schema

DEFAULT_SPLIT_FILES = {
    "train": "visu_dpo_train_nsfw_unfiltered_images.json",
    "validation": "visu_validation_dpo_corrected_nsfw_images.json",
    "test": "visu_test_dpo_corrected_nsfw_images.json",
}
COCO_DIRS = ("train2017", "val2017", "test2017")
REQUIRED_FIELDS = ("coco_id", "safe", "nsfw", "nsfw_im_path")


def read_release_json(path):
  """The records of one split file, in file order.

  Args:
    path: a release JSON file (dict id -> record, or wrapped in "data").

  Returns:
    list of (record_id: str, raw record).

  Raises:
    ValueError: the file is not valid JSON or not in the release's shape.
  """
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from e
  if isinstance(data, dict) and "data" in data and (
      set(data) <= {"info", "data", "licenses"}):
    data = data["data"]
  if isinstance(data, list):  # A list export: ids are positions.
    return [(str(i), r) for i, r in enumerate(data)]
  if not isinstance(data, dict):
    raise ValueError(f"{path}: expected a dict of id -> record (or "
                     f"{{'info', 'data'}}), got {type(data).__name__}")
  return [(str(k), v) for k, v in data.items()]


def parse_record(raw):
  """Checks one release record.

  Returns:
    (fields, None) with int coco_id, str safe, nsfw, nsfw_im_path, tag; or
    (None, reason).
  """
  if not isinstance(raw, dict):
    return None, f"malformed record: expected an object, got {raw!r:.80}"
  missing = [k for k in REQUIRED_FIELDS if k not in raw]
  if missing:
    return None, f"malformed record: missing field(s) {missing}"
  try:
    coco_id = int(raw["coco_id"])
  except (TypeError, ValueError):
    return None, f"malformed record: coco_id {raw['coco_id']!r} not an int"
  fields = {"coco_id": coco_id, "tag": str(raw.get("tag") or "")}
  for key in ("safe", "nsfw", "nsfw_im_path"):
    value = raw[key]
    if not isinstance(value, str):
      return None, f"malformed record: {key} is {type(value).__name__}"
    if not value.strip():
      what = "caption" if key != "nsfw_im_path" else "path"
      return None, f"empty {what} field {key!r}"
    fields[key] = value.strip() if key != "nsfw_im_path" else value
  return fields, None


def coco_image_path(manual_dir, coco_id):
  """Path of a COCO 2017 image (first of train/val/test that exists)."""
  name = f"{coco_id:012d}.jpg"
  candidates = [os.path.join(manual_dir, "coco", d, name) for d in COCO_DIRS]
  for path in candidates:
    if os.path.exists(path):
      return path
  return os.path.join(manual_dir, "coco", "{" + ",".join(COCO_DIRS) + "}",
                      name)


def load_quadruple(manual_dir, record_id, raw):
  """Reads and checks one record and its two images.

  Returns:
    (example dict for the builder, None) or (None, reason).
  """
  fields, reason = parse_record(raw)
  if reason:
    return None, reason
  safe_bytes, reason = bad_input.read_image_bytes(
      coco_image_path(manual_dir, fields["coco_id"]))
  if reason:
    return None, f"safe image: {reason}"
  unsafe_path = os.path.join(manual_dir, fields["nsfw_im_path"])  # abs wins
  unsafe_bytes, reason = bad_input.read_image_bytes(unsafe_path)
  if reason:
    return None, f"unsafe image: {reason}"
  return {
      "id": record_id,
      "safe_image": safe_bytes,
      "unsafe_image": unsafe_bytes,
      "safe_caption": fields["safe"],
      "unsafe_caption": fields["nsfw"],
      "tag": fields["tag"],
  }, None


class Visu(tfds.core.GeneratorBasedBuilder):
  """ViSU (V, G, S, U) quadruples from a local copy; see the module docstring.

  Args (besides the TFDS ones):
    split_files: {split: file name in manual_dir}; defaults to the release's.
    skip_invalid: skip bad records (listed in skipped-<split>.json) instead
      of stopping the build.
    num_threads: threads reading and checking images.
  """

  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

  def __init__(self, *, split_files=None, skip_invalid=False, num_threads=8,
               **kwargs):
    self.split_files = dict(split_files or DEFAULT_SPLIT_FILES)
    self.skip_invalid = skip_invalid
    self.num_threads = num_threads
    super().__init__(**kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__,
        features=schema.quadruple_features(), homepage="")

  def _split_generators(self, dl_manager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    gens = {}
    for split, name in self.split_files.items():
      path = os.path.join(manual_dir, name)
      if not os.path.exists(path):
        raise FileNotFoundError(
            f"ViSU {split} split file missing: {path} (set split_files= to "
            "name your files)")
      gens[split] = self._generate_examples(split, path, manual_dir)
    return gens

  def _generate_examples(self, split, path, manual_dir):
    log = bad_input.SkipLog(split, self.skip_invalid)
    records = read_release_json(path)
    with concurrent.futures.ThreadPoolExecutor(self.num_threads) as pool:
      # PIL decodes outside the GIL; map keeps file order for the errors.
      results = pool.map(lambda r: load_quadruple(manual_dir, *r), records)
      for (record_id, _), (example, reason) in zip(records, results):
        if reason:
          log.bad(record_id, f"{reason} (in {os.path.basename(path)})")
          continue
        yield record_id, example
    # During the build `data_path` is TFDS's temporary directory, renamed
    # into place only when every split is done.
    log.write(self.data_path)
