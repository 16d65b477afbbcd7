"""Evaluates HySAC: recall tables, safety retrieval, unsafe classification.

  python eval.py --workdir runs/tiny                       # a training run
  python eval.py --workdir runs/tiny --split validation
  python eval.py --model converted/ --config configs/vitl14.py   # converted

Prints the report and writes WORKDIR/eval/<split>/ (report.json, report.md,
distance histograms, Poincaré-disk view, ROC curves). Bounds come from the
run's bounds.json (validation split) when there is one.

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
  from hysac_jax import config as config_lib
  try:
    config = _CONFIG.value
    if config is None and _WORKDIR.value:
      config = config_lib.load_run_config(_WORKDIR.value)
    compilation_cache.enable(compilation_cache.DEFAULT_DIR if config is None
                             else config.train.compilation_cache_dir)
    distributed.initialize()  # Multi-host under Slurm, Open MPI, TPU pods.
    report, out_dir = evaluate_run.run(
        config=_CONFIG.value, workdir=_WORKDIR.value, model_dir=_MODEL.value,
        split=_SPLIT.value, checkpoint=_CHECKPOINT.value, out_dir=_OUT.value,
        traversal_alpha=_ALPHA.value)
  except (ValueError, OSError, ConnectionError) as e:
    # ValueError: bad config values, corrupt checkpoints (CheckpointError),
    # bounds and model directories; OSError: missing files.
    return cli.fail(PROG, e)
  from hysac_jax import evaluation
  print(evaluation.format_console(report))
  print(f"report written to {os.path.abspath(out_dir)}")
  return 0


if __name__ == "__main__":
  app.run(main, flags_parser=cli.absl_flags_parser(PROG))
