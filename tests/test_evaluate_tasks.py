"""eval.py --task zeroshot / retrieval / unsafe_prompts
(hysac_jax/evaluate_tasks.py, hysac_jax/data/labelled_images.py,
hysac_jax/evaluation/embed.py) on a tiny random model and generated
images, against references computed one item at a time in float64 NumPy."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from hysac_jax import evaluate_tasks
from hysac_jax import serving
from hysac_jax.data import labelled_images
from hysac_jax.data import preprocess
import tiny_runs

ROOT = Path(__file__).resolve().parents[1]
CURV = 0.7
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  """A converted tiny HySAC (random LoRA B, curv 0.7), no bounds."""
  return tiny_runs.save_converted(tmp_path_factory.mktemp("model"), seed=3,
                                  lora_b_scale=0.2, curv=CURV, alpha=0.5)


@pytest.fixture(scope="module")
def model(model_dir):
  return serving.load_model(model_dir)


def png(colour, seed, size=20):
  rng = np.random.default_rng(seed)
  pixels = np.clip(np.array(colour) + rng.normal(0, 40, (size, size, 3)),
                   0, 255).astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="PNG")
  return buf.getvalue()


def make_folder(root, classes, per_class=3):
  for k, name in enumerate(classes):
    (root / name).mkdir(parents=True)
    for i in range(per_class):
      (root / name / f"{i}.png").write_bytes(
          png(COLOURS.get(name, (128, 128, 128)), 10 * k + i))
  return root


# --- float64 references -----------------------------------------------------


def ref_dist(x, y, c):
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  xt, yt = np.sqrt(1 / c + x @ x), np.sqrt(1 / c + y @ y)
  return np.arccosh(max(-c * (x @ y - xt * yt), 1.0)) / np.sqrt(c)


def ref_class(prompts, c):
  """exp0(mean log0(p)) from the formulas of SPEC §1."""
  p = np.asarray(prompts, np.float64)
  n = np.linalg.norm(p, axis=1, keepdims=True)
  v = (np.arcsinh(np.sqrt(c) * n) / (np.sqrt(c) * n) * p).mean(axis=0)
  r = np.sqrt(c) * np.linalg.norm(v)
  return np.sinh(r) / r * v


def embed_one_by_one(model, files=(), texts=()):
  size = model.image_size
  images = [model.encode_image(preprocess.clip_preprocess(
      Path(f).read_bytes(), size)[None])[0] for f in files]
  captions = [model.encode_text([t])[0] for t in texts]
  return np.asarray(images, np.float64), np.asarray(captions, np.float64)


def assert_no_near_ties(scores, rows_positive):
  """Scores that decide a rank differ by more than float32 noise."""
  scale = np.abs(scores).max()
  for i, pos in rows_positive:
    gap = np.abs(scores[i] - scores[i, pos])
    gap = gap[np.arange(len(gap)) != pos]
    assert gap.min() > 1e-5 * scale, "fixture has near-ties"


# --- readers --------------------------------------------------------------


def test_image_folder_reads_sorted_classes_and_names_an_empty_one(tmp_path):
  root = make_folder(tmp_path / "a", ["red", "blue"], per_class=2)
  (root / "blue" / "notes.txt").write_text("not an image")
  s = labelled_images.from_folder(root)
  assert s.class_names == ["blue", "red"]
  np.testing.assert_array_equal(s.labels, [0, 0, 1, 1])
  assert s.load(0, 8).shape == (8, 8, 3)
  (root / "green").mkdir()
  with pytest.raises(ValueError, match=f"class folder {root}/green holds no "
                                       "image"):
    labelled_images.from_folder(root)
  with pytest.raises(FileNotFoundError, match="class folder .*/safe does not"):
    labelled_images.from_folder(tmp_path / "a", classes=("safe", "unsafe"))


class TinyLabelled(tfds.core.GeneratorBasedBuilder):
  """Six PNGs of two classes."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=self.features())

  def features(self):
    return tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "label": tfds.features.ClassLabel(names=["red_thing", "blue_thing"])})

  def _split_generators(self, dl_manager):
    return {"test": self._generate_examples()}

  def _generate_examples(self):
    for i in range(6):
      yield i, {"image": png(COLOURS["red" if i % 2 == 0 else "blue"], i),
                "label": i % 2}


class TinyUnlabelled(TinyLabelled):
  """Images with a text tag instead of a label."""

  def features(self):
    return tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "tag": tfds.features.Text()})

  def _generate_examples(self):
    for i in range(2):
      yield i, {"image": png(COLOURS["red"], i), "tag": "x"}


def test_tfds_dataset_gives_images_labels_and_class_names(tmp_path):
  builder = TinyLabelled(data_dir=tmp_path, file_format="array_record")
  builder.download_and_prepare()
  by_dir = labelled_images.from_tfds(builder.data_dir, "test")
  by_name = labelled_images.from_tfds("tiny_labelled", "test",
                                      data_dir=tmp_path)
  assert by_dir.class_names == by_name.class_names == ["red_thing",
                                                       "blue_thing"]
  assert sorted(by_dir.labels.tolist()) == [0, 0, 0, 1, 1, 1]
  for i in range(6):  # red images are label 0, blue ones label 1
    pixels = preprocess.denormalise(by_dir.load(i, 8))
    assert (pixels[..., 0].mean() > pixels[..., 2].mean()) == (
        by_dir.labels[i] == 0)


def test_tfds_dataset_without_label_feature_is_named(tmp_path):
  builder = TinyUnlabelled(data_dir=tmp_path, file_format="array_record")
  builder.download_and_prepare()
  with pytest.raises(ValueError, match="has no 'label' feature"):
    labelled_images.from_tfds(builder.data_dir, "test")


def test_class_prompt_sources_and_a_class_without_prompt(tmp_path):
  prompts, names, source = evaluate_tasks.class_prompts(
      [f"c{i}" for i in range(10)], "cifar10")
  assert names[0] == "airplane" and len(prompts[0]) == 18
  assert prompts[0][0] == "a photo of a airplane."
  assert source.startswith("shipped")
  prompts, names, _ = evaluate_tasks.class_prompts(["sea_lion"], "mine")
  assert prompts == [["a photo of a sea lion."]]
  # An image folder (no TFDS name) keeps its own class names.
  prompts, names, _ = evaluate_tasks.class_prompts(
      [f"c{i}" for i in range(10)], None)
  assert names[3] == "c3" and prompts[3] == ["a photo of a c3."]
  path = tmp_path / "p.json"
  path.write_text(json.dumps({"prompts": {"red": ["a red one"],
                                          "blue": []}}))
  with pytest.raises(ValueError, match=f"class 'blue' has no prompt in "
                                       f"{path}"):
    evaluate_tasks.class_prompts(["red", "blue"], "x", prompts_file=path)
  imagenet = evaluate_tasks.shipped_class_prompts("imagenet2012")
  assert len(imagenet[0]) == 1000 and len(imagenet[1]) == 80


# --- tasks against one-at-a-time references ---------------------------------


def test_zeroshot_on_an_image_folder_matches_the_reference(tmp_path,
                                                           model_dir, model):
  root = make_folder(tmp_path / "data", ["blue", "green", "red"])
  templates = tmp_path / "templates.txt"
  templates.write_text("a photo of a {} square.\n{} noise\n")
  report, out_dir, text = evaluate_tasks.run(
      "zeroshot", model_dir, out_dir=tmp_path / "out", dataset=str(root),
      templates_file=str(templates), batch_size=4)
  files = sorted(str(p) for p in root.glob("*/*.png"))
  labels = np.repeat(np.arange(3), 3)
  prompts = [[f"a photo of a {c} square.", f"{c} noise"]
             for c in ("blue", "green", "red")]
  images, texts = embed_one_by_one(model, files,
                                   [p for ps in prompts for p in ps])
  classes = np.stack([ref_class(texts[2 * k:2 * k + 2], CURV)
                      for k in range(3)])
  scores = -np.array([[ref_dist(x, y, CURV) for y in classes]
                      for x in images])
  assert_no_near_ties(scores, enumerate(labels))
  preds = scores.argmax(axis=1)
  recalls = [np.mean(preds[labels == k] == k) for k in range(3)]
  assert report["top1"] == pytest.approx(np.mean(preds == labels))
  assert report["mean_per_class_recall"] == pytest.approx(np.mean(recalls))
  assert report["top5"] == 1.0 and report["n"] == 9
  confusion = np.zeros((3, 3), int)
  np.add.at(confusion, (labels, preds), 1)
  np.testing.assert_array_equal(report["confusion"], confusion)
  assert "Zero-shot" in text and report["pooling"] == "mean"
  assert {p.name for p in Path(out_dir).iterdir()} == {
      "report.json", "report.md", "confusion_matrix.png"}

  # Nearest pooling: each class scores by its best prompt.
  report, _, text = evaluate_tasks.run(
      "zeroshot", model_dir, out_dir=tmp_path / "nearest", dataset=str(root),
      templates_file=str(templates), batch_size=4, pooling="nearest")
  scores = -np.array([[min(ref_dist(x, texts[2 * k + j], CURV)
                           for j in range(2)) for k in range(3)]
                      for x in images])
  assert_no_near_ties(scores, enumerate(labels))
  preds = scores.argmax(axis=1)
  assert report["pooling"] == "nearest" and " nearest " in text
  assert report["top1"] == pytest.approx(np.mean(preds == labels))
  confusion = np.zeros((3, 3), int)
  np.add.at(confusion, (labels, preds), 1)
  np.testing.assert_array_equal(report["confusion"], confusion)


def test_unreadable_image_fails_with_its_name_or_is_skipped_and_counted(
    tmp_path, model_dir):
  root = make_folder(tmp_path / "data", ["blue", "red"], per_class=2)
  bad = root / "red" / "broken.jpg"
  bad.write_bytes(b"\xff\xd8 not a jpeg")
  with pytest.raises(labelled_images.UnreadableImage,
                     match=f"unreadable image {bad}.*--skip_unreadable"):
    evaluate_tasks.run("zeroshot", model_dir, out_dir=tmp_path / "o1",
                       dataset=str(root))
  report, _, _ = evaluate_tasks.run(
      "zeroshot", model_dir, out_dir=tmp_path / "o2", dataset=str(root),
      skip_unreadable=True)
  assert report["n"] == 4
  assert len(report["skipped"]) == 1 and str(bad) in report["skipped"][0]


def test_retrieval_on_a_karpathy_file_matches_the_reference(tmp_path,
                                                            model_dir, model):
  names = ["blue", "green", "red"]
  images_dir = tmp_path / "img"
  images_dir.mkdir()
  entries = []
  for k, name in enumerate(names):
    (images_dir / f"{name}.png").write_bytes(png(COLOURS[name], k))
    entries.append({"filename": f"{name}.png", "split": "test",
                    "sentences": [{"raw": f"a {name} square"},
                                  {"raw": f"noise in {name}"}]})
  captions_file = tmp_path / "dataset_x.json"
  captions_file.write_text(json.dumps({"images": entries}))
  report, _, _ = evaluate_tasks.run(
      "retrieval", model_dir, out_dir=tmp_path / "out",
      captions_file=str(captions_file), images_dir=str(images_dir))
  texts = [s["raw"] for e in entries for s in e["sentences"]]
  owner = np.repeat(np.arange(3), 2)
  images, caps = embed_one_by_one(
      model, [images_dir / f"{n}.png" for n in names], texts)
  scores = -np.array([[ref_dist(x, t, CURV) for t in caps] for x in images])
  assert_no_near_ties(scores.T, enumerate(owner))
  t2i = [int(np.sum(scores[:, j] > scores[owner[j], j])) for j in range(6)]
  i2t = [min(int(np.sum(scores[i] > scores[i, j])) for j in (2 * i, 2 * i + 1))
         for i in range(3)]
  assert report["t2i"]["R@1"] == pytest.approx(np.mean(np.array(t2i) < 1))
  assert report["i2t"]["R@1"] == pytest.approx(np.mean(np.array(i2t) < 1))
  assert report["t2i"]["R@5"] == 1.0 and report["captions"] == 6


def test_unsafe_prompts_on_a_safe_unsafe_folder_matches_the_reference(
    tmp_path, model_dir, model):
  root = tmp_path / "data"
  make_folder(root, ["blue", "red"], per_class=3)
  (root / "blue").rename(root / "safe")
  (root / "red").rename(root / "unsafe")
  safe_file, unsafe_file = tmp_path / "s.txt", tmp_path / "u.txt"
  safe_file.write_text("a calm blue photo\na photo\n")
  unsafe_file.write_text("# comment\na red bloody photo\n")
  report, _, text = evaluate_tasks.run(
      "unsafe_prompts", model_dir, out_dir=tmp_path / "out",
      dataset=str(root), safe_prompts=str(safe_file),
      unsafe_prompts=str(unsafe_file))
  files = sorted(root.glob("safe/*.png")) + sorted(root.glob("unsafe/*.png"))
  images, prompts = embed_one_by_one(
      model, files, ["a calm blue photo", "a photo", "a red bloody photo"])
  d = np.array([[ref_dist(x, p, CURV) for p in prompts] for x in images])
  score = d[:, :2].min(axis=1) - d[:, 2]
  assert np.abs(score).min() > 1e-5 * np.abs(d).max()
  labels = np.r_[np.zeros(3), np.ones(3)].astype(bool)
  row = report["modalities"]["image"]
  assert row["prompt"]["accuracy"] == pytest.approx(
      np.mean((score > 0) == labels))
  assert report["prompts"]["unsafe"] == ["a red bloody photo"]
  assert "note" in report  # no bounds: no accuracy at b'
  assert "prompt" in text and "distance" in text


# --- the command line -----------------------------------------------------


def run_eval(*args, cwd=ROOT):
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  return subprocess.run([sys.executable, str(ROOT / "eval.py"), *args],
                        capture_output=True, text=True, cwd=cwd, env=env,
                        timeout=600)


@pytest.mark.slow
def test_cli_zeroshot_on_synthetic_colours_and_errors_in_one_line(
    tmp_path, model_dir):
  out = tmp_path / "out"
  done = run_eval("--model", str(model_dir), "--task", "zeroshot",
                  "--dataset", "synthetic_visu:colour", "--max_examples",
                  "40", "--out", str(out))
  assert done.returncode == 0, done.stderr
  report = json.loads((out / "report.json").read_text())
  assert report["num_classes"] == 5 and report["n"] == 40
  assert report["chance_top1"] == pytest.approx(0.2)
  assert report["prompts_per_class"] == [72] * 5
  assert report["pooling"] == "nearest"  # the synthetic captions' default
  assert "Zero-shot classification" in done.stdout

  done = run_eval("--model", str(model_dir), "--task", "zeroshot",
                  "--dataset", "synthetic_visu:colour", "--prompt_pooling",
                  "max")
  assert done.returncode == 2 and "Traceback" not in done.stderr
  assert done.stderr.strip().splitlines()[-1].startswith(
      "eval.py: error: ") and "prompt_pooling" in done.stderr

  root = make_folder(tmp_path / "data", ["red"], per_class=1)
  (root / "blue").mkdir()
  done = run_eval("--model", str(model_dir), "--task", "zeroshot",
                  "--dataset", str(root))
  assert done.returncode == 1
  lines = done.stderr.strip().splitlines()
  assert lines[-1] == (f"eval.py: error: class folder {root}/blue holds no "
                       "image (.jpg, .jpeg, .png, .bmp, .gif, .webp, .tif, "
                       ".tiff)")
  assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_cli_report_and_zeroshot_tables_in_one_call(tmp_path):
  """--zeroshot after the report: every table from one call, each zero-shot
  report in its default directory; --zeroshot with another task is a usage
  error in one line."""
  source = tiny_runs.save_converted(tmp_path / "model", seed=3,
                                    lora_b_scale=0.2, curv=CURV, alpha=0.5)
  out = tmp_path / "out"
  done = run_eval("--model", str(source), "--config",
                  str(ROOT / "configs" / "tiny.py"),
                  f"--config.data.data_dir={tmp_path / 'tfds'}",
                  "--config.data.synthetic_sizes=(8,8,24)", "--out", str(out),
                  "--zeroshot", "synthetic_visu:shape,synthetic_visu:colour")
  assert done.returncode == 0, done.stderr
  assert json.loads((out / "report.json").read_text())["split"] == "test"
  for attribute, classes in (("shape", 4), ("colour", 5)):
    report = json.loads((source / "eval" / f"zeroshot-synthetic_visu_"
                         f"{attribute}" / "report.json").read_text())
    assert report["num_classes"] == classes and report["n"] == 24
  assert done.stdout.count("Zero-shot classification") == 2
  assert "Retrieval recall" in done.stdout
  done = run_eval("--model", str(source), "--task", "retrieval",
                  "--zeroshot", "synthetic_visu:shape")
  assert done.returncode == 2
  assert done.stderr.strip().splitlines()[-1].startswith(
      "eval.py: error: --zeroshot goes with --task report")


@pytest.mark.slow
def test_cli_unsafe_prompts_on_the_configs_visu_split(tmp_path, model_dir):
  out = tmp_path / "out"
  done = run_eval("--model", str(model_dir), "--config",
                  str(ROOT / "configs" / "tiny.py"),
                  f"--config.data.data_dir={tmp_path / 'tfds'}",
                  "--config.data.synthetic_sizes=(8,8,24)",
                  "--task", "unsafe_prompts", "--out", str(out))
  assert done.returncode == 0, done.stderr
  report = json.loads((out / "report.json").read_text())
  assert set(report["modalities"]) == {"text", "image"}
  assert report["modalities"]["image"]["n_safe"] == 24
  assert report["prompts_source"] == {"safe": "shipped", "unsafe": "shipped"}


def test_synthetic_classification_view_labels_the_drawn_scenes():
  from hysac_jax.data import synthetic
  images, labels, classes = synthetic.classification_view("shape", "test",
                                                          6, seed=3)
  for i in range(6):
    ex = synthetic.make_quadruple(3, "test", i, 32)
    assert classes[labels[i]] == ex["scene"].shape
    np.testing.assert_array_equal(images[i], ex["safe_image"])
  prompts = synthetic.class_prompts("colour")
  assert list(prompts) == list(synthetic.COLOURS)
  for colour, captions in prompts.items():
    assert len(captions) == len(set(captions)) == 72
    assert all(f" {colour} " in c for c in captions)


def test_bad_inputs_fail_before_the_model_loads(tmp_path):
  """An empty directory is no model: each error below comes first."""
  not_a_model = tmp_path / "empty"
  not_a_model.mkdir()
  root = make_folder(tmp_path / "data", ["red"], per_class=1)
  (root / "blue").mkdir()
  with pytest.raises(ValueError, match="class folder .*/blue holds no image"):
    evaluate_tasks.run("zeroshot", not_a_model, dataset=str(root))
  (root / "blue" / "0.png").write_bytes(png(COLOURS["blue"], 0))
  with pytest.raises(ValueError, match="unknown prompt pooling 'max'"):
    evaluate_tasks.run("zeroshot", not_a_model, dataset=str(root),
                       pooling="max")
  prompts = tmp_path / "p.json"
  prompts.write_text(json.dumps({"prompts": {"red": ["a red one"]}}))
  with pytest.raises(ValueError, match="class 'blue' has no prompt"):
    evaluate_tasks.run("zeroshot", not_a_model, dataset=str(root),
                       prompts_file=str(prompts))
  with pytest.raises(FileNotFoundError, match="unsafe_prompts file"):
    evaluate_tasks.run("unsafe_prompts", not_a_model, dataset=str(root),
                       unsafe_prompts=str(tmp_path / "missing.txt"))
  with pytest.raises(FileNotFoundError, match="class folder .*/safe does"):
    evaluate_tasks.run("unsafe_prompts", not_a_model, dataset=str(root))
