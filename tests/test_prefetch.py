"""DevicePrefetch (hysac_jax/training/prefetch.py): batches placed ahead of
the step, and a data position that counts consumed batches only."""

import pytest

from hysac_jax.training import prefetch as prefetch_lib


class Counting:
  """An iterator of the integers from `next_batch`, with the pipeline's
  get_state/set_state, recording every batch drawn."""

  def __init__(self, total):
    self.total, self.next_batch, self.drawn = total, 0, []
    self.closed = False

  def __next__(self):
    if self.next_batch >= self.total:
      raise StopIteration
    self.drawn.append(self.next_batch)
    self.next_batch += 1
    return self.next_batch - 1

  def get_state(self):
    return {"next_batch": self.next_batch, "seed": 7}

  def set_state(self, state):
    self.next_batch = state["next_batch"]

  def close(self):
    self.closed = True

  steps_per_epoch = 3


def test_batches_are_placed_depth_ahead_and_the_state_counts_consumed():
  source = Counting(10)
  placed = []
  batches = prefetch_lib.DevicePrefetch(
      source, place=lambda b: placed.append(b) or ("on device", b), depth=2)
  assert batches.peek() == ("on device", 0)
  assert source.drawn == [0, 1] and batches.get_state()["next_batch"] == 0
  assert next(batches) == ("on device", 0)
  # Consumed one; the refill happens at the next fill (after dispatch).
  assert batches.get_state() == {"next_batch": 1, "seed": 7}
  batches.fill()
  assert source.drawn == [0, 1, 2] and placed == [0, 1, 2]
  assert batches.get_state()["next_batch"] == 1
  assert [next(batches)[1] for _ in range(3)] == [1, 2, 3]
  assert batches.get_state()["next_batch"] == 4
  assert batches.steps_per_epoch == 3


def test_resuming_from_the_state_draws_the_queued_batches_again():
  first = prefetch_lib.DevicePrefetch(Counting(10), place=lambda b: b)
  consumed = [next(first) for _ in range(4)]
  first.fill()
  state = first.get_state()
  second_source = Counting(10)
  second = prefetch_lib.DevicePrefetch(second_source, place=lambda b: b)
  second.set_state(state)
  assert consumed + list(second) == list(range(10))


def test_set_state_drops_the_queue_and_exhaustion_ends_iteration():
  source = Counting(3)
  batches = prefetch_lib.DevicePrefetch(source, place=lambda b: b, depth=2)
  assert list(batches) == [0, 1, 2]
  with pytest.raises(StopIteration):
    batches.peek()
  assert batches.get_state()["next_batch"] == 3
  batches.set_state({"next_batch": 1})
  assert next(batches) == 1 and batches.get_state()["next_batch"] == 2
  batches.close()
  assert source.closed


def test_time_spent_drawing_is_reported_once():
  ticks = iter(range(100))
  batches = prefetch_lib.DevicePrefetch(Counting(5), place=lambda b: b,
                                        depth=2, clock=lambda: next(ticks))
  batches.fill()  # two draws of one tick each
  assert batches.take_wait() == 2
  assert batches.take_wait() == 0


def test_depth_below_one_is_refused():
  with pytest.raises(ValueError, match="at least 1"):
    prefetch_lib.DevicePrefetch(Counting(1), place=lambda b: b, depth=0)
