"""eval.py, export and predict on one small run: one alpha everywhere, and
every expected failure in one `PROG: error: ...` line (hysac_jax/cli.py).

The run is made without training (a random tiny model saved as the trainer
saves it), so that the checks are about the command-line tools.
"""

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from hysac_jax import checkpoint as ckpt_lib
from hysac_jax import cli
from hysac_jax import evaluate_run
from hysac_jax import export
from hysac_jax import predict
from hysac_jax import safety
from hysac_jax import train_lib
from hysac_jax import trainer
from hysac_jax.data import pipeline
from hysac_jax.data import schema

import tiny_runs

ROOT = tiny_runs.ROOT
RUN_ALPHA = 3.0  # configs/tiny.py's eval.traversal_alpha, not the 0.8 default
SIZES = (16, 16, 16)


def small_config(data_dir):
  return tiny_runs.tiny_config(data_dir, {
      "data.synthetic_sizes": SIZES,
      "data.eval_batch_size_per_device": 4,
      "eval.traversal_alpha": RUN_ALPHA})


def make_run(workdir, data_dir):
  """config.json and a best_recall checkpoint, as train.py leaves them."""
  config = small_config(data_dir)
  init_key, step_key = jax.random.split(jax.random.key(config.seed))
  state = train_lib.create_train_state(config, init_key)
  trainer.save_config(config, workdir)
  checkpoints = ckpt_lib.RunCheckpoints(workdir)
  checkpoints.save(4, trainer.checkpoint_tree(state, step_key), {},
                   {"step": 4}, kind=ckpt_lib.BEST_RECALL)
  checkpoints.close()
  return config


def env():
  return dict(os.environ, PYTHONPATH=str(ROOT))


def cli_run(*argv, timeout=300):
  return subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT,
                        env=env(), capture_output=True, text=True,
                        timeout=timeout)


def one_error_line(out, prog):
  """The stderr of a failed run is one `PROG: error: ...` line."""
  lines = [l for l in out.stderr.splitlines() if l.strip()]
  assert len(lines) == 1, out.stderr[-3000:]
  assert lines[0].startswith(f"{prog}: error: "), lines[0]
  return lines[0]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_dir):
  workdir = tmp_path_factory.mktemp("run")
  make_run(workdir, data_dir)
  return workdir


# ------------------------------------------------------------- one alpha ---


def _split_between(distances, curv, alpha):
  """A bound b whose threshold b'(alpha) lies midway in the widest gap
  near the median of `distances`, so both verdicts occur and float32
  differences between batchings cannot flip one."""
  d = np.sort(distances)
  n = len(d)
  lo_i = max(1, n // 4)
  gaps = d[lo_i:n - lo_i] - d[lo_i - 1:n - lo_i - 1]
  i = lo_i - 1 + int(np.argmax(gaps))
  target = (d[i] + d[i + 1]) / 2
  lo, hi = -50.0, 50.0
  for _ in range(200):  # b' is increasing in b
    mid = (lo + hi) / 2
    if float(safety.safety_threshold(mid, curv, alpha)) < target:
      lo = mid
    else:
      hi = mid
  return lo


def test_eval_predict_and_export_flag_the_same_items_with_the_runs_alpha(
    run_dir, data_dir, tmp_path, capsys):
  config = small_config(data_dir)
  builder = pipeline.open_builder(config.data, 32)
  test = builder.as_data_source(split="test",
                                decoders=schema.skip_image_decoding())
  items = {"V": [], "G": [], "S": [], "U": []}
  for i in range(len(test)):
    r = test[i]
    for group, key in (("V", "safe_image"), ("G", "unsafe_image")):
      path = tmp_path / f"{group}{i}.png"
      path.write_bytes(r[key])
      items[group].append(str(path))
    items["S"].append(r["safe_caption"].decode())
    items["U"].append(r["unsafe_caption"].decode())

  # Bounds whose b' at the run's alpha splits the items.
  model = export.load_model(run_dir)
  assert model.traversal_alpha == RUN_ALPHA
  dist = {g: np.asarray(safety.unsafe_score(emb, model.curv)) for g, emb in (
      ("V", model.encode_image(np.stack([predict.read_image(p, 32)
                                         for p in items["V"] + items["G"]]))),
      ("S", model.encode_text(items["S"] + items["U"])))}
  bounds = {}
  for safe_group, unsafe_group in (("S", "U"), ("V", "G")):
    b = _split_between(dist[safe_group], model.curv, RUN_ALPHA)
    for g in (safe_group, unsafe_group):
      bounds[g] = {"avg": b - 0.1, "low_05": b - 0.2, "up_95": b}
  safety.save_bounds(bounds, run_dir / "bounds.json")

  report, _ = evaluate_run.run(workdir=str(run_dir), split="test",
                               out_dir=str(tmp_path / "eval"), plots=False)
  assert report["alpha"] == RUN_ALPHA

  def verdicts(model_dir, *extra):
    argv = ["--model", model_dir, *extra,
            "--image", *items["V"], *items["G"],
            "--text", *items["S"], *items["U"]]
    capsys.readouterr()
    assert predict.main([str(a) for a in argv]) == 0
    records = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    return records

  def accuracy(records, modality):
    recs = [r for r in records if r["type"] == modality]
    n = len(recs) // 2  # safe ones first, then the unsafe ones
    return (sum(not r["unsafe"] for r in recs[:n]) +
            sum(r["unsafe"] for r in recs[n:])) / len(recs)

  from_run = verdicts(run_dir)
  out = tmp_path / "exported"
  assert export.main(["--model", str(run_dir), "--out", str(out),
                      "--format", "orbax"]) == 0
  head = json.loads((out / "orbax" / export.HEAD_FILE).read_text())
  assert head["traversal_alpha"] == RUN_ALPHA
  from_export = verdicts(out / "orbax")
  assert [r["unsafe"] for r in from_export] == [r["unsafe"] for r in from_run]
  for modality in ("text", "image"):
    row = report["classification"][modality]
    recs = [r for r in from_run if r["type"] == modality]
    assert {r["unsafe"] for r in recs} == {True, False}  # not vacuous
    assert math.isclose(recs[0]["threshold"], row["threshold"], rel_tol=1e-6)
    assert head["thresholds"][modality] == pytest.approx(row["threshold"],
                                                         rel=1e-6)
    assert accuracy(from_run, modality) == row["accuracy_at_bounds"]

  # The release's alpha moves b' by about 1 here: other verdicts.
  overridden = verdicts(out / "orbax", "--traversal-alpha", "0.8")
  assert all(r["alpha"] == 0.8 for r in overridden)
  assert [r["unsafe"] for r in overridden] != [r["unsafe"] for r in from_run]
