"""Trains HySAC: `python train.py --config configs/tiny.py --workdir runs/tiny`."""

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and logs go.")


def main(argv):
  del argv
  raise SystemExit("train.py: training lands with the train.py issue; "
                   f"config {_CONFIG.value!r}, workdir {_WORKDIR.value!r}.")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
