"""Batches placed on the devices ahead of the step, as flax's
`prefetch_to_device`, with a data position that counts consumed batches only.

    batches = DevicePrefetch(iterator, place=lambda b: shard_batch(b, mesh))
    for sharded in batches:          # already on the devices
      state, metrics = step(state, sharded, key)   # dispatched, not awaited
      batches.fill()                 # the next ones go up while it runs

`iterator` is a `hysac_jax.data.pipeline.InputIterator` (or anything with its
`get_state`/`set_state` and a `"next_batch"` position). A checkpoint taken
with `get_state()` resumes at the first batch no step has consumed, so the
`depth` batches sitting on the devices are drawn again after a restart.
"""

import collections
import time


class DevicePrefetch:
  """An iterator of placed batches, `depth` of them ahead of the consumer.

  Attributes:
    depth: batches kept on the devices ahead of the step (2 by default: one
      for the next step, one being transferred).
  """

  def __init__(self, batches, place, depth=2, clock=time.perf_counter):
    if depth < 1:
      raise ValueError(f"prefetch depth must be at least 1, got {depth}")
    self.depth = depth
    self._batches, self._place, self._clock = batches, place, clock
    self._queue = collections.deque()
    self._exhausted = False
    self._waited = 0.0

  def fill(self):
    """Draws and places batches until `depth` are queued (or none are left).

    Called right after a step is dispatched, so the host reads and the
    host-to-device copies overlap the step.
    """
    while len(self._queue) < self.depth and not self._exhausted:
      start = self._clock()
      try:
        batch = next(self._batches)
      except StopIteration:
        self._exhausted = True
        break
      finally:
        self._waited += self._clock() - start
      self._queue.append(self._place(batch))

  def peek(self):
    """The next placed batch, not consumed (the compile's example)."""
    self.fill()
    if not self._queue:
      raise StopIteration
    return self._queue[0]

  def __iter__(self):
    return self

  def __next__(self):
    self.fill()
    if not self._queue:
      raise StopIteration
    return self._queue.popleft()

  def take_wait(self):
    """Seconds spent drawing batches since the last call."""
    waited, self._waited = self._waited, 0.0
    return waited

  def get_state(self):
    """The wrapped iterator's state at the first unconsumed batch."""
    state = dict(self._batches.get_state())
    state["next_batch"] -= len(self._queue)
    return state

  def set_state(self, state):
    """Drops the queued batches and moves the wrapped iterator."""
    self._queue.clear()
    self._exhausted = False
    self._batches.set_state(state)

  def close(self):
    self._queue.clear()
    self._batches.close()

  @property
  def steps_per_epoch(self):
    return self._batches.steps_per_epoch
