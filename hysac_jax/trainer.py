"""The training loop behind train.py: epochs, validation, checkpoints, bounds.

    summary = trainer.train_and_evaluate(config, workdir)

One loop, one process or many: every process runs the same code on its own
shard of each global batch (`hysac_jax.data.pipeline`), the step is jitted
over a mesh of all devices (`hysac_jax.train_lib`), and only process 0 logs.

Determinism: the step's dropout key is `fold_in(key, step)` and the input
order is a pure function of (seed, epoch, batch), so a run resumed from a
checkpoint continues with exactly the batches and keys it would have used.
"""

import dataclasses
import functools
import json
import math
import os
import signal
import sys
import time

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from hysac_jax import checkpoint as ckpt_lib
from hysac_jax import run_lock
from hysac_jax import run_log
from hysac_jax import safety
from hysac_jax import train_lib
from hysac_jax.models import hysac as hysac_lib

MODES = ("hyp", "euc")
DATASETS = ("synthetic_visu", "visu")
SCHEDULES = ("constant", "warmup_cosine")


class TrainingDiverged(FloatingPointError):
  """The loss became NaN or Inf."""


# ---------------------------------------------------------------- config ---


def check_config(config):
  """Raises ValueError naming the first config field with a bad value."""

  def bad(field, value, expected):
    raise ValueError(f"config.{field}={value!r}: expected {expected}")

  m, d, o, t, l = (config.model, config.data, config.optim, config.train,
                   config.loss)
  if m.mode not in MODES:
    bad("model.mode", m.mode, " or ".join(map(repr, MODES)))
  if m.dtype not in train_lib.DTYPES:
    bad("model.dtype", m.dtype, f"one of {sorted(train_lib.DTYPES)}")
  if not m.clip:
    from hysac_jax.models import sizes
    try:
      sizes.get_clip_config(m.size)
    except (KeyError, ValueError):
      bad("model.size", m.size, "a named size of hysac_jax.models.sizes")
  from hysac_jax.models import clip as clip_lib
  if not isinstance(m.remat, bool) and m.remat not in clip_lib.REMAT_POLICIES:
    bad("model.remat", m.remat, f"one of {clip_lib.REMAT_POLICIES}")
  if m.get("attention", "auto") not in clip_lib.ATTENTION_IMPLEMENTATIONS:
    bad("model.attention", m.attention,
        f"one of {clip_lib.ATTENTION_IMPLEMENTATIONS}")
  if m.lora.rank < 0:
    bad("model.lora.rank", m.lora.rank, "rank >= 0")
  if not 0.0 <= m.lora.dropout < 1.0:
    bad("model.lora.dropout", m.lora.dropout, "a rate in [0, 1)")
  if not m.curv_init > 0:
    bad("model.curv_init", m.curv_init, "a positive curvature")
  if d.name not in DATASETS:
    bad("data.name", d.name, f"one of {DATASETS}")
  if d.name == "synthetic_visu" and "synthetic_sizes" in d:
    sizes = d.synthetic_sizes
    if (not isinstance(sizes, (tuple, list)) or len(sizes) != 3
        or not all(isinstance(n, int) and n > 0 for n in sizes)):
      bad("data.synthetic_sizes", sizes,
          "three positive example counts (train, validation, test), "
          "e.g. --config.data.synthetic_sizes=(4096,512,1024)")
  if d.name == "visu" and not d.manual_dir:
    bad("data.manual_dir", d.manual_dir,
        "the directory holding the ViSU JSON files, coco/ and the unsafe "
        "images (see README, 'Train HySAC on ViSU')")
  for field in ("batch_size_per_device", "eval_batch_size_per_device"):
    if d[field] < 1:
      bad(f"data.{field}", d[field], "a positive batch size")
  if d.num_workers < 0:
    bad("data.num_workers", d.num_workers, "0 or more worker processes")
  if not o.lr > 0:
    bad("optim.lr", o.lr, "a positive learning rate")
  if o.schedule not in SCHEDULES:
    bad("optim.schedule", o.schedule, f"one of {SCHEDULES}")
  if o.accum_steps < 1:
    bad("optim.accum_steps", o.accum_steps, "1 or more micro-batches")
  if o.grad_clip < 0:
    bad("optim.grad_clip", o.grad_clip, "0 (off) or a positive norm")
  if l.entail_weight < 0:
    bad("loss.entail_weight", l.entail_weight, "a non-negative weight")
  if t.epochs < 1:
    bad("train.epochs", t.epochs, "at least one epoch")
  if t.patience < 1:
    bad("train.patience", t.patience, "at least 1")
  if t.keep_last < 1:
    bad("train.keep_last", t.keep_last, "at least 1")
  if t.log_every < 1:
    bad("train.log_every", t.log_every, "at least 1")
  if t.checkpoint_every < 0:
    bad("train.checkpoint_every", t.checkpoint_every,
        "0 (epoch ends only) or a step interval")


def save_config(config, workdir):
  """Writes the resolved config as workdir/config.json (process 0)."""
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def load_run_config(workdir):
  """The config a run saved in workdir/config.json, as a ConfigDict."""
  import ml_collections
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir!r} a training "
                            "run directory? (pass --config as well)")
  try:
    with open(path) as f:
      return ml_collections.ConfigDict(json.load(f))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from None


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


# ------------------------------------------------------------ the model ---


def initial_params(config, init_from=None):
  """Pretrained weights the run starts from, or None for a random init.

  Args:
    config: run config; `config.model.clip` names a Hugging Face CLIP
      directory or hub id (converted here), or a converted directory (its
      params, as `init_from`; eval rebuilds the frozen weights from it).
    init_from: a directory written by `python -m hysac_jax.convert` (a
      converted HySAC model: CLIP, LoRA and head).
  """
  from hysac_jax import convert
  clip = config.model.clip
  if not init_from and clip and convert.converted_clip_config(clip):
    init_from = clip  # A converted directory: its params, as --init_from.
  if init_from:
    convert.check_run_compatible(
        init_from, train_lib.model_from_config(config).clip)
    return convert.load_pretrained(init_from).params
  if config.model.clip:
    _, params = convert.clip_params_from_hf(config.model.clip)
    return params
  return None


def checkpoint_tree(state, rng):
  """What a checkpoint stores: the trainable part (frozen weights are
  rebuilt from the config at start), optimizer state, step and RNG key."""
  # The key is placed like the (replicated) step: on several processes
  # Orbax writes only global arrays, not a host-local one.
  rng_data = jax.device_put(jax.random.key_data(rng), state.step.sharding)
  return {"trainable": state.trainable(),
          "opt_state": state.opt_state, "step": state.step,
          "rng": rng_data}


def _restore_state(state, tree):
  params = train_lib.merge_params(state.params, tree["trainable"])
  return state.replace(params=params, opt_state=tree["opt_state"],
                       step=tree["step"])


# ----------------------------------------------------------- embeddings ---


def gather_rows(x):
  """Concatenates a sharded (global) array's rows on every host, as numpy."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def embed_split(encode_fn, batches, desc="embedding"):
  """Runs `encode_fn` over an evaluation pass and keeps the real rows.

  Args:
    encode_fn: host batch -> (dict S/U/V/G of (B, D) arrays, metrics dict
      or None); arrays may be sharded global arrays.
    batches: an iterator of padded, masked batches (one pass).
    desc: progress-bar label.

  Returns:
    (embeddings, metrics): dict of (N, D) float32 numpy arrays over the whole
    split (padding removed, each example once; rows in global-batch order,
    which is split order on one process and a permutation within each
    global batch on several, the same for S, U, V and G); metrics averaged
    over real rows.
  """
  chunks, masks, sums, count = [], [], {}, 0
  show = jax.process_index() == 0
  for batch in tqdm(batches, desc=desc, disable=not show, leave=False):
    emb, metrics = encode_fn(batch)
    mask_global = gather_rows(_global_mask(batch, emb))
    chunks.append({k: gather_rows(v) for k, v in emb.items()})
    masks.append(mask_global.astype(bool))
    n = int(mask_global.sum())
    if metrics:
      for k, v in jax.device_get(metrics).items():
        sums[k] = sums.get(k, 0.0) + float(v) * n
    count += n
  mask = np.concatenate(masks)
  out = {k: np.concatenate([c[k] for c in chunks])[mask] for k in chunks[0]}
  return out, {k: v / max(count, 1) for k, v in sums.items()}


def _global_mask(batch, emb):
  """The batch mask laid out like the (possibly sharded) embeddings."""
  mask = np.asarray(batch["mask"]).astype(np.float32)
  any_emb = next(iter(emb.values()))
  if jax.process_count() == 1 or not isinstance(any_emb, jax.Array):
    # Host-local rows (numpy): gathered across processes like the mask.
    return mask
  sharding = any_emb.sharding
  return jax.make_array_from_process_local_data(
      jax.sharding.NamedSharding(sharding.mesh,
                                 jax.sharding.PartitionSpec(
                                     train_lib.DATA_AXIS)), mask)


def prepare_data(data_config, image_size):
  """Builds the dataset on process 0 while the others wait, once per run.

  Every process opens the TFDS files afterwards; letting them all build at
  once would race on the same directory.
  """
  from hysac_jax.data import pipeline
  if jax.process_index() == 0:
    pipeline.open_builder(data_config, image_size)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("hysac_jax: dataset built")


def state_encoder(state, mesh, eval_step):
  """encode_fn for `embed_split` from a TrainState and a jitted eval step."""
  def encode(batch):
    sharded = train_lib.shard_batch(batch, mesh)
    return eval_step(state, sharded)
  return encode


def validate(state, config, mesh, eval_step, image_size, desc="validation"):
  """Validation loss terms and recall sum over the whole validation split."""
  from hysac_jax import evaluation
  from hysac_jax.data import pipeline
  batches = pipeline.make_dataset(config.data, "validation", image_size,
                                  seed=config.seed)
  emb, metrics = embed_split(state_encoder(state, mesh, eval_step), batches,
                             desc=desc)
  curv = float(hysac_lib.head_scalars(
      jax.device_get(state.params), config.model.curv_init)["curv"])
  metrics["recall_sum"] = float(evaluation.recall_sum(
      emb["S"], emb["U"], emb["V"], emb["G"], curv, mode=config.model.mode))
  return emb, metrics, curv


# ------------------------------------------------------------ the loop ---


class _Preemption:
  """Turns SIGTERM and SIGINT (Ctrl-C) into a flag the loop checks between
  steps, so both save a checkpoint; a second SIGINT interrupts at once,
  unless a checkpoint is being written (that one is finished first)."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested = False
    self.signal_name = None
    self.saving = False
    self._previous = {}

  def __enter__(self):
    try:
      for signum in self.SIGNALS:
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


def _finite_or_raise(metrics, step, checkpoints):
  loss = float(metrics["loss"])
  if not math.isfinite(loss):
    last = checkpoints.latest_step()
    where = (f"the last good checkpoint is step {last} in "
             f"{os.path.join(checkpoints.workdir, ckpt_lib.LAST)}"
             if last is not None else "no checkpoint was saved yet")
    raise TrainingDiverged(f"loss is {loss} at step {step}; stopping without "
                           f"saving it ({where})")


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
  check_config(config)
  workdir = os.path.abspath(os.path.expanduser(workdir))
  lock = open_run_dir(workdir, resume, overwrite)
  try:
    return _train_and_evaluate(config, workdir, init_from=init_from,
                               resume=None if overwrite else resume,
                               fallback_checkpoint=fallback_checkpoint,
                               startup=startup)
  finally:
    if lock is not None:
      lock.release()


def _train_and_evaluate(config, workdir, *, init_from, resume,
                        fallback_checkpoint, startup):
  from hysac_jax.data import pipeline

  save_config(config, workdir)
  is_main = jax.process_index() == 0
  startup = run_log.StartupTimes(startup, enabled=is_main)

  mesh = train_lib.make_mesh()
  model = train_lib.model_from_config(config)
  image_size = model.clip.vision.image_size
  prepare_data(config.data, image_size)
  train_batches = pipeline.make_dataset(config.data, "train", image_size,
                                        seed=config.seed,
                                        num_epochs=config.train.epochs)
  steps_per_epoch = train_batches.steps_per_epoch
  total_steps = steps_per_epoch * config.train.epochs
  startup.mark("data")

  key = jax.random.key(config.seed)
  init_key, step_key = jax.random.split(key)
  params = initial_params(config, init_from)
  startup.mark("params")
  state = train_lib.create_train_state(
      config, init_key, params, mesh=mesh, total_steps=total_steps,
      model=model)
  del params
  jax.block_until_ready(state)
  startup.mark("state")
  train_step = train_lib.make_train_step(config, mesh)
  eval_step = train_lib.make_eval_step(config, mesh)

  checkpoints = ckpt_lib.RunCheckpoints(workdir, config.train.keep_last)
  stopper = EarlyStopping(config.train.patience)
  start_step = 0
  if resume is None:
    resume = checkpoints.latest_step() is not None
  if resume:
    tree, data_state, meta = _restore_latest(
        checkpoints, checkpoint_tree(state, step_key), fallback_checkpoint)
    state = _restore_state(state, tree)
    step_key = jax.random.wrap_key_data(tree["rng"])
    train_batches.set_state(data_state)
    stopper = EarlyStopping.from_json(meta["early_stopping"])
    start_step = int(meta["step"])
    if is_main:
      print(f"resumed from step {start_step} in {workdir}")
    startup.mark("restore")

  log = run_log.RunLog(workdir, use_wandb=config.train.use_wandb,
                       config=config, start_step=start_step)
  summary = {"stopped_early": False, "preempted": False}

  def save(step, kind=ckpt_lib.LAST, extra=None):
    meta = {"step": step, "epoch": step // steps_per_epoch,
            "early_stopping": stopper.to_json(), **(extra or {})}
    preemption.saving = True
    try:
      checkpoints.save(step, checkpoint_tree(state, step_key),
                       train_batches.get_state(), meta, kind=kind)
    finally:
      preemption.saving = False

  pending = None  # (step, metrics) of the last dispatched step, unchecked.
  step = start_step
  global_batch = (config.data.batch_size_per_device * jax.device_count())
  out_of_memory = functools.partial(train_lib.explain_out_of_memory,
                                    batch_per_device=(
                                        config.data.batch_size_per_device),
                                    global_batch=global_batch)
  sharded = compiled_step = None
  with _Preemption() as preemption:
    if step < total_steps:
      # Compile once, ahead of the loop, on the first batch's shapes.
      sharded = train_lib.shard_batch(next(train_batches), mesh)
      startup.mark("first_batch")
      with out_of_memory("compiling the train step"):
        compiled_step = train_step.lower(state, sharded, step_key).compile()
      startup.mark("compile")
    bar = tqdm(total=total_steps, initial=start_step, disable=not is_main,
               desc="train", dynamic_ncols=True)
    t0, examples, waited = time.perf_counter(), 0, 0.0
    while step < total_steps:
      if sharded is None:
        t_wait = time.perf_counter()
        batch = next(train_batches)
        waited += time.perf_counter() - t_wait
        sharded = train_lib.shard_batch(batch, mesh)
      with out_of_memory("in the train step"):
        state, metrics = compiled_step(state, sharded, step_key)
        sharded = None
        if step == start_step:
          jax.block_until_ready(metrics)
          startup.mark("first_step")
          log.write(step, dict(startup.times, total=startup.total()),
                    kind="startup")
          t0 = time.perf_counter()
      # Check the previous step while this one runs (keeps dispatch async).
      if pending is not None:
        _finite_or_raise(pending[1], pending[0], checkpoints)
      pending = (step, metrics)
      step += 1
      if step > start_step + 1:  # the rate leaves out the timed first step
        examples += global_batch
      if step % config.train.log_every == 0 or step == total_steps:
        with out_of_memory("in the train step"):
          host = jax.device_get(metrics)
        _finite_or_raise(host, step - 1, checkpoints)
        elapsed = max(time.perf_counter() - t0, 1e-9)
        rate = examples / elapsed
        # Time blocked on the input pipeline: a starved accelerator shows
        # as a large share.
        wait_share = waited / elapsed
        wait_per_step = waited / max(examples // global_batch, 1)
        t0, examples, waited = time.perf_counter(), 0, 0.0
        log.write(step, dict(host, examples_per_s=rate,
                             input_wait_s=wait_per_step,
                             input_wait_share=wait_share), kind="train")
        bar.set_postfix(loss=f"{float(host['loss']):.4f}",
                        ex_s=f"{rate:.1f}", wait=f"{100 * wait_share:.0f}%")
      bar.update(1)
      epoch_end = step % steps_per_epoch == 0
      every = config.train.checkpoint_every
      preempt = _agree(preemption.requested)
      if epoch_end or preempt or (every and step % every == 0):
        _finite_or_raise(jax.device_get(metrics), step - 1, checkpoints)
      if epoch_end:
        _, val, _ = validate(state, config, mesh, eval_step, image_size)
        loss_better, recall_better, stop = stopper.update(
            val["loss"], val["recall_sum"])
        log.write(step, dict(val, patience_left=stopper.remaining),
                  kind="val")
        if is_main:
          tqdm.write(f"epoch {step // steps_per_epoch}: val loss "
                     f"{val['loss']:.4f}, recall sum {val['recall_sum']:.1f}"
                     f", patience {stopper.remaining}/{stopper.patience}")
        if loss_better:
          save(step, ckpt_lib.BEST_LOSS, {"metrics": val})
        if recall_better:
          save(step, ckpt_lib.BEST_RECALL, {"metrics": val})
        save(step)
        if stop:
          summary["stopped_early"] = True
          if is_main:
            tqdm.write(f"early stopping after epoch "
                       f"{step // steps_per_epoch}: no improvement for "
                       f"{stopper.patience} epochs")
          break
      elif every and step % every == 0:
        save(step)
      if preempt:
        save(step)
        if step not in checkpoints.all_steps():
          raise RuntimeError(f"preempted at step {step} but its checkpoint "
                             "was not written")
        summary.update(preempted=True,
                       signal=preemption.signal_name or "SIGTERM/SIGINT "
                       "on another process")
        break
  bar.close()
  if summary["preempted"] and is_main:
    print(f"{summary['signal']}: saved step {step} in "
          f"{os.path.join(workdir, ckpt_lib.LAST)}; rerun the same command "
          "to resume", file=sys.stderr, flush=True)
  train_batches.close()

  summary.update(steps=step, epochs=step / steps_per_epoch,
                 best={"loss": stopper.best_loss,
                       "recall_sum": stopper.best_recall})
  if not summary["preempted"]:
    summary["bounds"] = _final_bounds(state, config, mesh, eval_step,
                                      image_size, checkpoints, step_key)
  log.close()
  checkpoints.close()
  return summary


def _agree(flag):
  """True on every process if any process saw `flag` (SIGTERM)."""
  if jax.process_count() == 1:
    return flag
  return bool(multihost_utils.process_allgather(np.asarray(flag)).any())


def _final_bounds(state, config, mesh, eval_step, image_size, checkpoints,
                  step_key):
  """Bounds (SPEC §4) of the best-recall checkpoint on the validation split.

  Written to workdir/bounds.json and beside the best checkpoints.
  """
  kind = ckpt_lib.BEST_RECALL
  if checkpoints.latest_step(kind) is None:
    kind = ckpt_lib.LAST
  tree, _, _ = checkpoints.restore(checkpoint_tree(state, step_key),
                                   kind=kind)
  best = _restore_state(state, tree)
  emb, _, curv = validate(best, config, mesh, eval_step, image_size,
                          desc="bounds")
  if config.model.mode != "hyp":
    return None
  bounds = safety.compute_bounds(emb["S"], emb["U"], emb["V"], emb["G"],
                                 curv)
  if jax.process_index() == 0:
    safety.save_bounds(bounds, os.path.join(checkpoints.workdir,
                                            "bounds.json"))
    for k in (ckpt_lib.BEST_RECALL, ckpt_lib.BEST_LOSS):
      d = os.path.join(checkpoints.workdir, k)
      if os.path.isdir(d):
        safety.save_bounds(bounds, os.path.join(d, "bounds.json"))
  return bounds


def restore_for_eval(config, workdir, kind=ckpt_lib.BEST_RECALL):
  """(state, mesh, eval_step) of a run's best (or last) checkpoint."""
  mesh = train_lib.make_mesh()
  model = train_lib.model_from_config(config)
  key = jax.random.key(config.seed)
  init_key, step_key = jax.random.split(key)
  state = train_lib.create_train_state(config, init_key,
                                       initial_params(config), mesh=mesh,
                                       model=model)
  # Read-only: evaluating or exporting a run creates nothing in it.
  checkpoints = ckpt_lib.RunCheckpoints(workdir, config.train.keep_last,
                                        read_only=True)
  try:
    if checkpoints.latest_step(kind) is None:
      kind = ckpt_lib.LAST
    restored = checkpoints.restore(checkpoint_tree(state, step_key),
                                   kind=kind)
  finally:
    checkpoints.close()
  if restored is None:
    raise FileNotFoundError(f"no checkpoint in {workdir} (looked in "
                            f"{ckpt_lib.BEST_RECALL}/ and {ckpt_lib.LAST}/)")
  state = _restore_state(state, restored[0])
  return state, mesh, train_lib.make_eval_step(config, mesh)


def curvature(state, config):
  return float(hysac_lib.head_scalars(jax.device_get(state.params),
                                      config.model.curv_init)["curv"])

