"""Orbax checkpoints of a training run: the store, which knows no model.

A run directory holds three Orbax managers:

  checkpoints/<step>/   the last `keep_last` checkpoints (resume from here)
  best_loss/<step>/     the checkpoint with the lowest validation loss
  best_recall/<step>/   the checkpoint with the highest validation recall sum

Each checkpoint has three items: `state` (a pytree of arrays: trainable params,
optimizer state, step, RNG key), `data` (the input iterator's state, JSON) and
`meta` (epoch, early-stopping counters and metrics, JSON). Orbax writes into a
temporary directory and renames it when complete, so a crash mid-save never
leaves a checkpoint that looks finished.

The store receives pytrees and returns them; restoring a run's model (which
rebuilds the frozen weights from its config) is `hysac_jax.training.restore`.
"""

import gc
import logging
import math
import os
import re
import shutil
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from hysac_jax import cli
from hysac_jax.formats.run_dir import (BEST_LOSS, BEST_RECALL,
                                       CHECKPOINT_KINDS, LAST)

# The checkpoint kinds a run holds, as CLIs offer them (best first).
KINDS = CHECKPOINT_KINDS
SET_ASIDE = "unreadable"  # WORKDIR/unreadable/<kind>-<step>-<time>/


class CheckpointError(cli.CLIError, ValueError):
  """A checkpoint step that cannot be read (truncated or damaged files).

  Attributes:
    path: the step directory, e.g. RUN/best_recall/384.
    kind: LAST, BEST_LOSS or BEST_RECALL.
    step: the step.
  """

  def __init__(self, path, cause, kind=None, step=None):
    super().__init__(f"checkpoint {path} cannot be restored: {cause}",
                     cli.EXIT_ERROR)
    self.path, self.cause, self.kind, self.step = path, cause, kind, step


def saved_steps(workdir, kind=LAST):
  """Finished steps under workdir/kind, ascending, without opening Orbax
  (so nothing is created or cleaned up)."""
  directory = os.path.join(workdir, kind)
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory)
                if name.isdigit()
                and os.path.isdir(os.path.join(directory, name)))


def call_quietly(fn):
  """(fn(), None), or (None, one line naming the innermost error).

  When one array read fails, Orbax's `asyncio.gather` raises and leaves the
  other read coroutines unfinished; Python reports each of them when it
  frees them ("Exception ignored in: <coroutine
  _read_array_index_and_device_put>", "Event loop is closed"), often after
  the program's own error. Here the error is reduced to a line, its
  traceback (which holds those coroutines) dropped, and they are freed at
  once with their reports muted; the reports of those freed later still,
  and of TensorStore's late completions, are filtered from then on
  (`silence_failed_restore_reports`).
  """
  previous = sys.unraisablehook
  sys.unraisablehook = lambda unraisable: None
  # Freed tasks that still hold an exception are also logged by asyncio
  # ("Task exception was never retrieved", with a traceback).
  asyncio_logger = logging.getLogger("asyncio")
  was_disabled = asyncio_logger.disabled
  asyncio_logger.disabled = True
  failed = False
  try:
    try:
      return fn(), None
    except Exception as e:  # pylint: disable=broad-except
      cause = root_cause(e)
    gc.collect()
    failed = True
    return None, cause
  finally:
    sys.unraisablehook = previous
    asyncio_logger.disabled = was_disabled
    if failed:
      silence_failed_restore_reports()


class CheckpointWriteError(cli.CLIError, OSError):
  """A checkpoint that could not be written (a full disk, say): one line."""


def save_quietly(fn, what):
  """Runs the Orbax write `fn()`; a failure becomes one
  `CheckpointWriteError` line naming `what` and the innermost cause.

  Orbax logs each failed write thread's traceback through absl ("ERROR:absl
  ... Traceback") before it re-raises; those are muted here, so a full disk
  is one line, not two or three thread tracebacks.
  """
  loggers = [logging.getLogger("absl"), logging.getLogger()]
  levels = [l.level for l in loggers]
  for l in loggers:
    l.setLevel(logging.CRITICAL)
  try:
    return fn()
  except Exception as e:  # pylint: disable=broad-except
    cause = root_cause(e)
    raise CheckpointWriteError(f"cannot write {what}: {cause}") from None
  finally:
    for l, level in zip(loggers, levels):
      l.setLevel(level)


TMP_SUFFIX = ".orbax-checkpoint-tmp"


def remove_tmp_dirs(directory):
  """Removes the `*.orbax-checkpoint-tmp*` step directories a failed or
  killed save left in `directory` (Orbax leaves them beside best_* steps);
  notes each on stderr. Returns the removed paths."""
  if not os.path.isdir(directory):
    return []
  removed = [os.path.join(directory, e) for e in sorted(os.listdir(directory))
             if TMP_SUFFIX in e]
  for path in removed:
    shutil.rmtree(path, ignore_errors=True)
  if removed:
    print(f"note: removed {len(removed)} unfinished checkpoint(s) left by an "
          f"earlier save: {', '.join(removed)}", file=sys.stderr, flush=True)
  return removed


def _manager(directory, max_to_keep, read_only=False):
  # Read-only: no directory is created and no temporary one is cleaned up,
  # so evaluating or exporting a run leaves it as it was.
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=not read_only,
      enable_async_checkpointing=False,
      cleanup_tmp_directories=not read_only)
  return ocp.CheckpointManager(directory, options=options)


# TensorStore errors read "CODE: message", CODE an absl status name.
_TENSORSTORE_STATUS = re.compile(r"^[A-Z][A-Z_]+: ")
# How Orbax wraps any error of one array read (orbax-checkpoint 0.12).
_ORBAX_READ_ERROR = "Encountered error while reading array index"


def _is_abandoned_read_error(exc):
  """Whether `exc` is a report of a restore that already failed.

  That is "Event loop is closed" (a TensorStore thread completing a read
  after Orbax closed its loop), Orbax's wrapper of a read that failed or
  was closed while pending ("Encountered error while reading array index"),
  or an error whose chain holds a TensorStore status error
  ("OUT_OF_RANGE: ...").
  """
  if type(exc) is RuntimeError and str(exc) == "Event loop is closed":  # pylint: disable=unidiomatic-typecheck
    return True
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    text = str(exc)
    if (_TENSORSTORE_STATUS.match(text)
        or text.startswith(_ORBAX_READ_ERROR)):
      return True
    exc = exc.__cause__ or exc.__context__
  return False


class _AbandonedReadFilter(logging.Filter):
  """Drops asyncio's "... exception was never retrieved" records of a
  failed restore's other reads; other asyncio records pass."""

  def filter(self, record):
    exc = record.exc_info[1] if record.exc_info else None
    return not (exc is not None and _is_abandoned_read_error(exc))


def silence_failed_restore_reports():
  """Drops the late reports of a failed Orbax restore's other reads.

  When one array read fails, Orbax's `asyncio.gather` raises and abandons
  the other reads. They report long after the program's one-line error,
  some at interpreter exit, through four channels:
  - "Exception ignored in: <coroutine _read_array_index_and_device_put>"
    (sys.unraisablehook), when a coroutine holding the error is freed;
  - "Event loop is closed" (threading.excepthook, sys.excepthook), when a
    TensorStore thread completes a read on Orbax's closed loop;
  - "Future/Task exception was never retrieved" (the asyncio logger).
  Installed once a restore has failed, this filters exactly those errors
  (`_is_abandoned_read_error`); any other error still prints.
  """

  def quiet(hook, exc_of):
    if getattr(hook, "_hysac_quiet", False):
      return hook

    def filtered(*args):
      if not _is_abandoned_read_error(exc_of(*args)):
        hook(*args)

    filtered._hysac_quiet = True  # pylint: disable=protected-access
    return filtered

  # Each hook is wrapped once; a hook replaced since (e.g. by a test) is
  # wrapped again.
  sys.excepthook = quiet(sys.excepthook, lambda t, e, tb: e)
  threading.excepthook = quiet(threading.excepthook, lambda a: a.exc_value)
  sys.unraisablehook = quiet(sys.unraisablehook, lambda a: a.exc_value)
  asyncio_logger = logging.getLogger("asyncio")
  if not any(isinstance(f, _AbandonedReadFilter)
             for f in asyncio_logger.filters):
    asyncio_logger.addFilter(_AbandonedReadFilter())


def root_cause(error):
  """The innermost exception of a chain, as one short line.

  Orbax wraps a TensorStore error (e.g. "OUT_OF_RANGE: ... byte range")
  in a generic `Exception` whose message is a page of TensorStore spec.
  """
  seen = set()
  while id(error) not in seen:
    seen.add(id(error))
    inner = error.__cause__ or error.__context__
    if inner is None:
      break
    error = inner
  line = " ".join(str(error).split())
  if len(line) > 400:
    line = line[:400] + " ..."
  return f"{type(error).__name__}: {line}"


def _check_finite(tree, what):
  """Raises if any floating leaf holds NaN or Inf: never save such a state."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      # Multi-process: check the rows this process holds (every process
      # checks its own, so together they cover the array).
      arr = np.concatenate([np.ravel(s.data) for s in leaf.addressable_shards])
    else:
      arr = np.asarray(jax.device_get(leaf))
    if np.issubdtype(arr.dtype, np.floating):
      if not np.isfinite(arr).all():
        raise FloatingPointError(
            f"refusing to save {what}: {jax.tree_util.keystr(path)} holds "
            "NaN or Inf")


class RunCheckpoints:
  """The last-N and best-by-metric checkpoints of one run directory."""

  def __init__(self, workdir, keep_last=2, read_only=False):
    """Opens (and, unless `read_only`, creates) the three managers.

    `read_only=True` is for evaluation and export: nothing is created or
    cleaned up in `workdir`; `save` must not be called.
    """
    workdir = os.path.abspath(os.path.expanduser(workdir))
    self.workdir = workdir
    if not read_only:
      for kind in (LAST, BEST_LOSS, BEST_RECALL):
        remove_tmp_dirs(os.path.join(workdir, kind))
    self.managers = {
        LAST: _manager(os.path.join(workdir, LAST), keep_last, read_only),
        BEST_LOSS: _manager(os.path.join(workdir, BEST_LOSS), 1, read_only),
        BEST_RECALL: _manager(os.path.join(workdir, BEST_RECALL), 1,
                              read_only),
    }

  def save(self, step, state, data_state, meta, kind=LAST):
    """Saves `state` (pytree), `data_state` and `meta` (JSON-able) at `step`."""
    _check_finite(state, f"checkpoint {kind}/{step}")
    manager = self.managers[kind]
    if step in manager.all_steps():
      return
    def write():
      manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=ocp.args.JsonSave(data_state),
          meta=ocp.args.JsonSave(_json_safe(meta))))
      manager.wait_until_finished()

    try:
      save_quietly(write, f"checkpoint {os.path.join(self.workdir, kind)}/"
                   f"{step}")
    except CheckpointWriteError:
      remove_tmp_dirs(os.path.join(self.workdir, kind))  # no half step
      raise

  def latest_step(self, kind=LAST):
    return self.managers[kind].latest_step()

  def all_steps(self, kind=LAST):
    return sorted(self.managers[kind].all_steps())

  def set_aside(self, step, kind=LAST):
    """Moves an unreadable checkpoint to workdir/unreadable/ (never deletes
    it) so that the step can be saved again; returns the new path."""
    target = os.path.join(self.workdir, SET_ASIDE,
                          f"{kind}-{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(target), exist_ok=True)
      os.rename(os.path.join(self.workdir, kind, str(step)), target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"hysac_jax: set aside {step}")
    self.managers[kind].reload()
    return target

  def restore(self, abstract_state, step=None, kind=LAST):
    """Restores (state, data_state, meta); None when there is no checkpoint.

    Args:
      abstract_state: a pytree of `jax.ShapeDtypeStruct` (with shardings) or
        arrays giving the structure, dtypes and target placement; arrays are
        resharded onto it, so a run can resume on another device count.
      step: which step; the latest when None.
      kind: LAST, BEST_LOSS or BEST_RECALL.
    """
    manager = self.managers[kind]
    step = manager.latest_step() if step is None else step
    if step is None:
      return None
    abstract_state = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                                  abstract_state)
    # Orbax raises bare Exceptions; any failure here means the files on disk
    # do not hold the checkpoint.
    restored, cause = call_quietly(lambda: manager.restore(
        step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore())))
    if cause is not None:
      raise CheckpointError(os.path.join(self.workdir, kind, str(step)),
                            cause, kind=kind, step=step)
    return restored.state, restored.data, restored.meta

  def close(self):
    for manager in self.managers.values():
      manager.close()


def _json_safe(tree):
  """Converts numpy / jax scalars (and non-finite floats) for JSON."""
  if isinstance(tree, dict):
    return {str(k): _json_safe(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [_json_safe(v) for v in tree]
  if hasattr(tree, "item") and np.ndim(tree) == 0:
    tree = tree.item()
  if isinstance(tree, float) and not math.isfinite(tree):
    return str(tree)
  return tree
