"""The training loop behind train.py: epochs, validation, checkpoints, bounds.

    summary = train_and_evaluate(config, workdir)

One loop, one process or many: every process runs the same code on its own
shard of each global batch (`hysac_jax.data.pipeline`), the step is jitted
over a mesh of all devices (`hysac_jax.training.step`), and only process 0
logs. Only train.py imports this module.

Determinism: the step's dropout key is `fold_in(key, step)` and the input
order is a pure function of (seed, epoch, batch), so a run resumed from a
checkpoint continues with exactly the batches and keys it would have used.
"""

import dataclasses
import functools
import math
import os
import resource
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from hysac_jax import checkpoint as ckpt_lib
from hysac_jax import config as config_lib
from hysac_jax import evaluation
from hysac_jax import pretrained
from hysac_jax import run_lock
from hysac_jax import run_log
from hysac_jax import safety
from hysac_jax.evaluation import embed as embed_lib
from hysac_jax.formats import detect
from hysac_jax.formats import exports
from hysac_jax.formats import release
from hysac_jax.models import hysac as hysac_lib
from hysac_jax.training import prefetch as prefetch_lib
from hysac_jax.training import restore as restore_lib
from hysac_jax.training import step as step_lib


class TrainingDiverged(FloatingPointError):
  """The loss or the gradient norm became NaN or Inf."""


# Batches placed on the devices ahead of the step (flax's
# prefetch_to_device uses 2: one ready, one in flight).
PREFETCH_BATCHES = 2
# The device-to-host transfer guard between log steps: "allow" in use; the
# tests set "disallow_explicit", which fails on any read back.
BETWEEN_LOGS_GUARD = "allow"


# ---------------------------------------------------------- early stop ---


@dataclasses.dataclass
class EarlyStopping:
  """The release's rule: patience drops when neither metric improved.

  An epoch whose validation loss is not above the best so far, or whose
  recall sum beats the best, resets the patience; otherwise it drops by one
  and training stops when it reaches zero.
  """
  patience: int
  remaining: int = -1
  best_loss: float = math.inf
  best_recall: float = -math.inf

  def __post_init__(self):
    if self.remaining < 0:
      self.remaining = self.patience

  def update(self, val_loss, recall):
    """Returns (loss improved, recall improved, stop)."""
    recall_better = recall > self.best_recall
    if val_loss > self.best_loss and not recall_better:
      self.remaining -= 1
      return False, False, self.remaining <= 0
    self.remaining = self.patience
    loss_better = val_loss < self.best_loss
    if loss_better:
      self.best_loss = val_loss
    if recall_better:
      self.best_recall = recall
    return loss_better, recall_better, False

  def to_json(self):
    return {"patience": self.patience, "remaining": self.remaining,
            "best_loss": self.best_loss, "best_recall": self.best_recall}

  @classmethod
  def from_json(cls, d):
    return cls(patience=int(d["patience"]), remaining=int(d["remaining"]),
               best_loss=float(d["best_loss"]),
               best_recall=float(d["best_recall"]))


def state_encoder(state, mesh, eval_step):
  """encode_fn for `embed_split` from a TrainState and a jitted eval step."""
  def encode(batch):
    sharded = step_lib.shard_batch(batch, mesh)
    return eval_step(state, sharded)
  return encode


def validate(state, config, mesh, eval_step, image_size, context_length,
             desc="validation"):
  """Validation loss terms and recall sum over the whole validation split."""
  # The input pipeline (grain, TFDS) is heavy: imported when data is read.
  from hysac_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  batches = pipeline.make_dataset(config.data, "validation", image_size,
                                  seed=config.seed,
                                  context_length=context_length)
  emb, metrics = embed_lib.embed_split(state_encoder(state, mesh, eval_step), batches,
                             desc=desc)
  head = {k: state.params[k] for k in hysac_lib.HEAD_NAMES}  # not the towers
  curv = float(hysac_lib.head_scalars(jax.device_get(head),
                                      config.model.curv_init)["curv"])
  metrics["recall_sum"] = float(evaluation.recall_sum(
      emb["S"], emb["U"], emb["V"], emb["G"], curv, mode=config.model.mode))
  return emb, metrics, curv


# ------------------------------------------------------------ the loop ---


class _Preemption:
  """Turns SIGTERM and SIGINT (Ctrl-C) into a flag the loop checks between
  steps, so both save a checkpoint; a second SIGINT interrupts at once,
  unless a checkpoint is being written (that one is finished first).

  With `runtime_sigterm` (a multi-process run whose distributed runtime has
  a preemption service), SIGTERM is left to that service, which agrees on a
  save step with every process (`multihost_utils.
  reached_preemption_sync_point`); only SIGINT is caught here.
  """

  def __init__(self, runtime_sigterm=False):
    self.signals = ((signal.SIGINT,) if runtime_sigterm
                    else (signal.SIGTERM, signal.SIGINT))
    self.requested = False
    self.signal_name = None
    self.saving = False
    self._previous = {}

  def __enter__(self):
    try:
      for signum in self.signals:
        if signal.getsignal(signum) is signal.SIG_IGN:
          continue  # nohup, or a background job of a script: keep ignoring.
        self._previous[signum] = signal.signal(signum, self._handle)
    except ValueError:  # Not the main thread: leave signals alone.
      pass
    return self

  def _handle(self, signum, frame):
    del frame
    if self.requested and signum == signal.SIGINT and not self.saving:
      raise KeyboardInterrupt
    self.requested = True
    self.signal_name = signal.Signals(signum).name

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)


def _runtime_preemption_service():
  """Whether the distributed runtime agrees on preemption steps itself: a
  multi-process run (after `jax.distributed.initialize`) with
  `jax_enable_preemption_service` on, its default. (Not probed with a call:
  `reached_preemption_sync_point(-1)` answers True, -1 being its unset
  counter.)"""
  return (jax.process_count() > 1
          and bool(jax.config.jax_enable_preemption_service))


class _PreemptionCheck:
  """Whether every process should save and stop after a step, without a
  device collective on every step.

  - One process: the local signal flag, read every step (no collective).
  - Several, with the runtime's preemption service: SIGTERM is agreed by
    `reached_preemption_sync_point(step)`, a host-side query of the
    coordination service, every step; SIGINT (not seen by the service) is
    agreed as below.
  - Several, without it: an allgather of the local flags every
    `every` steps (`train.preemption_check_every`), at the same steps on
    every process, so a signal is acted on within `every` steps.
  """

  def __init__(self, preemption, every, runtime_service):
    self.preemption, self.every = preemption, every
    self.runtime_service = runtime_service
    self.runtime_fired = False

  def __call__(self, step):
    if jax.process_count() == 1:
      return self.preemption.requested
    if self.runtime_service and (
        multihost_utils.reached_preemption_sync_point(step)):
      self.runtime_fired = True
      return True
    if step % self.every:
      return False
    return _agree(self.preemption.requested)


class _Divergence:
  """A device-side record of the first step whose loss or gradient norm is
  not finite; the host reads it only where it reads metrics anyway (log
  steps) and before anything is saved.
  """

  def __init__(self, mesh):
    replicated = NamedSharding(mesh, P())
    self._record = jax.device_put(
        (np.int32(-1), np.float32(0), np.float32(0)), replicated)
    self._update = jax.jit(_first_non_finite, out_shardings=replicated)

  def track(self, metrics, step):
    """Dispatches the update for the step index `step` (nothing is read)."""
    self._record = self._update(self._record, metrics["loss"],
                                metrics["grad_norm"], step)

  def read(self):
    return self._record

  def raise_if_diverged(self, record, checkpoints):
    """`record` is `read()` brought to the host."""
    step, loss, grad_norm = (int(record[0]), float(record[1]),
                             float(record[2]))
    if step < 0:
      return
    last = checkpoints.latest_step()
    where = (f"the last good checkpoint is step {last} in "
             f"{os.path.join(checkpoints.workdir, ckpt_lib.LAST)}"
             if last is not None else "no checkpoint was saved yet")
    raise TrainingDiverged(f"loss is {loss} (gradient norm {grad_norm}) at "
                           f"step {step}; stopping without saving it "
                           f"({where})")

  def check(self, checkpoints):
    """Reads the record (one small device-to-host copy) and raises."""
    self.raise_if_diverged(jax.device_get(self._record), checkpoints)


def _first_non_finite(record, loss, grad_norm, step):
  first, first_loss, first_norm = record
  new = (first < 0) & ~(jnp.isfinite(loss) & jnp.isfinite(grad_norm))
  return (jnp.where(new, jnp.asarray(step, jnp.int32), first),
          jnp.where(new, loss, first_loss),
          jnp.where(new, grad_norm, first_norm))


def _note(message):
  """A one-line note on stderr from process 0."""
  if jax.process_index() == 0:
    tqdm.write(f"note: {message}", file=sys.stderr)


def _move_run_aside(workdir):
  """Moves everything in workdir but the lock into WORKDIR.old-<time>/."""
  stamp = time.strftime("%Y%m%d-%H%M%S")
  target, n = f"{workdir}.old-{stamp}", 1
  while os.path.exists(target):
    n += 1
    target = f"{workdir}.old-{stamp}-{n}"
  os.makedirs(target)
  for name in os.listdir(workdir):
    if name != run_lock.LOCK_NAME:
      os.rename(os.path.join(workdir, name), os.path.join(target, name))
  return target


# What training would overwrite, by what `detect.holds` finds there; a run,
# an empty or a new directory, or other files are trained into.
_NOT_A_RUN = {
    **{k: f"an export ({exports.HEAD_FILE})"
       for k in exports.EXPORT_KINDS + (detect.EXPORT,)},
    detect.RELEASE: f"a model in the release's format ({release.MODEL_FILE})",
    "converted": "a converted model",
    detect.HF_CLIP: f"a {config_lib.CONFIG_FILE} of another kind",
    detect.FOREIGN: f"a {config_lib.CONFIG_FILE} of another kind",
    detect.UNREADABLE: f"a {config_lib.CONFIG_FILE} that is not valid JSON",
}


def _other_kind_of_directory(workdir):
  """What `workdir` holds when it is a model directory of another kind (an
  export, a converted model, the release's format), which training would
  overwrite; None for a run, an empty or a new directory, or other files."""
  if not os.path.isdir(workdir):
    return None
  return _NOT_A_RUN.get(detect.holds(workdir, strict=False))


def open_run_dir(workdir, resume=None, overwrite=False):
  """Locks a run directory for training and applies --noresume/--overwrite.

  Process 0 takes the lock (`hysac_jax.run_lock`); the others wait for it.

  Args:
    workdir: absolute run directory (created if missing).
    resume: False refuses a workdir that holds checkpoints.
    overwrite: move an existing run to WORKDIR.old-<time>/ and start afresh
      (never deletes).

  Returns:
    The held `run_lock.RunLock` on process 0, None on the others.
  """
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise NotADirectoryError(f"--workdir {workdir} is a file, not a run "
                             "directory")
  if overwrite and resume:
    raise ValueError("--overwrite starts afresh: drop --resume")
  other = None if overwrite else _other_kind_of_directory(workdir)
  if other:  # checked before the lock, so nothing is written into it
    raise FileExistsError(
        f"--workdir {workdir} holds {other}, not a training run, and "
        "training would overwrite its files: choose another --workdir "
        "(--init_from DIR starts a run from a converted model)")
  lock = None
  if jax.process_index() == 0:
    lock = run_lock.RunLock(workdir).acquire()
    try:
      if lock.stale is not None:
        _note(f"took over the stale lock of "
              f"{run_lock.describe(lock.stale)} in {workdir}")
      steps = ckpt_lib.saved_steps(workdir)
      if overwrite:
        if set(os.listdir(workdir)) - {run_lock.LOCK_NAME}:
          _note(f"--overwrite: moved the previous run to "
                f"{_move_run_aside(workdir)}")
      elif resume is False and steps:
        raise FileExistsError(
            f"{workdir} holds checkpoints up to step {steps[-1]}; rerun "
            "without --noresume to resume it, or with --overwrite to move "
            f"it to {os.path.basename(workdir)}.old-<time>/ and start afresh")
    except BaseException:
      lock.release()
      raise
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("hysac_jax: run directory open")
  return lock


def check_resume_config(config, workdir):
  """Refuses to resume a run in `workdir` with a config that changes what
  defines it (`config_lib.resume_conflicts`), naming each such field.

  A workdir without checkpoints, or without config.json, starts afresh.
  """
  if (not ckpt_lib.saved_steps(workdir) or not os.path.exists(
      os.path.join(workdir, config_lib.CONFIG_FILE))):
    return
  conflicts = config_lib.resume_conflicts(
      config_lib.load_run_config(workdir), config)
  if conflicts:
    raise ValueError(
        f"{workdir} was trained with other settings, and a resumed run "
        f"keeps them: {'; '.join(conflicts)}. Rerun with the run's settings "
        f"(its {config_lib.CONFIG_FILE}) to resume it, or start afresh with "
        "another --workdir or with --overwrite (moves this run aside)")


def _restore_latest(checkpoints, abstract_tree, fallback):
  """(state, data, meta) of the newest readable checkpoint in checkpoints/.

  An unreadable newest checkpoint raises `ckpt_lib.CheckpointError` naming
  it, unless `fallback`: then the newest older one that reads is used and
  the unreadable ones are moved to workdir/unreadable/. Nothing is moved
  unless an older one reads (a config that fits no checkpoint fails them
  all, and they are left alone).
  """
  steps = checkpoints.all_steps()[::-1]
  if not steps:
    raise FileNotFoundError(f"--resume: no checkpoint in "
                            f"{checkpoints.workdir}")
  try:
    return checkpoints.restore(abstract_tree, step=steps[0])
  except ckpt_lib.CheckpointError as e:
    first = e
  bad = [steps[0]]
  if fallback:
    for step in steps[1:]:
      try:
        restored = checkpoints.restore(abstract_tree, step=step)
      except ckpt_lib.CheckpointError:
        bad.append(step)
        continue
      for b in bad:
        where = checkpoints.set_aside(b)
        _note(f"checkpoint {ckpt_lib.LAST}/{b} cannot be read; moved to "
              f"{where}; resuming from step {step}")
      return restored
    hint = "no older checkpoint reads either"
  elif len(steps) > 1:
    hint = (f"rerun with --fallback_checkpoint to resume from step "
            f"{steps[1]} (the unreadable one is moved to "
            f"{ckpt_lib.SET_ASIDE}/, not deleted)")
  else:
    hint = "there is no older checkpoint"
  raise ckpt_lib.CheckpointError(first.path, f"{first.cause}; {hint}",
                                 kind=first.kind, step=first.step) from first


def _with_absolute_model_paths(config, init_from):
  """`config` with `model.init_from` (the --init_from flag, if given), a
  local `model.clip` directory, `data.data_dir` and `data.manual_dir` made
  absolute: the run's config.json must find them again from any working
  directory (eval.py, export, resume; a relative data_dir made eval.py
  build a new dataset beside its own working directory)."""
  config = config.copy_and_resolve_references()
  if init_from:
    config.model.init_from = init_from
  for field in ("init_from", "clip"):
    path = os.path.expanduser(config.model[field])
    if config.model[field] and os.path.isdir(path):
      config.model[field] = os.path.abspath(path)
  # Data paths may not exist yet (TFDS builds data_dir): always absolute.
  for field in ("data_dir", "manual_dir"):
    if config.data[field]:
      config.data[field] = os.path.abspath(
          os.path.expanduser(config.data[field]))
  return config


def train_and_evaluate(config, workdir, *, init_from=None, resume=None,
                       overwrite=False, fallback_checkpoint=False,
                       startup=None):
  """Trains HySAC as `config` says; returns a summary dict.

  Args:
    config: a ConfigDict as in configs/vitl14.py.
    workdir: run directory (checkpoints, logs, bounds.json); locked while
      training (`hysac_jax.run_lock`).
    init_from: optional converted HySAC directory to start from.
    resume: continue from the latest checkpoint in workdir; None means "if
      there is one"; False refuses a workdir that has checkpoints.
    overwrite: move an existing run aside (WORKDIR.old-<time>/) first.
    fallback_checkpoint: resume from the previous checkpoint when the latest
      cannot be read (the unreadable one is moved to WORKDIR/unreadable/).
    startup: seconds of start-up stages timed before the call (train.py:
      imports, distributed init); the rest are timed here. All are printed
      as they end and logged as one "startup" record of metrics.jsonl.

  Returns:
    dict with "steps", "epochs", "stopped_early", "best" metrics, "bounds",
    "preempted" and, when preempted, "signal".
  """
  config = _with_absolute_model_paths(config, init_from)
  config_lib.check_config(config)  # --init_from too, before the workdir
  workdir = os.path.abspath(os.path.expanduser(workdir))
  lock = open_run_dir(workdir, resume, overwrite)
  try:
    if not overwrite and resume is not False:
      check_resume_config(config, workdir)
    return _train_and_evaluate(config, workdir,
                               resume=None if overwrite else resume,
                               fallback_checkpoint=fallback_checkpoint,
                               startup=startup)
  finally:
    if lock is not None:
      lock.release()


@dataclasses.dataclass
class _Run:
  """What the loop carries from step to step (one object, not 20 locals)."""
  config: object
  workdir: str
  startup: object
  mesh: object = None
  image_size: int = 0
  context_length: int = 0
  batches: object = None
  steps_per_epoch: int = 0
  total_steps: int = 0
  state: object = None
  step_key: object = None
  eval_step: object = None
  checkpoints: object = None
  stopper: object = None
  log: object = None
  preemption: object = None
  step: int = 0
  start_step: int = 0
  global_batch: int = 0
  out_of_memory: object = None
  divergence: object = None
  preempt_check: object = None

  @property
  def is_main(self):
    return jax.process_index() == 0

  def save(self, kind=ckpt_lib.LAST, extra=None):
    """Checkpoints the current step (a SIGINT meanwhile waits for it), after
    checking that no step so far diverged: a non-finite state is never
    saved."""
    self.divergence.check(self.checkpoints)
    meta = {"step": self.step, "epoch": self.step // self.steps_per_epoch,
            "early_stopping": self.stopper.to_json(), **(extra or {})}
    self.preemption.saving = True
    try:
      self.checkpoints.save(self.step,
                            restore_lib.state_tree(self.state, self.step_key),
                            self.batches.get_state(), meta, kind=kind)
    finally:
      self.preemption.saving = False


def _open_run(config, workdir, startup):
  """Data, model and a fresh train state: everything before a restore."""
  # The input pipeline (grain, TFDS) is heavy: imported when data is read.
  from hysac_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  config_lib.save_config(config, workdir)
  run = _Run(config, workdir,
             run_log.StartupTimes(startup, enabled=jax.process_index() == 0))
  run.mesh = step_lib.make_mesh()
  model = pretrained.model_from_config(config)
  run.image_size = model.clip.vision.image_size
  run.context_length = model.clip.text.max_position_embeddings
  pipeline.prepare(config.data, run.image_size)
  # Two batches on the devices ahead of the step; a checkpoint's data
  # position counts consumed batches only.
  run.batches = prefetch_lib.DevicePrefetch(
      pipeline.make_dataset(config.data, "train", run.image_size,
                            seed=config.seed, num_epochs=config.train.epochs,
                            context_length=run.context_length),
      place=functools.partial(step_lib.shard_batch, mesh=run.mesh),
      depth=PREFETCH_BATCHES)
  run.steps_per_epoch = run.batches.steps_per_epoch
  run.total_steps = run.steps_per_epoch * config.train.epochs
  run.startup.mark("data")

  init_key, run.step_key = jax.random.split(jax.random.key(config.seed))
  params = pretrained.initial_params(config)
  run.startup.mark("params")
  run.state = step_lib.create_train_state(
      config, init_key, params, mesh=run.mesh, total_steps=run.total_steps,
      model=model)
  del params
  jax.block_until_ready(run.state)
  run.startup.mark("state")
  run.eval_step = step_lib.make_eval_step(config, run.mesh)
  run.divergence = _Divergence(run.mesh)
  run.checkpoints = ckpt_lib.RunCheckpoints(workdir, config.train.keep_last)
  run.stopper = EarlyStopping(config.train.patience)
  run.global_batch = (config.data.batch_size_per_device
                      * jax.device_count())
  run.out_of_memory = functools.partial(
      step_lib.explain_out_of_memory,
      batch_per_device=config.data.batch_size_per_device,
      global_batch=run.global_batch)
  return run


def _restore_or_init(run, resume, fallback_checkpoint):
  """Resumes from the newest readable checkpoint, or keeps step 0."""
  if resume is None:
    resume = run.checkpoints.latest_step() is not None
  if resume:
    tree, data_state, meta = _restore_latest(
        run.checkpoints, restore_lib.state_tree(run.state, run.step_key),
        fallback_checkpoint)
    run.state = restore_lib.apply_state_tree(run.state, tree)
    run.step_key = jax.random.wrap_key_data(tree["rng"])
    run.batches.set_state(data_state)
    run.stopper = EarlyStopping.from_json(meta["early_stopping"])
    run.step = run.start_step = int(meta["step"])
    if run.is_main:
      print(f"resumed from step {run.step} in {run.workdir}")
    run.startup.mark("restore")
  run.log = run_log.RunLog(run.workdir, use_wandb=run.config.train.use_wandb,
                           config=run.config, start_step=run.start_step)


def _compile_step(run):
  """The train step compiled once, on the first batch (left queued)."""
  train_step = step_lib.make_train_step(run.config, run.mesh)
  example = run.batches.peek()
  run.startup.mark("first_batch")
  with run.out_of_memory("compiling the train step"):
    compiled = train_step.lower(run.state, example, run.step_key).compile()
  run.startup.mark("compile")
  return compiled


class _Rate:
  """Examples/s and input-wait share between two log lines."""

  def __init__(self):
    self.reset()

  def reset(self):
    self.t0, self.examples, self.waited = time.perf_counter(), 0, 0.0

  def line(self, global_batch):
    elapsed = max(time.perf_counter() - self.t0, 1e-9)
    steps = max(self.examples // global_batch, 1)
    # Time blocked on the input pipeline: a starved accelerator shows as a
    # large share.
    out = {"examples_per_s": self.examples / elapsed,
           "input_wait_s": self.waited / steps,
           "input_wait_share": self.waited / elapsed}
    self.reset()
    return out


def _train_until_stop(run, compiled, bar):
  """Steps until an epoch ends, a checkpoint is due or a signal came.

  Between log steps nothing is read back from the devices: the step is
  dispatched, the next batches are placed while it runs, and its metrics
  stay on the devices (`BETWEEN_LOGS_GUARD`, "allow" here, is what a test
  sets to "disallow_explicit" to prove it). Returns "epoch_end",
  "checkpoint", "preempted" or "done".
  """
  config, rate = run.config, _Rate()
  while run.step < run.total_steps:
    with jax.transfer_guard_device_to_host(BETWEEN_LOGS_GUARD):
      sharded = next(run.batches)
      with run.out_of_memory("in the train step"):
        run.state, metrics = compiled(run.state, sharded, run.step_key)
      del sharded
      run.divergence.track(metrics, run.step)
      if run.step == run.start_step:
        _first_step_done(run, metrics)
        rate.reset()
        run.batches.take_wait()
      run.batches.fill()  # the next batches go up while this step runs
      run.step += 1
      if run.step > run.start_step + 1:  # the rate leaves out the first step
        rate.examples += run.global_batch
      rate.waited += run.batches.take_wait()
      bar.update(1)
    # (An allgather every preemption_check_every steps in multi-process
    # runs without the runtime's service: a deliberate, rare read.)
    preempt = run.preempt_check(run.step)
    if run.step % config.train.log_every == 0 or run.step == run.total_steps:
      _log_train(run, metrics, rate, bar)
    every = config.train.checkpoint_every
    outcome = ("preempted" if preempt else
               "epoch_end" if run.step % run.steps_per_epoch == 0 else
               "checkpoint" if every and run.step % every == 0 else None)
    if outcome:
      run.divergence.check(run.checkpoints)
      return outcome
  return "done"


def _first_step_done(run, metrics):
  jax.block_until_ready(metrics)
  run.startup.mark("first_step")
  run.log.write(run.step, dict(run.startup.times, total=run.startup.total()),
                kind="startup")


def _log_train(run, metrics, rate, bar):
  with run.out_of_memory("in the train step"):
    host, record = jax.device_get((metrics, run.divergence.read()))
  run.divergence.raise_if_diverged(record, run.checkpoints)
  speed = rate.line(run.global_batch)
  run.log.write(run.step, dict(host, **speed, **_peak_memory()), kind="train")
  bar.set_postfix(loss=f"{float(host['loss']):.4f}",
                  ex_s=f"{speed['examples_per_s']:.1f}",
                  wait=f"{100 * speed['input_wait_share']:.0f}%")


def _peak_memory():
  """{"host_peak_rss_gib"[, "device_peak_gib"]}: this process's peak resident
  memory, and the first local device's peak allocation where the backend
  reports it (GPUs, TPUs; a host-side query, no transfer)."""
  out = {"host_peak_rss_gib":
         resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
  stats = jax.local_devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    out["device_peak_gib"] = stats["peak_bytes_in_use"] / 2**30
  return out


def _end_of_epoch(run):
  """Validates, updates early stopping, saves; True when it says stop."""
  _, val, _ = validate(run.state, run.config, run.mesh, run.eval_step,
                       run.image_size, run.context_length)
  loss_better, recall_better, stop = run.stopper.update(val["loss"],
                                                        val["recall_sum"])
  run.log.write(run.step, dict(val, patience_left=run.stopper.remaining),
                kind="val")
  epoch = run.step // run.steps_per_epoch
  if run.is_main:
    tqdm.write(f"epoch {epoch}: val loss {val['loss']:.4f}, recall sum "
               f"{val['recall_sum']:.1f}, patience "
               f"{run.stopper.remaining}/{run.stopper.patience}")
  if loss_better:
    run.save(ckpt_lib.BEST_LOSS, {"metrics": val})
  if recall_better:
    run.save(ckpt_lib.BEST_RECALL, {"metrics": val})
  run.save()
  if stop and run.is_main:
    tqdm.write(f"early stopping after epoch {epoch}: no improvement for "
               f"{run.stopper.patience} epochs")
  return stop


def _save_preempted(run, summary):
  run.save()
  if run.step not in run.checkpoints.all_steps():
    raise RuntimeError(f"preempted at step {run.step} but its checkpoint "
                       "was not written")
  summary.update(preempted=True,
                 signal=run.preemption.signal_name or (
                     "SIGTERM (agreed by the distributed runtime's "
                     "preemption service)" if run.preempt_check.runtime_fired
                     else "SIGTERM/SIGINT on another process"))
  if run.is_main:
    print(f"{summary['signal']}: saved step {run.step} in "
          f"{os.path.join(run.workdir, ckpt_lib.LAST)}; rerun the same "
          "command to resume", file=sys.stderr, flush=True)


def _train_and_evaluate(config, workdir, *, resume, fallback_checkpoint,
                        startup):
  run = _open_run(config, workdir, startup)
  _restore_or_init(run, resume, fallback_checkpoint)
  summary = {"stopped_early": False, "preempted": False}
  runtime_service = _runtime_preemption_service()
  with _Preemption(runtime_sigterm=runtime_service) as run.preemption:
    run.preempt_check = _PreemptionCheck(
        run.preemption, config.train.preemption_check_every, runtime_service)
    compiled = None
    if run.step < run.total_steps:
      compiled = _compile_step(run)
    bar = tqdm(total=run.total_steps, initial=run.start_step,
               disable=not run.is_main, desc="train", dynamic_ncols=True)
    while run.step < run.total_steps:
      outcome = _train_until_stop(run, compiled, bar)
      epoch_end = run.step % run.steps_per_epoch == 0
      if epoch_end and _end_of_epoch(run):
        summary["stopped_early"] = True  # (also when a signal came)
        break
      if outcome == "preempted":
        _save_preempted(run, summary)
        break
      if outcome == "checkpoint":
        run.save()
  bar.close()
  run.batches.close()
  summary.update(steps=run.step, epochs=run.step / run.steps_per_epoch,
                 best={"loss": run.stopper.best_loss,
                       "recall_sum": run.stopper.best_recall})
  if not summary["preempted"]:
    summary["bounds"] = _final_bounds(run)
  run.log.close()
  run.checkpoints.close()
  return summary


def _agree(flag):
  """True on every process if any process saw `flag` (SIGTERM)."""
  if jax.process_count() == 1:
    return flag
  return bool(multihost_utils.process_allgather(np.asarray(flag)).any())


def _final_bounds(run):
  """Bounds (SPEC §4) of each best checkpoint on the validation split.

  Each best checkpoint's bounds come from its own weights and are written
  beside it (`best_recall/bounds.json`, `best_loss/bounds.json`; one pass
  when both are the same step); workdir/bounds.json holds the best-recall
  checkpoint's, the run's default. Returns those.
  """
  config, checkpoints = run.config, run.checkpoints
  if config.model.mode != "hyp":  # no bounds: skip the validation pass
    return None
  by_step = {}  # checkpoint step -> bounds: one pass per distinct step

  def bounds_of(kind):  # collective: every process validates
    step = checkpoints.latest_step(kind)
    if step not in by_step:
      best = restore_lib.restore_into(checkpoints, run.state, run.step_key,
                                      kind)
      emb, _, curv = validate(best, config, run.mesh, run.eval_step,
                              run.image_size, run.context_length,
                              desc=f"bounds ({kind})")
      by_step[step] = safety.compute_bounds(emb["S"], emb["U"], emb["V"],
                                            emb["G"], curv)
    return by_step[step]

  # best_recall falls back to the latest checkpoint when it has none.
  default = bounds_of(ckpt_lib.BEST_RECALL)
  beside = {ckpt_lib.BEST_RECALL: default}
  if checkpoints.latest_step(ckpt_lib.BEST_LOSS) is not None:
    beside[ckpt_lib.BEST_LOSS] = bounds_of(ckpt_lib.BEST_LOSS)
  if jax.process_index() == 0:
    safety.save_bounds(default, os.path.join(checkpoints.workdir,
                                             safety.BOUNDS_FILE))
    for kind, bounds in beside.items():
      d = os.path.join(checkpoints.workdir, kind)
      if os.path.isdir(d):
        safety.save_bounds(bounds, os.path.join(d, safety.BOUNDS_FILE))
  return default
