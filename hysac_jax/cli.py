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
130    interrupted (a second Ctrl-C, or one before anything was saved)
=====  ===============================================================

``run_guarded`` turns expected exceptions into that line and code;
``absl_flags_parser`` does the same for command lines absl or ml_collections
reject (unknown flag or ``--config.FIELD``, bad value, missing config file).
"""

import re
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


EXIT_INTERRUPTED = 130  # A second Ctrl-C, or one before a run could save.


def run_guarded(prog, fn, *args, expected=(), **kwargs):
  """Calls `fn`; returns its exit code, or the code of an expected failure.

  `CLIError` gives its own code, an exception of a type in `expected` gives
  EXIT_ERROR, `absl.app.UsageError` EXIT_USAGE and KeyboardInterrupt
  EXIT_INTERRUPTED, each after one line `PROG: error: ...`. Anything else
  propagates: a traceback means a bug.
  """
  # absl is for the absl tools (train.py, eval.py); the argparse ones
  # (convert, export, predict, index) need not load it.
  from absl import app
  try:
    return fn(*args, **kwargs)
  except CLIError as e:
    return fail(prog, e, e.exit_code)
  except app.UsageError as e:
    return fail(prog, e, EXIT_USAGE)
  except KeyboardInterrupt:
    return fail(prog, "interrupted", EXIT_INTERRUPTED)
  except expected as e:  # pylint: disable=catching-non-exception
    return fail(prog, e, EXIT_ERROR)


def _config_field_error(error, argv, config=None):
  """One line for ml_collections' unknown-field error: an AttributeError (an
  unknown last field, ``--config.model.modee``) or a KeyError (an unknown
  group, ``--config.training.x``), each holding the repr of a message such
  as "'modee'\\nDid you mean ...". Without such a hint, and given the
  loaded `config`, the line lists the fields the group does have."""
  text = str(error).strip()
  for _ in range(2):  # Unwrap the repr(s) around the KeyError's message.
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
      text = text[1:-1].encode().decode("unicode_escape")
  not_a_group = re.search(r"Attribute <class '(\w+)'>\.(\w+) does not exist.*"
                          r"lookup: ([\w.]+)", text)
  if not_a_group:
    kind, key, path = not_a_group.groups()
    parent = path[:-len(key) - 1]
    return (f"--config.{path}: config.{parent} is a value ({kind}), not a "
            f"group of fields, so it has no field {key!r}")
  key, _, hint = text.partition("\n")
  key = key.strip("'\"")
  flag = next((a.split("=")[0] for a in argv
               if a.startswith("--config.") and
               key in a.split("=")[0].split(".")), None)
  where = f"{flag}: " if flag else ""
  hint = hint.strip()
  if not hint and flag and config is not None:
    hint = _fields_beside(config, flag, key)
  return f"{where}unknown config field {key!r}. {hint}".strip()


def _fields_beside(config, flag, key):
  """"config.GROUP has: a, b, c" for the group that lacks `key` in `flag`
  (--config.GROUP.KEY...), or "" when the path cannot be followed."""
  path = flag[2:].split(".")[1:]
  group, name = config, "config"
  for part in path[:path.index(key)]:
    try:
      group, name = group[part], f"{name}.{part}"
    except (KeyError, TypeError):
      return ""
  if not hasattr(group, "keys"):
    return ""
  return f"{name} has: {', '.join(sorted(group.keys()))}"


class _ConfigFileError(Exception):
  pass


def _load_config_files(flag_values):
  """Loads every ml_collections config-file flag now (they load lazily),
  so a missing or broken file is a command-line error."""
  for name in list(flag_values):
    flag = flag_values[name]
    if (type(flag).__module__.startswith("ml_collections")
        and flag.present and name == flag.name):
      value = flag.value
      if type(value).__name__ == "_ErrorConfig":  # Holds the load error.
        error = object.__getattribute__(value, "_error")
        lines = [l.strip() for l in str(error).splitlines() if l.strip()]
        raise _ConfigFileError(
            f"--{name}={flag.serialize().partition('=')[2]}: cannot load "
            f"the config file: {lines[-1].strip(chr(34)) if lines else error!r}")


def _loaded_config(flag_values, argv):
  """The --config file of `argv` loaded afresh (without its overrides), or
  None. Used only to list a group's fields in an error line."""
  args = list(argv[1:])
  path = next((a.partition("=")[2] for a in args if a.startswith("--config=")),
              None)
  if path is None and "--config" in args[:-1]:
    path = args[args.index("--config") + 1]
  try:
    return flag_values["config"].parser.parse(path) if path else None
  except Exception:  # pylint: disable=broad-except
    return None


def _without_traceback(message):
  """absl's message for a config file whose get_config raised holds the
  whole traceback: keep the text before it and its last line."""
  head, marker, tail = message.partition("Traceback (most recent call last):")
  if not marker:
    return message
  last = [l.strip() for l in tail.splitlines() if l.strip()]
  return f"{head.strip()} {last[-1] if last else ''}".strip()


def absl_flags_parser(prog):
  """A `flags_parser` for `absl.app.run` that reports bad command lines in
  one line with EXIT_USAGE: unknown flags, bad values, missing required
  flags, unknown `--config.FIELD` overrides and config files that do not
  load (ml_collections raises these outside absl's flags.Error)."""
  from absl import flags  # As in run_guarded: absl tools only.

  def parse(argv):
    try:
      rest = flags.FLAGS(argv)
      _load_config_files(flags.FLAGS)
      return rest
    except flags.Error as e:
      message = _without_traceback(str(e))
      if "Unknown command line flag 'config." in message and not any(
          a.startswith("--config=") or a == "--config" for a in argv[1:]):
        message += " (a --config.FIELD override needs --config FILE)"
    except (AttributeError, KeyError) as e:
      message = _config_field_error(e, argv, _loaded_config(flags.FLAGS, argv))
    except _ConfigFileError as e:
      message = str(e)
    except (SyntaxError, ImportError, NameError) as e:
      # Raised while executing a --config file.
      where = (f" ({e.filename}, line {e.lineno})"
               if isinstance(e, SyntaxError) else "")
      message = (f"cannot load the config file: {type(e).__name__}: "
                 f"{getattr(e, 'msg', None) or e}{where}")
    sys.exit(fail(prog, message, EXIT_USAGE))

  return parse
