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


def _config_flag_message(error, argv):
  """A one-line message for an exception raised while parsing absl flags.

  `ml_collections.config_flags` raises plain exceptions (OSError for a
  missing --config file, AttributeError / KeyError for an unknown field,
  with a "Did you mean ..." hint inside) that absl does not turn into a
  usage message; name the flag that caused it.
  """
  import re  # pylint: disable=g-import-not-at-top
  text = " ".join(str(error).replace("\\n", " ").replace("\\'", "'")
                  .split()).strip("'\" ")
  flags_given = [a for a in argv[1:] if a.startswith("--")]
  if isinstance(error, (AttributeError, KeyError)):
    match = re.match(r"'?([\w-]+)'?", text)
    field = match.group(1) if match else None
    hint = re.search(r"Did you mean .*", text)
    culprit = next((a.split("=", 1)[0] for a in flags_given
                    if field and re.search(rf"\.{re.escape(field)}(=|$|\.)",
                                           a.split("=", 1)[0])), None)
    if culprit:
      return (f"{culprit}: unknown config field {field!r}"
              + (f"; {hint.group(0)}" if hint else ""))
  if isinstance(error, OSError):
    import os  # pylint: disable=g-import-not-at-top
    values = [a.split("=", 1)[-1] for a in argv[1:]]
    for path in values:
      if path.endswith(".py") and not os.path.isfile(path):
        return f"config file not found: {path}"
  return f"bad flags: {type(error).__name__}: {text}"


def absl_flags_parser(prog):
  """A `flags_parser` for `absl.app.run`: flag errors in one line, exit 2.

  Covers what absl's own parser leaves as a traceback: a missing --config
  file, an unknown config field (`--config.model.modee=hyp`), a config file
  that raises. Usage: `app.run(main, flags_parser=cli.absl_flags_parser(P))`.
  """

  def parse(argv):
    from absl import flags  # pylint: disable=g-import-not-at-top
    try:
      remaining = flags.FLAGS(argv)
      for name in list(flags.FLAGS):
        flag = flags.FLAGS[name]
        if type(flag).__module__.startswith("ml_collections"):
          # A config file that failed to load gives a placeholder that
          # raises on first use: make that happen here, not inside main.
          getattr(flag.value, "keys", None)
      return remaining
    except flags.Error as e:  # unknown flag, bad value: absl's own message
      message = str(e)
      if "Unknown command line flag 'config." in message and not any(
          a.startswith("--config=") or a == "--config" for a in argv[1:]):
        message += " (a --config.FIELD override needs --config FILE)"
      sys.exit(fail(prog, message, EXIT_USAGE))
    except Exception as e:  # pylint: disable=broad-except
      # Raised by config_flags while loading or overriding a config.
      sys.exit(fail(prog, _config_flag_message(e, argv), EXIT_USAGE))

  return parse
