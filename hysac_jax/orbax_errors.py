"""Orbax calls that fail in one line.

Orbax wraps a TensorStore error in a page of spec, logs each failed write
thread's traceback, and leaves a failed restore's other reads to report
long after the program's own error. `call_quietly` (a restore) and
`save_quietly` (a write) reduce a failure to one line naming the innermost
cause (`root_cause`); `silence_failed_restore_reports` filters the late
reports. The run store (`checkpoint`) and the orbax export
(`formats.exports`) both go through them.
"""

import gc
import logging
import re
import sys
import threading

from hysac_jax import cli


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
