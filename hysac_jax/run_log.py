"""Metric logging for a run: metrics.jsonl, TensorBoard and (optionally) W&B.

Only process 0 writes; other processes get a writer that drops everything, so
callers never need to check the process index themselves.

A run resumed from step N continues the same files. Lines a killed run logged
after its checkpoint (step > N) would repeat once the resumed run reaches
those steps again, so they are moved to metrics.jsonl.discarded (appended,
kept for the record of what the lost segment did) before the run goes on;
TensorBoard is told the same with `purge_step=N + 1`, which hides the old
events from step N + 1 on.
"""

import json
import math
import os
import sys
import time

import jax
import numpy as np
from tqdm import tqdm


def _scalar(value):
  value = np.asarray(jax.device_get(value))
  return value.item() if value.ndim == 0 else value.tolist()


def discard_after(path, step):
  """Moves the lines of a metrics.jsonl with "step" > `step` to
  PATH.discarded; returns how many moved."""
  if not os.path.exists(path):
    return 0
  keep, drop = [], []
  with open(path, encoding="utf-8") as f:
    for line in f:
      if not line.strip():
        continue
      try:
        late = int(json.loads(line)["step"]) > step
      except (ValueError, KeyError, TypeError):
        late = True  # A torn last line from a killed run.
      (drop if late else keep).append(line if line.endswith("\n")
                                      else line + "\n")
  if drop:
    with open(path + ".discarded", "a", encoding="utf-8") as f:
      f.writelines(drop)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      f.writelines(keep)
    os.replace(path + ".tmp", path)
  return len(drop)


class RunLog:
  """Writes `{"step", "kind", **metrics}` lines and TensorBoard scalars."""

  def __init__(self, workdir, use_wandb=False, config=None, enabled=None,
               start_step=0):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = self._wandb = self._jsonl = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "metrics.jsonl")
    self.discarded = discard_after(path, start_step)
    self._jsonl = open(path, "a", encoding="utf-8")
    # tensorboardX brings protobuf: imported when a run starts logging.
    from tensorboardX import SummaryWriter
    tb_dir = os.path.join(workdir, "tensorboard")
    earlier = os.path.isdir(tb_dir) and bool(os.listdir(tb_dir))
    self._tb = SummaryWriter(tb_dir,
                             purge_step=start_step + 1 if earlier else None)
    if use_wandb:
      try:
        import wandb  # An optional dependency.
      except ImportError as e:
        raise ImportError("config.train.use_wandb=True but wandb is not "
                          "installed: pip install wandb") from e
      self._wandb = wandb.init(
          dir=workdir, config=config.to_dict() if config is not None else None,
          resume="allow", id=os.path.basename(os.path.normpath(workdir)))

  def write(self, step, metrics, kind="train"):
    """Logs a dict of scalars at `step` under `kind` ("train", "val", ...)."""
    if not self.enabled:
      return
    values = {k: _scalar(v) for k, v in metrics.items()}
    line = {"step": int(step), "kind": kind, "time": time.time(), **values}
    # NaN/Inf are written as strings: strict JSON has no literal for them.
    line = {k: str(v) if isinstance(v, float) and not math.isfinite(v) else v
            for k, v in line.items()}
    self._jsonl.write(json.dumps(line, default=str) + "\n")
    self._jsonl.flush()
    for name, value in values.items():
      if isinstance(value, (int, float)) and math.isfinite(value):
        self._tb.add_scalar(f"{kind}/{name}", value, int(step))
    self._tb.flush()
    if self._wandb is not None:
      self._wandb.log({f"{kind}/{k}": v for k, v in values.items()},
                      step=int(step))

  def close(self):
    if self._jsonl is not None:
      self._jsonl.close()
      self._tb.close()
    if self._wandb is not None:
      self._wandb.finish()


class StartupTimes:
  """Wall-clock seconds of each start-up stage, printed as each one ends.

      startup = StartupTimes({"imports": 3.1})   # stages timed elsewhere
      ...; startup.mark("data")                   # "startup: data 1.2 s"

  Only process 0 prints (`enabled`). `times` keeps the stages in order.
  """

  def __init__(self, done=None, enabled=True):
    self.enabled = enabled
    self.times = {}
    for stage, seconds in (done or {}).items():
      self._record(stage, seconds)
    self._last = time.perf_counter()

  def mark(self, stage):
    """Ends `stage`: the time since the previous mark (or the start)."""
    now = time.perf_counter()
    self._record(stage, now - self._last)
    self._last = now

  def total(self):
    return sum(self.times.values())

  def _record(self, stage, seconds):
    self.times[stage] = float(seconds)
    if self.enabled:  # tqdm.write: a line of its own under a progress bar
      tqdm.write(f"startup: {stage} {seconds:.1f} s", file=sys.stdout)
      sys.stdout.flush()
