"""Evaluates HySAC: recall tables, safety retrieval, unsafe classification.

  python eval.py --workdir runs/tiny                       # a training run
  python eval.py --workdir runs/tiny --split validation
  python eval.py --model converted/ --config configs/vitl14.py   # converted

Prints the report and writes WORKDIR/eval/<split>/ (report.json, report.md,
distance histograms, Poincaré-disk view, ROC curves). Bounds come from the
run's bounds.json (validation split) when there is one.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file; default: the run's saved config.json.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "A training run directory.")
_MODEL = flags.DEFINE_string(
    "model", None, "A converted HySAC directory (python -m hysac_jax.convert)"
    " instead of a training run; needs --config for the data.")
_SPLIT = flags.DEFINE_string("split", "test", "Split to evaluate.")
_CHECKPOINT = flags.DEFINE_enum(
    "checkpoint", "best_recall", ["best_recall", "best_loss", "checkpoints"],
    "Which checkpoint of a run: best by recall sum, best by validation loss,"
    " or the latest.")
_ALPHA = flags.DEFINE_float(
    "traversal_alpha", None, "alpha of the safety-traversal threshold; "
    "default: config.eval.traversal_alpha.")
_OUT = flags.DEFINE_string("out", None,
                           "Output directory; default WORKDIR/eval/SPLIT.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  if bool(_WORKDIR.value) == bool(_MODEL.value):
    raise app.UsageError("give exactly one of --workdir or --model")
  from hysac_jax import compilation_cache
  from hysac_jax import distributed
  from hysac_jax import evaluate_run
  from hysac_jax import trainer
  try:
    config = _CONFIG.value
    if config is None and _WORKDIR.value:
      config = trainer.load_run_config(_WORKDIR.value)
    compilation_cache.enable(compilation_cache.configured_dir(config))
    distributed.initialize()  # Multi-host under Slurm, Open MPI, TPU pods.
    report, out_dir = evaluate_run.run(
        config=_CONFIG.value, workdir=_WORKDIR.value, model_dir=_MODEL.value,
        split=_SPLIT.value, checkpoint=_CHECKPOINT.value, out_dir=_OUT.value,
        traversal_alpha=_ALPHA.value)
  except (ValueError, FileNotFoundError, ConnectionError) as e:
    print(f"eval.py: error: {e}", file=sys.stderr)
    return 1
  from hysac_jax import evaluation
  print(evaluation.format_console(report))
  print(f"report written to {os.path.abspath(out_dir)}")
  return 0


if __name__ == "__main__":
  app.run(main)
