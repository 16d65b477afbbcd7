"""Metric logging (hysac_jax/run_log.py)."""

import json
import struct

from hysac_jax import run_log


def _steps(path):
  return [json.loads(l)["step"] for l in path.read_text().splitlines()]


def test_resume_moves_lines_after_the_checkpoint_aside(tmp_path):
  path = tmp_path / "metrics.jsonl"
  lines = [{"step": s, "kind": k, "loss": 1.0 / s}
           for s, k in [(2, "train"), (4, "train"), (4, "val"), (6, "train")]]
  path.write_text("".join(json.dumps(l) + "\n" for l in lines)
                  + '{"step": 8, "ki')  # torn by a kill mid-write
  log = run_log.RunLog(tmp_path, enabled=True, start_step=4)
  assert log.discarded == 2
  log.write(6, {"loss": 0.5})
  log.close()
  assert _steps(path) == [2, 4, 4, 6]
  kept = path.read_text().splitlines()
  assert json.loads(kept[-1])["loss"] == 0.5  # the resumed run's step 6
  discarded = (tmp_path / "metrics.jsonl.discarded").read_text()
  assert json.loads(discarded.splitlines()[0]) == lines[3]
  assert discarded.splitlines()[1] == '{"step": 8, "ki'


def test_fresh_run_keeps_nothing_logged_past_step_zero(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 10, "kind": "train"}\n')
  run_log.RunLog(tmp_path, enabled=True).close()
  assert path.read_text() == ""
  assert _steps(tmp_path / "metrics.jsonl.discarded") == [10]


def _events(path):
  """The Event records of a TensorBoard file (TFRecord framing: length,
  its CRC, the data, its CRC)."""
  from tensorboardX.proto import event_pb2
  data, events, at = path.read_bytes(), [], 0
  while at < len(data):
    (length,) = struct.unpack("<Q", data[at:at + 8])
    event = event_pb2.Event()
    event.ParseFromString(data[at + 12:at + 12 + length])
    events.append(event)
    at += 12 + length + 4
  return events


def test_resumed_tensorboard_purges_events_past_the_checkpoint(tmp_path):
  from tensorboardX.proto import event_pb2
  first = run_log.RunLog(tmp_path, enabled=True)
  for step in (2, 4, 6):
    first.write(step, {"loss": 1.0})
  first.close()
  assert len(list((tmp_path / "tensorboard").iterdir())) == 1
  run_log.RunLog(tmp_path, enabled=True, start_step=4).close()
  starts = [e.step for f in sorted((tmp_path / "tensorboard").iterdir())
            for e in _events(f)
            if e.session_log.status == event_pb2.SessionLog.START]
  # TensorBoard hides the earlier run's events at step >= 5 on reading this.
  assert starts == [5]
