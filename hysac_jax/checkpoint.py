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

import math
import os
import shutil
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from hysac_jax import cli
from hysac_jax.formats.run_dir import (BEST_LOSS, BEST_RECALL,
                                       CHECKPOINT_KINDS, LAST)
# Orbax calls with one-line errors; still importable from here.
from hysac_jax.orbax_errors import (  # pylint: disable=unused-import
    CheckpointWriteError, call_quietly, root_cause, save_quietly,
    silence_failed_restore_reports)

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
