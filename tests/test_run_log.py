"""Metric logging (hysac_jax/run_log.py)."""

import json

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
