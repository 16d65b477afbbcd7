"""Timing shared by the benchmarks (imported as a sibling script module)."""

import statistics
import sys
import time


def _process_start():
  """Wall-clock time this process started (its import time without psutil)."""
  try:
    import psutil  # pylint: disable=g-import-not-at-top
    return psutil.Process().create_time()
  except Exception:  # pylint: disable=broad-except
    return time.time()


_T0 = [_process_start()]  # wall-clock origin of the progress stamps


def set_start(t0):
  """Stamps progress lines from wall-clock time `t0` (e.g. the parent
  process's start, passed to a worker process)."""
  _T0[0] = t0


def start_time():
  """The wall-clock origin of the progress stamps."""
  return _T0[0]


def elapsed():
  """Seconds since the process started (see `set_start`)."""
  return time.time() - _T0[0]


def progress(message):
  """Prints one flushed progress line, stamped with the seconds since the
  process started (this module's import, or `set_start`)."""
  print(f"[{elapsed():7.1f} s] {message}", flush=True)
  sys.stderr.flush()


def median_seconds(fn, repeats, label=None):
  """Median wall time of `fn()` over `repeats` runs, after one warm-up run
  (which also absorbs jit compilation). With `label`, prints a progress line
  per run."""
  start = time.perf_counter()
  fn()
  if label:
    progress(f"{label}: warm-up {time.perf_counter() - start:.3f} s")
  times = []
  for i in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
    if label:
      progress(f"{label}: run {i + 1}/{repeats} {times[-1]:.3f} s")
  return statistics.median(times)
