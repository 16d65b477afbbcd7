"""The three TFDS builders on small data made here: contents, bad input,
skip reports and clean reruns."""

import csv
import io
import json
import os
import threading

import numpy as np
import pytest
from PIL import Image

from hysac_jax.data import bad_input
from hysac_jax.data import build
from hysac_jax.data import schema
from hysac_jax.data import synthetic
from hysac_jax.data import visu
from hysac_jax.data import visu_text

SPLIT_SIZES = {"train": 20, "validation": 6, "test": 6}


def _jpeg(rng, h, w):
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
      buf, "JPEG")
  return buf.getvalue()


def _png(rng, h, w):
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
      buf, "PNG")
  return buf.getvalue()


def make_visu_tree(root, seed=0):
  """A fake ViSU manual_dir; returns {split: {id: record}} as written.

  COCO images (JPEG) are spread over train2017 and val2017; unsafe images
  (PNG) are mostly relative to root, every fifth one absolute. The train file
  is wrapped as {"info", "data"}, the others are plain dicts.
  """
  rng = np.random.default_rng(seed)
  records = {}
  coco_id = 100
  for split, n in SPLIT_SIZES.items():
    recs = {}
    for i in range(n):
      coco_id += 7
      sub = "train2017" if split == "train" else "val2017"
      path = os.path.join(root, "coco", sub, f"{coco_id:012d}.jpg")
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path, "wb") as f:
        f.write(_jpeg(rng, int(rng.integers(20, 40)), int(rng.integers(20, 40))))
      rel = os.path.join("generated", split, f"{i}.png")
      os.makedirs(os.path.join(root, "generated", split), exist_ok=True)
      with open(os.path.join(root, rel), "wb") as f:
        f.write(_png(rng, 24, 24))
      rid = str(1000 * (list(SPLIT_SIZES).index(split) + 1) + i)
      recs[rid] = {
          "coco_id": coco_id,
          "safe": f"a safe caption number {rid}",
          "nsfw": f"an unsafe caption number {rid}",
          "nsfw_im_path": (os.path.join(root, rel) if i % 5 == 0 else rel),
          "tag": ["violence", "sexual"][i % 2],
      }
    records[split] = recs
  write_split_files(root, records)
  return records


def write_split_files(root, records):
  for split, recs in records.items():
    body = {"info": {"split": split}, "data": recs} if split == "train" else (
        recs)
    with open(os.path.join(root, visu.DEFAULT_SPLIT_FILES[split]), "w") as f:
      json.dump(body, f)


@pytest.fixture(scope="module")
def visu_tree(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("visu_manual"))
  return root, make_visu_tree(root)


@pytest.fixture(scope="module")
def visu_builder(visu_tree, tmp_path_factory):
  root, _ = visu_tree
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  return build.build_dataset("visu", data_dir, manual_dir=root)


def _by_id(source):
  return {r["id"].decode(): r for r in (source[i] for i in range(len(source)))}


def test_visu_stores_every_record_with_original_image_bytes(visu_tree,
                                                            visu_builder):
  root, records = visu_tree
  sources = visu_builder.as_data_source(decoders=schema.skip_image_decoding())
  assert set(sources) == set(SPLIT_SIZES)
  for split, recs in records.items():
    got = _by_id(sources[split])
    assert set(got) == set(recs)
    for rid, rec in recs.items():
      r = got[rid]
      assert r["safe_caption"].decode() == rec["safe"]
      assert r["unsafe_caption"].decode() == rec["nsfw"]
      assert r["tag"].decode() == rec["tag"]
      coco = visu.coco_image_path(root, rec["coco_id"])
      with open(coco, "rb") as f:
        assert r["safe_image"] == f.read()  # stored encoded, unchanged
      with open(os.path.join(root, rec["nsfw_im_path"]), "rb") as f:
        assert r["unsafe_image"] == f.read()


def test_visu_finds_coco_images_in_val2017(visu_tree):
  root, records = visu_tree
  rec = next(iter(records["test"].values()))
  path = visu.coco_image_path(root, rec["coco_id"])
  assert path.endswith(os.path.join("val2017", f"{rec['coco_id']:012d}.jpg"))


def _defective_tree(tmp_path, defect):
  """A fresh tree with one defect in train record "1003"; returns root."""
  root = str(tmp_path / "manual")
  records = make_visu_tree(root, seed=1)
  rec = records["train"]["1003"]
  if defect == "missing_image":
    os.remove(visu.coco_image_path(root, rec["coco_id"]))
  elif defect == "truncated_image":
    path = os.path.join(root, rec["nsfw_im_path"])
    data = open(path, "rb").read()
    with open(path, "wb") as f:
      f.write(data[:len(data) // 2])
  elif defect == "malformed_record":
    del rec["coco_id"]
  elif defect == "empty_caption":
    rec["nsfw"] = "   "
  write_split_files(root, records)
  return root


@pytest.mark.parametrize("defect,message", [
    ("missing_image", "image file missing"),
    ("truncated_image", "truncated"),
    ("malformed_record", "missing field(s) ['coco_id']"),
    ("empty_caption", "empty caption field 'nsfw'"),
])
def test_visu_bad_record_stops_build_naming_split_and_id(tmp_path, defect,
                                                         message):
  root = _defective_tree(tmp_path, defect)
  data_dir = str(tmp_path / "tfds")
  with pytest.raises(bad_input.InvalidRecordError) as e:
    build.build_dataset("visu", data_dir, manual_dir=root)
  text = str(e.value)
  assert "'1003'" in text and "'train'" in text and message in text
  if defect.endswith("image"):
    assert root in text  # names the file
  builder = build.get_builder("visu", data_dir)
  assert not builder.is_prepared()
  # Nothing half-written is left where TFDS would look for a dataset.
  assert not os.path.exists(builder.data_path)


@pytest.mark.parametrize("defect", ["missing_image", "truncated_image",
                                    "malformed_record", "empty_caption"])
def test_visu_skip_invalid_writes_report_and_keeps_the_rest(tmp_path, capsys,
                                                            defect):
  root = _defective_tree(tmp_path, defect)
  builder = build.build_dataset("visu", str(tmp_path / "tfds"),
                                manual_dir=root, skip_invalid=True)
  train = _by_id(builder.as_data_source(split="train"))
  assert len(train) == SPLIT_SIZES["train"] - 1 and "1003" not in train
  report = json.load(open(os.path.join(builder.data_path,
                                       "skipped-train.json")))
  assert report["count"] == 1 and report["skipped"][0]["id"] == "1003"
  clean = json.load(open(os.path.join(builder.data_path,
                                      "skipped-test.json")))
  assert clean["count"] == 0
  out = capsys.readouterr().out
  assert "train: skipped 1 invalid record(s)" in out
  assert "incomplete." not in out  # the report's final location


def test_visu_malformed_json_file_names_the_file(tmp_path):
  root = str(tmp_path / "manual")
  make_visu_tree(root)
  path = os.path.join(root, visu.DEFAULT_SPLIT_FILES["validation"])
  with open(path, "w") as f:
    f.write('{"1": {"coco_id": 3,')
  with pytest.raises(ValueError, match="not valid JSON") as e:
    build.build_dataset("visu", str(tmp_path / "tfds"), manual_dir=root)
  assert path in str(e.value)


def test_visu_missing_split_file_names_it(tmp_path):
  root = str(tmp_path / "manual")
  make_visu_tree(root)
  with pytest.raises(FileNotFoundError, match="nope.json"):
    build.build_dataset("visu", str(tmp_path / "tfds"), manual_dir=root,
                        split_files={"train": "nope.json"})


def test_crash_midway_leaves_nothing_and_rerun_builds_cleanly(
    tmp_path, monkeypatch):
  root = str(tmp_path / "manual")
  records = make_visu_tree(root)
  data_dir = str(tmp_path / "tfds")
  calls = {"n": 0}
  real = visu.load_quadruple

  def crashing(*args):
    calls["n"] += 1
    if calls["n"] == 12:
      raise RuntimeError("simulated crash")
    return real(*args)

  monkeypatch.setattr(visu, "load_quadruple", crashing)
  with pytest.raises(RuntimeError, match="simulated crash"):
    build.build_dataset("visu", data_dir, manual_dir=root)
  builder = build.get_builder("visu", data_dir)
  assert not builder.is_prepared()
  parent = os.path.dirname(builder.data_path)
  assert not os.path.exists(builder.data_path)
  # A process killed outright (no exception handling) leaves TFDS's temp
  # directory behind; simulate one and check the rerun clears it.
  stale = os.path.join(parent, "incomplete.KILLED_1.0.0")
  os.makedirs(stale)
  open(os.path.join(stale, "visu-train.array_record-00000-of-00001"),
       "w").write("partial")
  monkeypatch.setattr(visu, "load_quadruple", real)
  builder = build.build_dataset("visu", data_dir, manual_dir=root)
  assert builder.is_prepared() and not os.path.exists(stale)
  assert [e for e in os.listdir(parent) if e.startswith("incomplete.")] == []
  src = builder.as_data_source()
  assert {s: len(src[s]) for s in src} == {
      s: len(r) for s, r in records.items()}


# ----------------------------------------------------------------- visu_text

TEXT_ROWS = [
    {"safe": "a dog on a beach", "nsfw": "a bloody dog on a beach",
     "tag": "violence"},
    {"safe": "two people talking", "nsfw": "two naked people talking",
     "tag": "sexual"},
    {"safe": "a red bus", "nsfw": "a burning bus with corpses",
     "tag": "violence"},
]


def write_text_export(path, rows, fmt):
  if fmt == "json":
    json.dump(rows, open(path, "w"))
  elif fmt == "json_wrapped":
    json.dump({"info": {}, "data": {str(i): r for i, r in enumerate(rows)}},
              open(path, "w"))
  elif fmt == "jsonl":
    with open(path, "w") as f:
      for r in rows:
        f.write(json.dumps(r) + "\n")
  elif fmt == "csv":
    with open(path, "w", newline="") as f:
      w = csv.DictWriter(f, fieldnames=["safe", "nsfw", "tag"])
      w.writeheader()
      w.writerows(rows)
  elif fmt == "parquet":
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.mark.parametrize("fmt,ext", [("json", "json"),
                                     ("json_wrapped", "json"),
                                     ("jsonl", "jsonl"), ("csv", "csv"),
                                     ("parquet", "parquet")])
def test_visu_text_reads_every_format(tmp_path, fmt, ext):
  manual = tmp_path / "manual"
  manual.mkdir()
  write_text_export(str(manual / f"test.{ext}"), TEXT_ROWS, fmt)
  write_text_export(str(manual / f"train.{ext}"), TEXT_ROWS[:2], fmt)
  builder = build.build_dataset("visu_text", str(tmp_path / "tfds"),
                                manual_dir=str(manual))
  src = builder.as_data_source()
  assert set(src) == {"train", "test"}
  got = _by_id(src["test"])
  assert sorted(got) == ["0", "1", "2"]
  for i, row in enumerate(TEXT_ROWS):
    r = got[str(i)]
    assert r["safe_caption"].decode() == row["safe"]
    assert r["unsafe_caption"].decode() == row["nsfw"]
    assert r["tag"].decode() == row["tag"]


def test_visu_text_bad_rows_error_or_report(tmp_path, capsys):
  manual = tmp_path / "manual"
  manual.mkdir()
  with open(manual / "validation.jsonl", "w") as f:
    f.write(json.dumps(TEXT_ROWS[0]) + "\n")
    f.write('{"safe": "broken\n')  # malformed record on line 2
    f.write(json.dumps({"safe": "", "nsfw": "x", "tag": "t"}) + "\n")
    f.write(json.dumps(TEXT_ROWS[1]) + "\n")
  with pytest.raises(bad_input.InvalidRecordError, match="line 2") as e:
    build.build_dataset("visu_text", str(tmp_path / "a"),
                        manual_dir=str(manual))
  assert "'validation'" in str(e.value)
  builder = build.build_dataset("visu_text", str(tmp_path / "b"),
                                manual_dir=str(manual), skip_invalid=True)
  assert len(builder.as_data_source(split="validation")) == 2
  report = json.load(open(os.path.join(builder.data_path,
                                       "skipped-validation.json")))
  reasons = {s["id"]: s["reason"] for s in report["skipped"]}
  assert set(reasons) == {"1", "2"}
  assert "not valid JSON" in reasons["1"]
  assert "empty caption field 'safe'" in reasons["2"]
  assert "skipped 2 invalid record(s)" in capsys.readouterr().out


def test_visu_text_without_export_says_what_it_looked_for(tmp_path):
  with pytest.raises(FileNotFoundError, match="no ViSU text export"):
    build.build_dataset("visu_text", str(tmp_path / "tfds"),
                        manual_dir=str(tmp_path))


@pytest.mark.parametrize("manual", ["missing", "file"])
def test_visu_with_a_missing_manual_dir_names_it_and_creates_nothing(
    tmp_path, manual):
  path = tmp_path / "manual"
  if manual == "file":
    path.write_text("x")
  data_dir = tmp_path / "tfds"
  with pytest.raises(FileNotFoundError, match=f"manual_dir {path} "):
    build.build_dataset("visu", str(data_dir), manual_dir=str(path))
  assert not data_dir.exists()  # no empty downloads/ or visu/


def test_two_concurrent_first_builds_both_get_the_dataset(tmp_path,
                                                          monkeypatch):
  """Two threads build one data_dir at once: without the build lock both
  generate, and the second TFDS rename raises FileExistsError. With it the
  second waits and opens the first one's dataset."""
  inside = threading.Barrier(2, timeout=3)
  real = synthetic.SyntheticVisu._generate_examples

  def generate(self, *args, **kwargs):
    try:
      inside.wait()  # both builders generating at once (without the lock)
    except threading.BrokenBarrierError:
      pass  # the other one waits for the lock
    yield from real(self, *args, **kwargs)

  monkeypatch.setattr(synthetic.SyntheticVisu, "_generate_examples", generate)
  results, errors = [], []

  def build_one():
    try:
      results.append(build.build_dataset(
          "synthetic_visu", str(tmp_path),
          config=synthetic.synthetic_config(**SMALL)))
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  threads = [threading.Thread(target=build_one) for _ in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=120)
  assert errors == []
  assert len(results) == 2
  for builder in results:
    src = builder.as_data_source()
    assert {s: len(src[s]) for s in src} == {"train": 24, "validation": 8,
                                             "test": 8}


# ------------------------------------------------------------ synthetic_visu

SMALL = dict(image_size=32, num_train=24, num_validation=8, num_test=8, seed=3)


def test_synthetic_builder_stores_the_drawn_quadruples(tmp_path):
  builder = build.build_dataset(
      "synthetic_visu", str(tmp_path), config=synthetic.synthetic_config(
          **SMALL))
  src = builder.as_data_source()  # images decoded by TFDS (PIL)
  assert {s: len(src[s]) for s in src} == {"train": 24, "validation": 8,
                                           "test": 8}
  for r in (src["validation"][i] for i in range(8)):
    index = int(r["id"].decode().split("-")[1])
    ex = synthetic.make_quadruple(3, "validation", index, 32)
    np.testing.assert_array_equal(r["safe_image"], ex["safe_image"])  # PNG
    np.testing.assert_array_equal(r["unsafe_image"], ex["unsafe_image"])
    assert r["safe_caption"].decode() == ex["safe_caption"]
    assert r["unsafe_caption"].decode() == ex["unsafe_caption"]


def test_synthetic_default_config_object_is_accepted(tmp_path):
  builder = build.get_builder("synthetic_visu", str(tmp_path),
                              config=synthetic.synthetic_config())
  assert builder.builder_config.num_train == 4096
  assert builder.builder_config.image_size == 32


def test_synthetic_is_deterministic_by_seed():
  a = synthetic.make_quadruple(0, "train", 5, 32)
  b = synthetic.make_quadruple(0, "train", 5, 32)
  c = synthetic.make_quadruple(1, "train", 5, 32)
  np.testing.assert_array_equal(a["unsafe_image"], b["unsafe_image"])
  assert a["safe_caption"] == b["safe_caption"]
  assert not np.array_equal(a["safe_image"], c["safe_image"])


def _colour_components(img, rgb, tol=40.0):
  """Number of 4-connected blobs of pixels within `tol` of colour `rgb`."""
  from scipy import ndimage
  near = np.linalg.norm(img.astype(np.float32) - np.array(rgb), axis=-1) < tol
  return ndimage.label(near)[1]


@pytest.mark.parametrize("index", range(12))
def test_synthetic_safe_caption_matches_drawn_content(index):
  ex = synthetic.make_quadruple(7, "train", index, 32)
  scene = ex["scene"]
  words = ex["safe_caption"].split()
  assert synthetic.COUNT_WORDS[scene.count] in words
  assert scene.colour in words and scene.size in words
  assert scene.shape in ex["safe_caption"] and scene.background in words
  # The caption's count is the number of blobs of the caption's colour.
  img = ex["safe_image"]
  assert _colour_components(img, synthetic.COLOURS[scene.colour]) == (
      scene.count)
  # Background colour dominates the corners' neighbourhood mean.
  bg = np.array(synthetic.BACKGROUNDS[scene.background], np.float32)
  frac_bg = np.mean(np.linalg.norm(img - bg, axis=-1) < 30)
  assert frac_bg > 0.4


@pytest.mark.parametrize("index", range(12))
def test_synthetic_unsafe_twin_has_motif_and_unsafe_words(index):
  ex = synthetic.make_quadruple(7, "test", index, 32)

  def motif_fraction(img):
    red = np.linalg.norm(img - synthetic._MOTIF_RED * 255, axis=-1) < 60
    black = np.linalg.norm(img - synthetic._MOTIF_BLACK * 255, axis=-1) < 40
    return red.mean(), black.mean()

  safe_red, safe_black = motif_fraction(ex["safe_image"].astype(np.float32))
  red, black = motif_fraction(ex["unsafe_image"].astype(np.float32))
  assert safe_red == 0 and safe_black == 0
  assert red > 0.04 and black > 0.04
  unsafe_words = set(synthetic.UNSAFE_WORDS[ex["tag"]])
  assert len(unsafe_words & set(ex["unsafe_caption"].replace(",", "").split())
             ) >= 1
  assert not set(sum(synthetic.UNSAFE_WORDS.values(), ())) & set(
      ex["safe_caption"].split())
  # U keeps the scene words, so S, U, V and G stay aligned.
  assert ex["scene"].colour in ex["unsafe_caption"]
  assert ex["scene"].shape in ex["unsafe_caption"]


def test_synthetic_follows_image_size():
  ex = synthetic.make_quadruple(0, "train", 0, 56)
  assert ex["safe_image"].shape == ex["unsafe_image"].shape == (56, 56, 3)
  assert ex["safe_image"].dtype == np.uint8


@pytest.mark.parametrize("msg,args,kept", [
    ("Using custom data configuration %s", ("px32",), False),
    ("Variant folder %s has no %s", ("/d/1.0.0", "dataset_info.json"), False),
    ("Variant folder %s has no %s", ("/d/1.0.0", "features.json"), True),
    ("Dataset %s is corrupt", ("visu",), True)])
def test_only_tfds_warnings_with_nothing_to_act_on_are_dropped(msg, args,
                                                                kept):
  import logging  # pylint: disable=g-import-not-at-top
  record = logging.LogRecord("absl", logging.WARNING, "file_utils.py", 394,
                             msg, args, None)
  assert build._QuietTFDS().filter(record) == kept
