"""The run-directory lock (hysac_jax/run_lock.py)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hysac_jax import run_lock

ROOT = Path(__file__).resolve().parents[1]


def test_second_lock_is_refused_with_the_holders_pid(tmp_path):
  with run_lock.RunLock(tmp_path) as held:
    record = json.loads((tmp_path / ".lock").read_text())
    assert record["pid"] == os.getpid()
    assert record["host"] == socket.gethostname()
    with pytest.raises(run_lock.RunLocked,
                       match=f"in use by PID {os.getpid()} on host "):
      run_lock.RunLock(tmp_path).acquire()
    assert held.stale is None
  # Released: the record is emptied and the lock can be taken again.
  assert (tmp_path / ".lock").read_text() == ""
  with run_lock.RunLock(tmp_path) as again:
    assert again.stale is None


def test_lock_of_a_dead_process_is_taken_over(tmp_path):
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  record = {"pid": dead.pid, "host": socket.gethostname(),
            "started": "2026-01-01T00:00:00"}
  (tmp_path / ".lock").write_text(json.dumps(record))
  with run_lock.RunLock(tmp_path) as lock:
    assert lock.stale == record
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()


def test_lock_held_by_another_process_names_it(tmp_path):
  holder = subprocess.Popen(
      [sys.executable, "-c",
       "import sys, time; from hysac_jax import run_lock; "
       f"run_lock.RunLock({str(tmp_path)!r}).acquire(); "
       "print('held', flush=True); time.sleep(60)"],
      stdout=subprocess.PIPE, text=True,
      env=dict(os.environ, PYTHONPATH=str(ROOT)))
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(run_lock.RunLocked, match=f"PID {holder.pid} on"):
      run_lock.RunLock(tmp_path).acquire()
  finally:
    holder.kill()
    holder.wait()
  # The holder died without releasing: its record is stale, the lock free.
  with run_lock.RunLock(tmp_path) as lock:
    assert lock.stale["pid"] == holder.pid
