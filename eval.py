"""Evaluates HySAC: recall tables, safety retrieval, unsafe classification.

  python eval.py --workdir runs/tiny                       # a training run
  python eval.py --workdir runs/tiny --split validation
  python eval.py --model converted/ --config configs/vitl14.py   # converted

Prints the report and writes WORKDIR/eval/<split>/ (report.json, report.md,
distance histograms, Poincaré-disk view, ROC curves). Bounds come from the
run's bounds.json (validation split) when there is one.

  python eval.py --workdir runs/tiny --zeroshot synthetic_visu:shape,synthetic_visu:colour

adds zero-shot tables after the report, with the model loaded once (what
`make demo` runs); each goes to <model>/eval/zeroshot-<dataset>/.

Other tasks (hysac_jax/evaluate_tasks.py; reports in
<model>/eval/<task>-<dataset>/ unless --out):

  python eval.py --workdir runs/tiny --task zeroshot --dataset synthetic_visu:shape
  python eval.py --model DIR --task zeroshot --dataset cifar10 --data_dir ~/tensorflow_datasets
  python eval.py --model DIR --task zeroshot --dataset /data/images   # DIR/<class>/*.jpg
  python eval.py --model DIR --task retrieval --captions dataset_coco.json --images /data/coco
  python eval.py --workdir runs/tiny --task unsafe_prompts            # the config's ViSU split
  python eval.py --model DIR --task unsafe_prompts --dataset DIR      # DIR/safe, DIR/unsafe

Exit codes (hysac_jax/cli.py): 0 success; 1 an expected failure, in one line
`eval.py: error: ...` (a run without checkpoints, a corrupt checkpoint or
bounds.json, a bad config field, a missing manual_dir); 2 bad flags (an
unknown flag or config field, a missing --config file, --split nonsense).
Nothing is written into the run directory except eval/.
"""

import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from hysac_jax import checkpoint as ckpt_lib
from hysac_jax import cli
from hysac_jax import evaluate_run
from hysac_jax import evaluate_tasks
from hysac_jax.evaluation import zeroshot

PROG = "eval.py"

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file; default: the run's saved config.json.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "A training run directory.")
_MODEL = flags.DEFINE_string(
    "model", None, "Any other model directory: converted or exported"
    " (see hysac_jax.serving); needs --config for the data.")
_SPLIT = flags.DEFINE_enum("split", "test", evaluate_run.SPLITS,
                           "Split to evaluate.")
_CHECKPOINT = flags.DEFINE_enum(
    "checkpoint", ckpt_lib.BEST_RECALL, ckpt_lib.KINDS,
    "Which checkpoint of a run: best by recall sum, best by validation loss,"
    " or the latest.")
_ALPHA = flags.DEFINE_float(
    "traversal_alpha", None, "alpha of the safety-traversal threshold; "
    "default: config.eval.traversal_alpha.")
_OUT = flags.DEFINE_string("out", None,
                           "Output directory; default WORKDIR/eval/SPLIT.")
_TASK = flags.DEFINE_enum(
    "task", "report", ("report",) + evaluate_tasks.TASKS,
    "report: the ViSU report (default); zeroshot: classification of "
    "--dataset; retrieval: multi-caption recall over --captions; "
    "unsafe_prompts: prompt-based vs distance-based unsafe classification.")
_DATASET = flags.DEFINE_string(
    "dataset", None, "zeroshot / unsafe_prompts: synthetic_visu:shape|colour,"
    " a TFDS name or prepared directory, or an image folder DIR/<class>/.")
_ZEROSHOT = flags.DEFINE_list(
    "zeroshot", [], "report: then classify these datasets zero-shot too "
    "(comma-separated, as --dataset of --task zeroshot), with the model "
    "loaded once: one call for the report and every zero-shot table.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data directory.")
_CAPTIONS = flags.DEFINE_string(
    "captions", None, "retrieval: Karpathy-split JSON or COCO "
    "annotations/captions_*.json.")
_IMAGES = flags.DEFINE_string("images", None, "retrieval: images directory.")
_PROMPTS = flags.DEFINE_string(
    "prompts", None, "zeroshot: JSON {'prompts': {class: [...]}} or "
    "{'templates': [...], 'classes': [...]}.")
_TEMPLATES = flags.DEFINE_string(
    "templates", None, "zeroshot: text file, one template a line with {}.")
_POOLING = flags.DEFINE_enum(
    "prompt_pooling", None, zeroshot.POOLINGS,
    "zeroshot: mean: a class is its prompts' mean (CLIP's prompt ensemble); "
    "nearest: a class scores by its nearest prompt. Default: nearest for "
    "synthetic_visu (its prompts are every caption of a class), mean "
    "otherwise.")
_SAFE_PROMPTS = flags.DEFINE_string(
    "safe_prompts", None, "unsafe_prompts: safe prompts, one a line "
    "(default: the shipped set).")
_UNSAFE_PROMPTS = flags.DEFINE_string(
    "unsafe_prompts", None, "unsafe_prompts: unsafe prompts, one a line "
    "(default: the shipped set).")
_MARGIN = flags.DEFINE_float(
    "margin", 0.0, "unsafe_prompts: unsafe iff (nearest safe − nearest "
    "unsafe prompt distance) > margin; 0 = nearest prompt is unsafe.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Images per encoder call.")
_SKIP = flags.DEFINE_bool(
    "skip_unreadable", False, "Leave unreadable images out (listed, "
    "counted) instead of failing.")
_MAX = flags.DEFINE_integer("max_examples", None,
                            "Evaluate only the first N images.")


def main(argv):
  if len(argv) > 1:
    return cli.fail(PROG, f"unexpected arguments: {argv[1:]}",
                    cli.EXIT_USAGE)
  logging.set_verbosity(logging.WARNING)
  if bool(_WORKDIR.value) == bool(_MODEL.value):
    return cli.fail(PROG, "give exactly one of --workdir or --model",
                    cli.EXIT_USAGE)
  from hysac_jax import compilation_cache
  from hysac_jax import distributed
  from hysac_jax import finite
  from hysac_jax import outdir
  for flag, value in (("--traversal_alpha", _ALPHA.value),
                      ("--margin", _MARGIN.value)):
    if value is not None:  # fail closed: a NaN b' or margin says "safe"
      try:
        finite.check_number(value, "", flag)
      except finite.NonFiniteError as e:
        return cli.fail(PROG, e, cli.EXIT_USAGE)
  try:
    if _OUT.value:  # before any work, not after it
      outdir.check_writable(_OUT.value)
    config = _CONFIG.value
    if config is None:  # a run's own config, --workdir or --model
      config = evaluate_run.saved_config(
          _WORKDIR.value or _MODEL.value,
          "--workdir" if _WORKDIR.value else "--model")
    compilation_cache.enable(compilation_cache.DEFAULT_DIR if config is None
                             else config.train.compilation_cache_dir)
    distributed.initialize()  # Multi-host under Slurm, Open MPI, TPU pods.
    if _TASK.value != "report":
      if _ZEROSHOT.value:
        return cli.fail(PROG, "--zeroshot goes with --task report (the "
                        "default); use --dataset with --task zeroshot",
                        cli.EXIT_USAGE)
      return _run_task(config, _TASK.value, _DATASET.value, _OUT.value)
    source = os.path.abspath(os.path.expanduser(_WORKDIR.value
                                                or _MODEL.value))
    model = evaluate_tasks.LazyModel(lambda: evaluate_run.load(
        source, config, _CHECKPOINT.value))
    report, out_dir = evaluate_run.run(
        config=config, workdir=_WORKDIR.value, model_dir=_MODEL.value,
        split=_SPLIT.value, checkpoint=_CHECKPOINT.value, out_dir=_OUT.value,
        traversal_alpha=_ALPHA.value, model=model)
    from hysac_jax import evaluation
    print(evaluation.format_console(report))
    print(_evaluated_line(report.get("evaluated")))
    print(f"report written to {os.path.abspath(out_dir)}", flush=True)
    for dataset in _ZEROSHOT.value:
      _run_task(config, "zeroshot", dataset, out_dir=None, model=model)
  except (ValueError, OSError, ConnectionError) as e:
    # ValueError: bad config values, corrupt checkpoints (CheckpointError),
    # bounds and model directories; OSError: missing files.
    return cli.fail(PROG, e)
  return 0


def _evaluated_line(evaluated):
  """"evaluated: best_recall checkpoint, step 384 (...)" for the console."""
  if not evaluated:
    return "evaluated: the model directory's weights"
  line = (f"evaluated: {evaluated['checkpoint_kind']} checkpoint, step "
          f"{evaluated['step']}")
  if evaluated.get("training"):
    line += (f" (the run was still training: {evaluated.get('trainer')}; "
             "a later checkpoint may differ)")
  return line


def _run_task(config, task, dataset, out_dir, model=None):
  """A task other than the ViSU report (hysac_jax/evaluate_tasks.py) on
  `dataset`; `out_dir` None writes the task's default directory, `model`
  is one already loaded (--zeroshot)."""
  common = dict(batch_size=_BATCH.value, skip_unreadable=_SKIP.value,
                max_examples=_MAX.value)
  if task == "zeroshot":
    kwargs = dict(dataset=dataset, split=_SPLIT.value, config=config,
                  data_dir=_DATA_DIR.value, prompts_file=_PROMPTS.value,
                  templates_file=_TEMPLATES.value, pooling=_POOLING.value,
                  **common)
  elif task == "retrieval":
    kwargs = dict(captions_file=_CAPTIONS.value, images_dir=_IMAGES.value,
                  split=_SPLIT.value, **common)
  else:
    kwargs = dict(dataset=dataset, split=_SPLIT.value, config=config,
                  data_dir=_DATA_DIR.value, safe_prompts=_SAFE_PROMPTS.value,
                  unsafe_prompts=_UNSAFE_PROMPTS.value, margin=_MARGIN.value,
                  traversal_alpha=_ALPHA.value, **common)
  _, out_dir, text = evaluate_tasks.run(
      task, _WORKDIR.value or _MODEL.value, out_dir=out_dir,
      checkpoint=_CHECKPOINT.value, model=model, **kwargs)
  print(text)
  print(f"report written to {os.path.abspath(out_dir)}")
  return 0


if __name__ == "__main__":
  app.run(main, flags_parser=cli.absl_flags_parser(PROG))
