"""One writer per run directory: WORKDIR/.lock.

    with run_lock.RunLock(workdir):
      ...train...

The lock is an exclusive `flock` on WORKDIR/.lock; the file holds the
holder's PID, host and start time (JSON) so a refused run can say who holds
it. The kernel drops the `flock` when the holder dies, however it dies
(SIGKILL included), so a lock is never stale in the kernel's eyes; the file's
content, left behind by a holder that died, is what makes a lock "stale": the
next run takes it over and says whose it was. The file itself is never
deleted (deleting a lock file lets two runs lock two different files).

Multi-process runs: only process 0 takes the lock (it is the only process
that writes logs, and Orbax coordinates the checkpoint writes of the others).
A second run on the same shared workdir has its own process 0, which is
refused: Linux NFS clients map `flock` onto NFS byte-range locks, so this
holds across hosts on NFS. Filesystems without locks (some FUSE mounts)
fall back to the recorded PID: a live PID on this host, or any PID on
another host, holds the lock.

Readers (`eval.py`, export) never take the lock.
"""

import errno
import fcntl
import json
import os
import socket
import time

from hysac_jax import cli

LOCK_NAME = ".lock"


class RunLocked(cli.CLIError):
  """Another process holds the run directory."""


def _pid_alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Alive, owned by someone else.
    return True
  return True


def describe(holder):
  """"PID 123 on host h (since 2026-...)" for a lock record."""
  return (f"PID {holder.get('pid', '?')} on host {holder.get('host', '?')} "
          f"(since {holder.get('started', '?')})")


def holder(workdir):
  """The record of the process training in `workdir` now, or None.

  Read-only (eval.py and the exports never take the lock): a shared `flock`
  that cannot be had means a `train.py` holds the run. Without a lock file,
  or on a filesystem without locks, None.
  """
  path = os.path.join(os.path.abspath(workdir), LOCK_NAME)
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return None
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
        return RunLock._read(None, fd) or {}
      return None
    fcntl.flock(fd, fcntl.LOCK_UN)
    return None
  finally:
    os.close(fd)


class RunLock:
  """An exclusive lock on a run directory, held until `release()`."""

  def __init__(self, workdir):
    self.workdir = os.path.abspath(workdir)
    self.path = os.path.join(self.workdir, LOCK_NAME)
    self.stale = None  # The dead holder's record, when one was taken over.
    self._fd = None

  def _read(self, fd):
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    try:
      holder = json.loads(raw.decode("utf-8")) if raw.strip() else None
    except ValueError:
      holder = {"pid": "?", "host": "?", "started": raw[:40]}
    return holder if isinstance(holder, dict) else None

  def acquire(self):
    """Takes the lock or raises RunLocked naming the holder."""
    os.makedirs(self.workdir, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        kernel_lock = True
      except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
          holder = self._read(fd) or {}
          raise RunLocked(f"{self.workdir} is in use by {describe(holder)}; "
                          f"wait for it to finish or stop it") from None
        kernel_lock = False  # No locks on this filesystem: trust the record.
      holder = self._read(fd)
      if holder is not None and not kernel_lock:
        here = holder.get("host") == socket.gethostname()
        if not here or _pid_alive(int(holder.get("pid", -1))):
          raise RunLocked(f"{self.workdir} is in use by {describe(holder)} "
                          f"(this filesystem has no file locks; remove "
                          f"{self.path} if that process is gone)")
      if holder is not None:
        self.stale = holder
      record = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
      os.ftruncate(fd, 0)
      os.lseek(fd, 0, os.SEEK_SET)
      os.write(fd, (json.dumps(record) + "\n").encode("utf-8"))
      os.fsync(fd)
    except BaseException:
      os.close(fd)
      raise
    self._fd = fd
    return self

  def release(self):
    """Empties the record (a clean exit leaves no stale lock) and unlocks."""
    if self._fd is None:
      return
    try:
      os.ftruncate(self._fd, 0)
    finally:
      os.close(self._fd)  # Closing drops the flock.
      self._fd = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()
