"""A training run's directory (train.py `--workdir`): its layout.

  config.json          the resolved config (`hysac_jax.config` writes and
                       reads it)
  checkpoints/<step>/  the last `keep_last` checkpoints (resume from here)
  best_loss/<step>/    the checkpoint with the lowest validation loss
  best_recall/<step>/  the checkpoint with the highest validation recall
  bounds.json          the bounds, when the run has ended (`safety`)

The Orbax store of the checkpoints is `hysac_jax.checkpoint`.
"""

import os

CONFIG_FILE = "config.json"
LAST, BEST_LOSS, BEST_RECALL = "checkpoints", "best_loss", "best_recall"
# The checkpoint kinds a run holds, as CLIs offer them (best first).
CHECKPOINT_KINDS = (BEST_RECALL, BEST_LOSS, LAST)


def is_run_config(meta):
  """Whether a parsed config.json is a training run's."""
  return isinstance(meta, dict) and "model" in meta and "train" in meta


def has_checkpoints(path):
  """Whether the run directory `path` has any checkpoint directory."""
  return any(os.path.isdir(os.path.join(path, d)) for d in CHECKPOINT_KINDS)
