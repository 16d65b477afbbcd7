"""A training run's directory (train.py `--workdir`): its layout.

  config.json          the resolved config (`write_config` / `read_config`
                       here; `hysac_jax.config` is its schema)
  checkpoints/<step>/  the last `keep_last` checkpoints (resume from here)
  best_loss/<step>/    the checkpoint with the lowest validation loss
  best_recall/<step>/  the checkpoint with the highest validation recall
  bounds.json          the bounds, when the run has ended (`safety`)

The Orbax store of the checkpoints is `hysac_jax.checkpoint`.
"""

import json
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


def write_config(workdir, config):
  """Writes `config` (an `ml_collections.ConfigDict`) as workdir/config.json,
  keys sorted; creates `workdir`."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def read_config(workdir):
  """`(parsed workdir/config.json, its path)`.

  Raises:
    FileNotFoundError: there is none (naming the flag that would help).
    ValueError: it is not valid JSON.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir!r} a training "
                            "run directory? (pass --config as well)")
  try:
    with open(path) as f:
      return json.load(f), path
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from None

