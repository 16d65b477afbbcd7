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
from hysac_jax import evaluation
from hysac_jax import safety
from hysac_jax import trainer

SPLITS = ("train", "validation", "test")


def _model_encoder(model):
  """encode_fn for `trainer.embed_split` from a `convert.PretrainedHySAC`."""
  def encode(batch):
    emb = {"S": model.encode_text(batch["safe_ids"]),
           "U": model.encode_text(batch["unsafe_ids"]),
           "V": model.encode_image(batch["safe_image"]),
           "G": model.encode_image(batch["unsafe_image"])}
    return {k: np.asarray(v) for k, v in emb.items()}, None
  return encode


def _bounds_for(directory):
  """(bounds, path) from directory/bounds.json, or (None, None).

  Without a bounds file, `evaluation.evaluate` derives them from the
  evaluated split itself and says so in the report.
  """
  path = os.path.join(directory, "bounds.json")
  if os.path.exists(path):
    return safety.load_bounds(path), path
  return None, None


def run(config=None, workdir=None, model_dir=None, split="test",
        checkpoint=ckpt_lib.BEST_RECALL, out_dir=None, plots=True,
        traversal_alpha=None):
  """Evaluates and writes the report; returns (report, out_dir).

  Args:
    config: ConfigDict, or None to use the run's saved config.json.
    workdir: a training run directory (checkpoints, bounds.json).
    model_dir: a converted HySAC directory instead of a run.
    split: dataset split to embed and evaluate.
    checkpoint: which checkpoint of a run ("best_recall", "best_loss" or
      "checkpoints" for the latest).
    out_dir: where to write; default <workdir or model_dir>/eval/<split>.
    plots: write the PNG plots too.
    traversal_alpha: alpha of the traversal threshold; default
      `config.eval.traversal_alpha` (0.8, the release's, when unset).
  """
  from hysac_jax.data import pipeline
  if (workdir is None) == (model_dir is None):
    raise ValueError("give exactly one of workdir or model_dir")
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
  source = os.path.abspath(os.path.expanduser(workdir or model_dir))
  if not os.path.isdir(source):
    what = "is a file" if os.path.exists(source) else "does not exist"
    raise FileNotFoundError(
        f"{'--workdir' if workdir else '--model'} {source} {what}")
  # Checked before the (slow) restore and embedding.
  bounds, bounds_path = _bounds_for(source)
  if workdir is not None and config is None:
    config = trainer.load_run_config(source)
  if config is None:
    raise ValueError("--model needs --config for the dataset to evaluate")
  trainer.check_config(config)
  pipeline.check_data(config.data)
  if workdir is not None:
    workdir = source
    state, mesh, eval_step = trainer.restore_for_eval(config, workdir,
                                                      checkpoint)
    encode = trainer.state_encoder(state, mesh, eval_step)
    curv = trainer.curvature(state, config)
    mode = config.model.mode
    image_size = state.model.clip.vision.image_size
  else:
    from hysac_jax import convert
    model = convert.load_pretrained(source)
    encode = _model_encoder(model)
    curv, mode = model.curv, model.mode
    image_size = model.config.vision.image_size

  trainer.prepare_data(config.data, image_size)
  batches = pipeline.make_dataset(config.data, split, image_size,
                                  seed=config.seed, train=False)
  emb, _ = trainer.embed_split(encode, batches, desc=f"embedding {split}")
  if traversal_alpha is None:
    traversal_alpha = config.get("eval", {}).get("traversal_alpha",
                                                 safety.DEFAULT_ALPHA)
  report = evaluation.evaluate(emb["S"], emb["U"], emb["V"], emb["G"], curv,
                               bounds=bounds, mode=mode,
                               alpha=float(traversal_alpha))
  report["split"] = split
  report["source"] = source
  if bounds_path:
    report["bounds_source"] = bounds_path
  out_dir = out_dir or os.path.join(source, "eval", split)
  if jax.process_index() == 0:
    evaluation.write_report(report, out_dir,
                            embeddings=emb if plots else None, plots=plots)
  return report, out_dir
