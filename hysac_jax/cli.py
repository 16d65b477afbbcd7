"""One rule for every command-line tool of hysac-jax.

An expected failure (bad input, a bad config field, a missing or corrupt file,
a locked run directory) ends in one line on stderr, ``PROG: error: MESSAGE``,
naming the file, field or step, and a documented exit code. A traceback means
a bug. The exit codes, shared by ``train.py``, ``eval.py`` and
``python -m hysac_jax.{convert,export,predict}``:

=====  ===============================================================
code   meaning
=====  ===============================================================
0      success
1      expected failure: the one-line error says what and where
2      usage: bad or missing command-line flags
3      partial (predict): some inputs were answered with an error record
75     preempted (SIGTERM / SIGINT): a checkpoint was saved; rerun the
       same command to resume (``EX_TEMPFAIL``, so schedulers requeue)
=====  ===============================================================
"""

import sys

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3
EXIT_PREEMPTED = 75


class CLIError(Exception):
  """An expected failure whose message is the whole story (no traceback)."""

  exit_code = EXIT_ERROR

  def __init__(self, message, exit_code=None):
    super().__init__(message)
    if exit_code is not None:
      self.exit_code = exit_code


def fail(prog, message, exit_code=EXIT_ERROR):
  """Prints ``PROG: error: MESSAGE`` as one line on stderr; returns the code."""
  one_line = " ".join(str(message).split())
  print(f"{prog}: error: {one_line}", file=sys.stderr, flush=True)
  return exit_code
