"""Output directories of the command-line tools: never replace by accident.

`check` refuses, before any work, an output that is a file, cannot be
created or written, or is a non-empty directory (unless `overwrite`);
`check_writable` only the first three (eval.py, whose reports are rewritten). `write_in_place` writes a directory beside
its place and moves it there when complete, so a failed or interrupted
write leaves the earlier directory whole, and an overwrite leaves no stale
file of the old one in the new one.
"""

import os
import shutil
import sys
import tempfile


class OutputExistsError(ValueError):
  """An output that is a file, or a non-empty directory without overwrite."""


def check_writable(path, what="--out"):
  """Raises `OutputExistsError` unless the directory `path` exists or can
  be created: it, or its nearest existing ancestor, must be a writable
  directory. Creates nothing, so a command can check before its work."""
  if os.path.exists(path) and not os.path.isdir(path):
    raise OutputExistsError(f"{what} {path} is a file, not a directory")
  parent = os.path.abspath(os.path.expanduser(path))
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise OutputExistsError(f"{what} {path} cannot be created: {parent} is "
                            "a file")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise OutputExistsError(f"{what} {path} cannot be written: no write "
                            f"permission in {parent}")


def check(path, overwrite=False, what="--out"):
  """Raises `OutputExistsError` if `path` cannot be written (see
  `check_writable`), or is a non-empty directory and not `overwrite`.
  `what` names the path in the message."""
  check_writable(path, what)
  if os.path.isdir(path) and os.listdir(path) and not overwrite:
    raise OutputExistsError(
        f"{what} {path} is not empty: pass --overwrite to replace it (an "
        "earlier output?), or choose another directory")


def remove_leftovers(parent, name):
  """Removes `.NAME.partial-*` / `.NAME.replaced-*` directories in `parent`
  that a killed write (SIGKILL: no `finally` ran) left; notes each on
  stderr. Returns the removed paths."""
  removed = []
  for entry in sorted(os.listdir(parent)):
    if entry.startswith((f".{name}.partial-", f".{name}.replaced-")):
      path = os.path.join(parent, entry)
      if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
  if removed:
    print(f"note: removed {len(removed)} directory(ies) left by an "
          f"interrupted earlier write: {', '.join(removed)}",
          file=sys.stderr, flush=True)
  return removed


def write_in_place(final, writer):
  """Runs `writer(directory)` on a fresh sibling of `final`, then moves it
  to `final`, replacing what was there. Returns what `writer` returns.

  A failure leaves `final` as it was, and no `.NAME.partial-*` directory;
  those a killed earlier write left are removed first (`remove_leftovers`).
  """
  parent, name = os.path.split(os.path.abspath(final))
  os.makedirs(parent, exist_ok=True)
  remove_leftovers(parent, name)
  partial = tempfile.mkdtemp(prefix=f".{name}.partial-", dir=parent)
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(partial, 0o777 & ~umask)  # as os.makedirs would (mkdtemp: 0700)
  try:
    result = writer(partial)
  except BaseException:
    shutil.rmtree(partial, ignore_errors=True)
    raise
  if os.path.lexists(final):
    old = tempfile.mkdtemp(prefix=f".{name}.replaced-", dir=parent)
    os.rename(final, os.path.join(old, name))
    os.rename(partial, final)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.rename(partial, final)
  return result
