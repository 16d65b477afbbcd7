"""Trains HySAC.

  python train.py --config configs/tiny.py --workdir runs/tiny
  python train.py --config configs/vitl14.py --workdir runs/vitl14 \
      --config.data.manual_dir=/data/visu --config.optim.lr=5e-5

Every config field can be overridden with --config.FIELD=VALUE. The resolved
config is saved as WORKDIR/config.json. A workdir that already holds
checkpoints is resumed (exactly: same batches, same dropout keys) when the
config keeps the fields that define the run (config.RESUME_MAY_CHANGE lists
those that may change); --noresume refuses it, --overwrite moves it to
WORKDIR.old-<time>/ and starts afresh.
WORKDIR/.lock keeps a second train.py off the same run.

Exit codes (hysac_jax/cli.py): 0 done, 1 an expected error (one line naming
the file, field or step), 2 a bad command line, 75 SIGTERM or SIGINT saved a
checkpoint (rerun to resume), 130 interrupted before anything was saved.
"""

import time

_START = time.perf_counter()  # start-up stages are timed from here

import os  # noqa: E402

from absl import app  # noqa: E402
from absl import logging  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from hysac_jax import cli  # noqa: E402
from hysac_jax import finite  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Run directory: checkpoints, logs, bounds.")
_INIT_FROM = flags.DEFINE_string(
    "init_from", None, "Start from a converted HySAC directory "
    "(python -m hysac_jax.convert ... --out DIR).")
_RESUME = flags.DEFINE_bool(
    "resume", None, "Continue from the latest checkpoint in --workdir "
    "(default: when there is one). --noresume starts afresh and fails if "
    "the workdir already has checkpoints.")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Move an existing run in --workdir to "
    "WORKDIR.old-<time>/ (nothing is deleted) and start afresh.")
_FALLBACK = flags.DEFINE_bool(
    "fallback_checkpoint", False, "On resume, if the latest checkpoint "
    "cannot be read, move it to WORKDIR/unreadable/ and resume from the "
    "previous one.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for multi-process "
    "runs on clusters without auto-detection (Slurm, Open MPI and TPU pods "
    "are detected).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "This process's index in [0, N).")
_DIST_TIMEOUT = flags.DEFINE_integer(
    "distributed_timeout", 300, "Seconds to wait for the coordinator and "
    "the other processes before failing.")


def train(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _WORKDIR.value.strip():
    raise app.UsageError("--workdir is empty: name the run directory")
  if _OVERWRITE.value and _RESUME.value:
    raise app.UsageError("--overwrite starts afresh: drop --resume")
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
  from hysac_jax import compilation_cache
  from hysac_jax import distributed
  from hysac_jax.training import loop as loop_lib
  startup = {"imports": time.perf_counter() - _START}
  compilation_cache.enable(_CONFIG.value.train.compilation_cache_dir)
  t = time.perf_counter()
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value,
                         _PROCESS_ID.value, timeout_s=_DIST_TIMEOUT.value)
  startup["distributed_init"] = time.perf_counter() - t
  try:
    summary = loop_lib.train_and_evaluate(
        _CONFIG.value, _WORKDIR.value, init_from=_INIT_FROM.value,
        resume=_RESUME.value, overwrite=_OVERWRITE.value,
        fallback_checkpoint=_FALLBACK.value, startup=startup)
  except KeyboardInterrupt:
    from hysac_jax import checkpoint
    steps = checkpoint.saved_steps(os.path.abspath(_WORKDIR.value))
    last = (f"the last checkpoint is step {steps[-1]}" if steps
            else "no checkpoint was saved")
    raise cli.CLIError(f"interrupted; {last} in {_WORKDIR.value}",
                       cli.EXIT_INTERRUPTED) from None
  import jax
  if jax.process_index() == 0:
    # Strict JSON: a best loss never reached (inf) is null, not Infinity.
    print(finite.dumps({k: v for k, v in summary.items() if k != "bounds"},
                       indent=2, default=str))
  return cli.EXIT_PREEMPTED if summary["preempted"] else cli.EXIT_OK


def main(argv):
  # A locked run or an unreadable checkpoint raise cli.CLIError; a NaN loss
  # raises loop_lib.TrainingDiverged, a FloatingPointError; a batch that does
  # not fit, step_lib.OutOfMemoryError.
  from hysac_jax.training import step as step_lib
  return cli.run_guarded(
      "train.py", train, argv,
      expected=(ValueError, OSError, FloatingPointError,
                step_lib.OutOfMemoryError))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=cli.absl_flags_parser("train.py"))
