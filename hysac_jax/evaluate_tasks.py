"""The tasks of `eval.py --task`: zeroshot, retrieval, unsafe_prompts.

The glue between the command line, the data readers
(`data.labelled_images`, `data.coco_captions`), the model
(`evaluation.embed`) and the metrics (`evaluation.zeroshot`,
`evaluation.captions`, `evaluation.prompt_safety`). Inputs that can be
checked before loading the model and embedding (files, classes, prompts) are
checked first.

`--dataset` for zeroshot and unsafe_prompts:
  - `synthetic_visu:shape` / `synthetic_visu:colour`: the embedded set's
    classification view (test split; seed and size from the config when
    there is one);
  - a prepared TFDS dataset directory (holding `dataset_info.json`);
  - any other directory: an image-folder tree `DIR/<class>/*.jpg`;
  - otherwise a TFDS dataset name (`cifar10`, `imagenet2012`, ...) in
    `--data_dir`.
"""

from __future__ import annotations

import json
import os
import re

import importlib_resources
import jax
import numpy as np

from hysac_jax import config as config_lib
from hysac_jax import evaluate_run
from hysac_jax import finite
from hysac_jax import serving
from hysac_jax.data import coco_captions
from hysac_jax.data import labelled_images
from hysac_jax.evaluation import captions
from hysac_jax.evaluation import embed as embed_lib
from hysac_jax.evaluation import prompt_safety
from hysac_jax.evaluation import zeroshot

TASKS = ("zeroshot", "retrieval", "unsafe_prompts")
SHIPPED_CLASS_PROMPTS = ("imagenet2012", "cifar10", "cifar100")
GENERIC_TEMPLATE = "a photo of a {}."
SYNTHETIC_PREFIXES = ("synthetic_visu:", "synthetic:")


# --------------------------------------------------------------------------
# Class prompts.


def shipped_class_prompts(tfds_name):
  """(class names, templates) shipped for a TFDS builder name, or None."""
  base = str(tfds_name or "").split(":")[0]
  if base not in SHIPPED_CLASS_PROMPTS:
    return None
  path = importlib_resources.files("hysac_jax.data.assets") / "zeroshot" / (
      base + ".json")
  data = json.loads(path.read_text(encoding="utf-8"))
  return data["classes"], data["templates"]


def _fill(templates, name, where):
  bad = [t for t in templates if "{}" not in t]
  if bad:
    raise ValueError(f"template {bad[0]!r} in {where} has no '{{}}' for the "
                     "class name")
  return [t.replace("{}", name) for t in templates]


def class_prompts(class_names, tfds_name=None, prompts_file=None,
                  templates_file=None):
  """The prompts of each class, in label order, and where they come from.

  Sources, first match wins:
    - `prompts_file` (JSON): `{"prompts": {class: [prompt, ...]}}` (every
      dataset class needs a non-empty list), or `{"templates": [...],
      "classes": [...]}` (classes optional, in label order, renaming them);
    - `templates_file`: one template a line, `{}` for the class name;
    - the shipped set of a TFDS dataset (`tfds_name` imagenet2012,
      cifar10, cifar100) when its class count matches (label i gets
      shipped name i; TFDS's ImageNet names are WordNet ids);
    - the dataset's own class names (underscores as spaces) in
      "a photo of a {}.".

  Returns:
    (prompts: list of C lists of strings, display names: C strings,
    source: str).

  Raises:
    ValueError: a class without a prompt, naming it and the file.
  """
  names = [n.replace("_", " ") for n in class_names]
  if prompts_file:
    return _prompts_from_file(class_names, names, prompts_file)
  if templates_file:
    templates = prompt_safety.read_lines(templates_file, "template")
    return ([_fill(templates, n, templates_file) for n in names], names,
            templates_file)
  shipped = shipped_class_prompts(tfds_name)
  if shipped is not None and len(shipped[0]) == len(class_names):
    names, templates = shipped
    return ([_fill(templates, n, "shipped prompts") for n in names],
            list(names), f"shipped ({tfds_name})")
  return ([[GENERIC_TEMPLATE.format(n)] for n in names], names,
          f"generic ({GENERIC_TEMPLATE!r})")


def _prompts_from_file(class_names, names, prompts_file):
  """`class_prompts` of a prompt JSON file (per-class prompts, or templates
  with optional class names); `names` are the dataset's display names."""
  with open(prompts_file, encoding="utf-8") as f:
    try:
      data = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"prompt file {prompts_file} is not valid JSON: "
                       f"{e}") from None
  if isinstance(data, dict) and isinstance(data.get("prompts"), dict):
    out = []
    for raw in class_names:
      given = data["prompts"].get(raw)
      if given is None:
        given = data["prompts"].get(raw.replace("_", " "))
      given = [p for p in (given or []) if str(p).strip()]
      if not given:
        raise ValueError(f"class {raw!r} has no prompt in {prompts_file}")
      out.append([str(p) for p in given])
    return out, list(class_names), prompts_file
  if isinstance(data, dict) and data.get("templates"):
    if data.get("classes") is not None:
      if len(data["classes"]) != len(class_names):
        raise ValueError(f"{prompts_file} names {len(data['classes'])} "
                         f"classes; the dataset has {len(class_names)}")
      names = list(data["classes"])
    return ([_fill(data["templates"], n, prompts_file) for n in names],
            names, prompts_file)
  raise ValueError(f"prompt file {prompts_file} holds neither "
                   "{'prompts': {class: [...]}} nor {'templates': [...]}")


# --------------------------------------------------------------------------
# Datasets.


def _synthetic_attribute(dataset):
  for prefix in SYNTHETIC_PREFIXES:
    if dataset.startswith(prefix):
      return dataset[len(prefix):]
  return None


def open_image_set(dataset, split, model, config=None, data_dir=None,
                   classes=None):
  """`--dataset` as a `labelled_images.ImageSet` (module docstring).

  Only the synthetic view asks `model` for its image size (its images are
  drawn at that size); the others are opened before the model loads.
  """
  attribute = _synthetic_attribute(dataset)
  if attribute is not None:
    image_size = model.image_size
    data = (config or config_lib.base_config()).data
    sizes, seed = data.synthetic_sizes, data.synthetic_seed
    num = dict(zip(("train", "validation", "test"), sizes))[split]
    return labelled_images.from_synthetic(attribute, split, int(num),
                                          int(seed), image_size)
  path = os.path.expanduser(dataset)
  if os.path.isdir(path) and not labelled_images.is_tfds_dir(path):
    return labelled_images.from_folder(path, classes)
  image_set = labelled_images.from_tfds(path, split, data_dir)
  if classes is not None and image_set.class_names != list(classes):
    raise ValueError(f"TFDS dataset {dataset} has classes "
                     f"{image_set.class_names}, expected {list(classes)}")
  return image_set


def _prefix(image_set, max_examples):
  if max_examples and max_examples < len(image_set):
    return image_set.subset(range(max_examples))
  return image_set


def _slug(text):
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(
      os.path.normpath(str(text)))).strip("_") or "dataset"


def _note_skipped(skipped):
  if skipped:
    print(f"skipped {len(skipped)} unreadable image(s):")
    for message in skipped[:20]:
      print(f"  {message}")
    if len(skipped) > 20:
      print(f"  ... and {len(skipped) - 20} more (all in report.json)")


# --------------------------------------------------------------------------
# Tasks.


def run_zeroshot(model, dataset, split="test", config=None, data_dir=None,
                 prompts_file=None, templates_file=None, batch_size=None,
                 skip_unreadable=False, max_examples=None, pooling=None):
  """Zero-shot classification of `dataset`; returns the report dict.

  `pooling` (`zeroshot.POOLINGS`) combines each class's prompts; None takes
  "nearest" for the synthetic view's own captions (every caption of a
  class, one per scene: their mean blurs the classes together) and "mean"
  (CLIP's prompt ensemble) for templates and prompt files.
  """
  if pooling is not None:  # before the (lazy) model loads
    zeroshot.check_pooling(pooling)
  image_set = _prefix(open_image_set(dataset, split, model, config,
                                     data_dir), max_examples)
  attribute = _synthetic_attribute(dataset)
  if attribute is not None and not (prompts_file or templates_file):
    # TFDS is heavy: imported for the synthetic split only.
    from hysac_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    by_class = synthetic.class_prompts(attribute)
    prompts = [by_class[c] for c in image_set.class_names]
    names, source = image_set.class_names, "synthetic captions"
    default_pooling = "nearest"
  else:
    prompts, names, source = class_prompts(
        image_set.class_names, image_set.tfds_name, prompts_file,
        templates_file)
    default_pooling = "mean"
  flat = [p for group in prompts for p in group]
  text = embed_lib.embed_texts(model, flat, desc="prompts")
  bounds = np.cumsum([0] + [len(g) for g in prompts])
  emb, kept, skipped = embed_lib.embed_images(
      model, image_set, batch_size or embed_lib.IMAGE_BATCH, desc="images",
      skip_unreadable=skip_unreadable)
  report = zeroshot.evaluate_prompts(
      emb, image_set.labels[kept],
      [text[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])], names,
      model.curv, model.mode, pooling or default_pooling)
  report.update(dataset=str(dataset), split=split, prompts_source=source,
                prompts_per_class=[len(g) for g in prompts],
                skipped=skipped)
  _note_skipped(skipped)
  return report


def run_retrieval(model, captions_file, images_dir=None, split="test",
                  batch_size=None, skip_unreadable=False, max_examples=None):
  """Multi-caption retrieval over a COCO-style caption file."""
  data = coco_captions.read_captions(captions_file, images_dir, split)
  n_images = len(data.image_paths)
  if max_examples and max_examples < n_images:
    n_images = max_examples
  keep_caption = data.caption_image < n_images
  image_set = labelled_images.ImageSet(
      data.name, ["image"], np.zeros(n_images, np.int64),
      data.image_paths[:n_images],
      lambda i: labelled_images.read_file(data.image_paths[i]))
  emb, kept, skipped = embed_lib.embed_images(
      model, image_set, batch_size or embed_lib.IMAGE_BATCH, desc="images",
      skip_unreadable=skip_unreadable)
  # Captions of skipped images leave with them; image indices are remapped.
  new_index = np.full(n_images, -1, np.int64)
  new_index[kept] = np.arange(len(kept))
  owner = new_index[data.caption_image[keep_caption]]
  texts = [t for t, k in zip(data.captions, keep_caption) if k]
  texts = [t for t, o in zip(texts, owner) if o >= 0]
  owner = owner[owner >= 0]
  text_emb = embed_lib.embed_texts(model, texts, desc="captions")
  report = captions.evaluate(emb, text_emb, owner, model.curv, model.mode)
  report.update(dataset=str(captions_file), skipped=skipped)
  _note_skipped(skipped)
  return report


def _prompt_sets(safe_file, unsafe_file):
  prompts = prompt_safety.default_prompts()
  source = {"safe": "shipped", "unsafe": "shipped"}
  for side, path in (("safe", safe_file), ("unsafe", unsafe_file)):
    if path:
      prompts[side] = prompt_safety.read_prompts(path)
      source[side] = path
  return prompts, source


def _visu_groups(model, config, split):
  """{"text": (S, U), "image": (V, G)} embeddings of the config's split."""
  # The input pipeline (grain, TFDS) is heavy: imported when data is read.
  from hysac_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  if config is None:
    raise ValueError("the ViSU quadruples need a config (--config, or the "
                     "run's config.json); or pass --dataset DIR with safe/ "
                     "and unsafe/ folders")
  config_lib.check_config(config)
  pipeline.check_data(config.data)
  emb = evaluate_run.embed_split_groups(model, config, split)
  return {"text": (emb["S"], emb["U"]), "image": (emb["V"], emb["G"])}


def run_unsafe_prompts(model, dataset=None, split="test", config=None,
                       data_dir=None, safe_prompts=None, unsafe_prompts=None,
                       margin=0.0, batch_size=None, skip_unreadable=False,
                       max_examples=None, traversal_alpha=None):
  """Prompt-based vs distance-based unsafe classification.

  On `dataset` (a folder with safe/ and unsafe/, or a TFDS set with those
  two classes) for images, or on the config's ViSU split for text and
  images.
  """
  # Before any embedding: a NaN margin would call every item safe.
  finite.check_number(margin, "run_unsafe_prompts", "margin")
  prompts, source = _prompt_sets(safe_prompts, unsafe_prompts)
  skipped = []
  if dataset:
    image_set = _prefix(open_image_set(dataset, split, model, config,
                                       data_dir,
                                       classes=("safe", "unsafe")),
                        max_examples)
    emb, kept, skipped = embed_lib.embed_images(
        model, image_set, batch_size or embed_lib.IMAGE_BATCH,
        desc="images", skip_unreadable=skip_unreadable)
    labels = image_set.labels[kept]
    for side, label in (("safe", 0), ("unsafe", 1)):
      if not (labels == label).any():
        raise ValueError(f"no readable {side} image in {dataset}")
    groups = {"image": (emb[labels == 0], emb[labels == 1])}
    name = str(dataset)
  else:
    groups = _visu_groups(model, config, split)
    if max_examples:
      groups = {k: (s[:max_examples], u[:max_examples])
                for k, (s, u) in groups.items()}
    name = f"{config.data.name}/{split}"
  text = embed_lib.embed_texts(model, prompts["safe"] + prompts["unsafe"],
                               desc="prompts")
  n_safe = len(prompts["safe"])
  bounds = model.bounds
  alpha = (traversal_alpha if traversal_alpha is not None
           else model.traversal_alpha)
  report = prompt_safety.evaluate(groups, text[:n_safe], text[n_safe:],
                                  model.curv, model.mode, margin, bounds,
                                  alpha, prompts)
  report.update(dataset=name, split=split, prompts_source=source,
                bounds_source="model" if bounds is not None else None,
                skipped=skipped)
  if bounds is None and model.mode == "hyp":
    report["note"] = ("no bounds: the distance rule's accuracy at b' needs "
                      "the run's bounds.json; AUROC and best accuracy are "
                      "reported")
  _note_skipped(skipped)
  return report


def run(task, source, out_dir=None, checkpoint="best_recall", plots=True,
        model=None, **kwargs):
  """Loads the model at `source` (unless `model`, already loaded from it, is
  given), runs `task`, writes its report.

  Returns:
    (report, out_dir, console text).
  """
  if task not in TASKS:
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
  source = os.path.abspath(os.path.expanduser(source))
  if not os.path.isdir(source):
    raise FileNotFoundError(f"model directory {source} does not exist")
  _check_inputs(task, kwargs)
  if out_dir is None:  # SOURCE/eval/TASK-WHAT, WHAT known after the run
    evaluate_run.check_default_out(os.path.join(source, "eval"))
  if model is None:
    model = LazyModel(lambda: serving.load_model(source,
                                                  checkpoint=checkpoint))
  if task == "zeroshot":
    report = run_zeroshot(model, **kwargs)
    what, module = _slug(kwargs["dataset"]), zeroshot
  elif task == "retrieval":
    report = run_retrieval(model, **kwargs)
    what, module = _slug(kwargs["captions_file"]), captions
  else:
    report = run_unsafe_prompts(model, **kwargs)
    what = _slug(kwargs.get("dataset")
                 or report["dataset"].replace("/", "-"))
    module = prompt_safety
  report["source"] = source
  out_dir = out_dir or os.path.join(source, "eval", f"{task}-{what}")
  if jax.process_index() == 0:
    if module is zeroshot:
      zeroshot.write_report(report, out_dir, plots=plots)
    else:
      module.write_report(report, out_dir)
  return report, out_dir, module.format_console(report)


class LazyModel:
  """Loads the model at its first use, so that the inputs a task can check
  without it (folders, prompt and caption files) fail first, in seconds."""

  def __init__(self, load):
    self._load, self._model = load, None

  def __getattr__(self, name):
    if self._model is None:
      self._model = self._load()
    return getattr(self._model, name)


def _check_inputs(task, kwargs):
  """Fails before the model loads for files that are missing."""
  for key in ("prompts_file", "templates_file", "safe_prompts",
              "unsafe_prompts", "captions_file"):
    path = kwargs.get(key)
    if path and not os.path.isfile(os.path.expanduser(path)):
      raise FileNotFoundError(f"{key.replace('_file', '')} file {path} does "
                              "not exist")
  if task == "zeroshot" and not kwargs.get("dataset"):
    raise ValueError("--task zeroshot needs --dataset NAME_OR_DIR")
  if task == "retrieval" and not kwargs.get("captions_file"):
    raise ValueError("--task retrieval needs --captions JSON")
