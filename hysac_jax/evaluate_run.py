"""Evaluation of a training run or a converted model on a dataset split.

The glue behind eval.py: check the inputs (split, config, bounds), restore
the model, embed a split once, then hand the embeddings to
`hysac_jax.evaluation`. Everything that can be checked without embedding is
checked first, so a bad input fails in seconds, not after the embedding.
"""

import os

import jax
import numpy as np

from hysac_jax import checkpoint as ckpt_lib
from hysac_jax import config as config_lib
from hysac_jax import evaluation
from hysac_jax import finite
from hysac_jax import outdir
from hysac_jax import serving
from hysac_jax.evaluation import embed as embed_lib
from hysac_jax.formats import detect

SPLITS = ("train", "validation", "test")


def quadruple_encoder(model):
  """encode_fn for `embed_split` from a `serving.Model`."""
  def encode(batch):
    emb = {"S": model.encode_text(batch["safe_ids"]),
           "U": model.encode_text(batch["unsafe_ids"]),
           "V": model.encode_image(batch["safe_image"]),
           "G": model.encode_image(batch["unsafe_image"])}
    return {k: np.asarray(v) for k, v in emb.items()}, None
  return encode


def embed_split_groups(model, config, split):
  """{"S", "U", "V", "G": (N, D)} embeddings of the config's `split`
  through a served `model` (not `training.step.embed_quadruples`, one batch
  through one apply).

  `model`'s jitted encoders run on one device per process, so each
  process's batch is `eval_batch_size_per_device` (not that times the local
  devices, which would all land on the first one).
  """
  # The input pipeline (grain, TFDS) is heavy: imported when data is read.
  from hysac_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  pipeline.prepare(config.data, model.image_size)
  batches = pipeline.make_dataset(config.data, split, model.image_size,
                                  seed=config.seed, train=False,
                                  local_device_count=1,
                                  context_length=model.context_length)
  emb, _ = embed_lib.embed_split(quadruple_encoder(model), batches,
                                 desc=f"embedding {split}")
  return emb


# Its old name, still importable.
embed_quadruples = embed_split_groups


def saved_config(directory, flag):
  """The config a training run saved in `directory`, or None for another
  kind of model directory passed as --model (whose data config comes from
  --config). `flag` ("--workdir" or "--model") names it in errors: a
  --workdir must be a training run."""
  try:
    kind = detect.detect_kind(os.path.expanduser(directory))
  except detect.ModelDirError:
    if flag == "--workdir":  # load_run_config names what is missing
      return config_lib.load_run_config(directory)
    raise
  if kind == "run":
    return config_lib.load_run_config(directory)
  if flag == "--workdir":
    raise ValueError(f"--workdir {directory} holds a model of kind {kind!r}, "
                     f"not a training run: evaluate it with --model "
                     f"{directory} --config FILE (FILE gives the dataset)")
  return None


def check_default_out(path):
  """Raises `outdir.OutputExistsError` (one line naming `path`, suggesting
  --out) unless the default report directory `path` (SOURCE/eval/...) can
  be written: checked before the restore and the embedding, not after."""
  try:
    outdir.check_writable(path, "the default output directory")
  except outdir.OutputExistsError as e:
    raise outdir.OutputExistsError(
        f"{e}; pass --out DIR to write the report elsewhere") from None


def _check_inputs(config, workdir, model_dir, split):
  """(source directory, config): everything checked before the restore."""
  # The input pipeline (grain, TFDS) is heavy: imported when data is read.
  from hysac_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  if (workdir is None) == (model_dir is None):
    raise ValueError("give exactly one of workdir or model_dir")
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
  source = os.path.abspath(os.path.expanduser(workdir or model_dir))
  if not os.path.isdir(source):
    what = "is a file" if os.path.exists(source) else "does not exist"
    raise FileNotFoundError(
        f"{'--workdir' if workdir else '--model'} {source} {what}")
  if workdir is not None and config is None:
    config = config_lib.load_run_config(source)
  if config is None:
    raise ValueError("--model needs --config for the dataset to evaluate")
  config_lib.check_config(config)
  pipeline.check_data(config.data)
  return source, config


def load(source, config, checkpoint=ckpt_lib.BEST_RECALL):
  """The served model of a run or model directory, at the config's dtype."""
  return serving.load_model(source, checkpoint=checkpoint,
                            dtype=config.model.dtype)


def run(config=None, workdir=None, model_dir=None, split="test",
        checkpoint=ckpt_lib.BEST_RECALL, out_dir=None, plots=True,
        traversal_alpha=None, model=None):
  """Evaluates and writes the report; returns (report, out_dir).

  Args:
    config: ConfigDict, or None to use the run's saved config.json.
    workdir: a training run directory (checkpoints, bounds.json).
    model_dir: any other model directory `serving.load_model` reads.
    split: dataset split to embed and evaluate.
    checkpoint: which checkpoint of a run (`checkpoint.KINDS`).
    out_dir: where to write; default <workdir or model_dir>/eval/<split>.
    plots: write the PNG plots too.
    traversal_alpha: alpha of the traversal threshold; default
      `config.eval.traversal_alpha` (0.8, the release's, when unset).
    model: the `serving.Model` of the source, when the caller loaded it
      already (eval.py's --zeroshot uses it for both); else loaded here.
  """
  source, config = _check_inputs(config, workdir, model_dir, split)
  if out_dir is None:
    out_dir = os.path.join(source, "eval", split)
    check_default_out(out_dir)
  # The model's own bounds (a run's bounds.json, an export's head), read
  # before its weights: a bad bounds file fails before the slow restore.
  if model is None:
    model = load(source, config, checkpoint)
  bounds, bounds_path = model.bounds, model.bounds_source
  emb = embed_split_groups(model, config, split)
  if traversal_alpha is None:
    traversal_alpha = config.eval.traversal_alpha
  traversal_alpha = finite.check_number(  # fail closed: a NaN b' is "safe"
      traversal_alpha, "traversal_alpha", "")
  report = evaluation.evaluate(emb["S"], emb["U"], emb["V"], emb["G"],
                               model.curv, bounds=bounds, mode=model.mode,
                               alpha=traversal_alpha)
  report["split"] = split
  report["source"] = source
  # What was evaluated: a run's checkpoint kind and step, and whether its
  # train.py was still running (an intermediate checkpoint, then).
  report["evaluated"] = {k: v for k, v in model.source.items()
                         if k in ("checkpoint_kind", "step", "training",
                                  "trainer")} or None
  if bounds_path:
    report["bounds_source"] = bounds_path
  if jax.process_index() == 0:
    evaluation.write_report(report, out_dir,
                            embeddings=emb if plots else None, plots=plots)
  return report, out_dir
