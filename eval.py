"""Evaluates a HySAC run: `python eval.py --config configs/tiny.py --workdir runs/tiny`."""

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The training run to evaluate.")


def main(argv):
  del argv
  raise SystemExit("eval.py: evaluation lands with the eval.py issue.")


if __name__ == "__main__":
  app.run(main)
