"""eval.py, export and predict on one small run: one alpha everywhere, and
every expected failure in one `PROG: error: ...` line (hysac_jax/cli.py).

The run is made without training (a random tiny model saved as the trainer
saves it), so that the checks are about the command-line tools.
"""

import gc
import json
import logging
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from hysac_jax import checkpoint as ckpt_lib
from hysac_jax import cli
from hysac_jax import config as config_lib
from hysac_jax import evaluate_run
from hysac_jax import export
from hysac_jax import predict
from hysac_jax import safety
from hysac_jax import serving
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
  tiny_runs.save_run(workdir, config)
  return config


def cli_run(*argv, timeout=300):
  return subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT,
                        env=tiny_runs.run_env(), capture_output=True, text=True,
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
  model = serving.load_model(run_dir)
  assert model.traversal_alpha == RUN_ALPHA
  dist = {g: np.asarray(safety.origin_distance(emb, model.curv)) for g, emb in (
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
  # The report says what it evaluated (a run given no lock: not training).
  evaluated = json.loads((tmp_path / "eval" / "report.json").read_text())[
      "evaluated"]
  assert evaluated["checkpoint_kind"] in ("best_recall", "checkpoints")
  assert (run_dir / evaluated["checkpoint_kind"] /
          str(evaluated["step"])).is_dir()
  assert not evaluated["training"]

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
  # eval.py on the export takes the bounds its head carries (not bounds
  # computed from the evaluated split): the same thresholds as the run's.
  exported_report, _ = evaluate_run.run(
      config=config, model_dir=str(out / "orbax"), split="test",
      out_dir=str(tmp_path / "eval_export"), plots=False)
  assert exported_report["bounds_source"] == str(
      out / "orbax" / export.HEAD_FILE)
  assert exported_report["bounds"] == report["bounds"]
  for modality in ("text", "image"):
    assert exported_report["classification"][modality]["threshold"] == (
        pytest.approx(report["classification"][modality]["threshold"],
                      rel=1e-6))
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


# --------------------------------------------- one-line errors: eval.py ---


@pytest.mark.slow
@pytest.mark.parametrize("flags,exit_code,message", [
    (["--config.model.modee=hyp"], 2,
     "--config.model.modee: unknown config field 'modee'. Did you mean"),
    (["--split=nonsense"], 2, "--split"),
    (["--config=/no/such/config.py"], 2,
     "--config=/no/such/config.py: cannot load the config file"),
    (["--out=/dev/null/report"], 1,
     "--out /dev/null/report cannot be created: /dev/null is a file"),
])
def test_eval_bad_flags_give_one_line_before_any_work(run_dir, tmp_path,
                                                      flags, exit_code,
                                                      message):
  data_dir = tmp_path / "tfds"
  base = ["--workdir", run_dir,
          f"--config={ROOT / 'configs' / 'tiny.py'}",
          f"--config.data.data_dir={data_dir}"]
  if any(f.startswith("--config=") for f in flags):
    base = base[:2]
  out = cli_run(ROOT / "eval.py", *base, *flags)
  assert out.returncode == exit_code, out.stderr[-3000:]
  assert message in one_error_line(out, "eval.py")
  assert not data_dir.exists()  # nothing built or embedded


def test_eval_takes_a_runs_own_config_and_sends_other_models_to_model(
    tmp_path):
  export_dir = tmp_path / "hf"
  export_dir.mkdir()
  (export_dir / "hysac_head.json").write_text(json.dumps(
      {"format": serving.EXPORT_FORMAT, "kind": "hf"}))
  with pytest.raises(ValueError, match=f"--workdir {export_dir} holds a model "
                     "of kind 'hf', not a training run: evaluate it with "
                     f"--model {export_dir} --config FILE"):
    evaluate_run.saved_config(str(export_dir), "--workdir")
  assert evaluate_run.saved_config(str(export_dir), "--model") is None
  run = tmp_path / "run"
  (run / "checkpoints").mkdir(parents=True)
  (run / "config.json").write_text(json.dumps({"model": {"mode": "euc"},
                                               "train": {}}))
  for flag in ("--workdir", "--model"):  # a run passed as --model, too
    assert evaluate_run.saved_config(str(run), flag).model.mode == "euc"


def test_export_platforms_are_checked_by_the_command_line(capsys):
  with pytest.raises(SystemExit) as raised:
    export.main(["--model", "m", "--out", "o", "--format", "stablehlo",
                 "--platforms", "gpu"])
  assert raised.value.code == cli.EXIT_USAGE
  assert "invalid choice: 'gpu'" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_of_a_corrupt_bounds_file_fails_before_embedding(tmp_path):
  data_dir = tmp_path / "tfds"
  run = tmp_path / "run"
  make_run(run, data_dir)
  (run / "bounds.json").write_text('{"S": {"avg": 1.0, "up_')
  out = cli_run(ROOT / "eval.py", "--workdir", run)
  assert out.returncode == 1
  line = one_error_line(out, "eval.py")
  assert f"bounds file is not valid JSON: {run / 'bounds.json'}" in line
  assert not data_dir.exists()


def test_eval_of_a_corrupt_run_config_names_it(tmp_path):
  (tmp_path / "config.json").write_text('{"model": {')
  with pytest.raises(ValueError,
                     match=f"{tmp_path / 'config.json'} is not valid JSON"):
    evaluate_run.run(workdir=str(tmp_path))


@pytest.mark.slow
def test_eval_of_a_run_without_checkpoints_creates_nothing(tmp_path):
  run = tmp_path / "run"
  config_lib.save_config(small_config(tmp_path / "tfds"), run)
  out = cli_run(ROOT / "eval.py", "--workdir", run)
  assert out.returncode == 1
  assert "but no checkpoints" in one_error_line(out, "eval.py")
  assert sorted(os.listdir(run)) == ["config.json"]


def corrupt_copy(run_dir, tmp_path):
  """A copy of the run with its largest checkpoint file truncated."""
  import shutil  # pylint: disable=g-import-not-at-top
  bad = tmp_path / "bad_run"
  shutil.copytree(run_dir, bad)
  files = [p for p in (bad / "best_recall" / "4" / "state").rglob("*")
           if p.is_file()]
  largest = max(files, key=lambda p: p.stat().st_size)
  with open(largest, "r+b") as f:
    f.truncate(1000)
  return bad


@pytest.mark.slow
def test_corrupt_checkpoint_gives_one_line_naming_the_step(run_dir, tmp_path,
                                                           capsys):
  bad = corrupt_copy(run_dir, tmp_path)
  step_dir = str(bad / "best_recall" / "4")
  out = cli_run(ROOT / "eval.py", "--workdir", bad)
  assert out.returncode == 1
  assert f"checkpoint {step_dir} cannot be restored: " in one_error_line(
      out, "eval.py")

  capsys.readouterr()
  assert export.main(["--model", str(bad), "--out", str(tmp_path / "o"),
                      "--format", "hf"]) == 1
  (line,) = capsys.readouterr().err.splitlines()
  assert line.startswith("python -m hysac_jax.export: error: checkpoint "
                         f"{step_dir} cannot be restored")
  assert predict.main(["--model", str(bad), "--text", "a cat"]) == 1
  captured = capsys.readouterr()
  (line,) = captured.err.splitlines()
  assert line.startswith("python -m hysac_jax.predict: error: checkpoint "
                         f"{step_dir} cannot be restored")
  assert json.loads(captured.out)["model"] == str(bad)


def test_eval_with_a_missing_visu_manual_dir_names_it_first(run_dir, tmp_path,
                                                            monkeypatch):
  def restore(*args, **kwargs):
    raise AssertionError("restored before checking the data")

  monkeypatch.setattr(serving, "load_model", restore)
  config = small_config(tmp_path / "tfds")
  config.data.name = "visu"
  config.data.manual_dir = str(tmp_path / "no_visu_here")
  with pytest.raises(FileNotFoundError,
                     match=f"manual_dir {tmp_path / 'no_visu_here'} does "
                           "not exist"):
    evaluate_run.run(config=config, workdir=str(run_dir),
                     out_dir=str(tmp_path / "eval"))
  assert not (tmp_path / "tfds").exists()


# ----------------------------------- one-line errors: export and convert ---


def test_export_and_convert_out_that_is_a_file(run_dir, tmp_path, capsys):
  from hysac_jax import convert  # pylint: disable=g-import-not-at-top
  out = tmp_path / "out.txt"
  out.write_text("not a directory")
  capsys.readouterr()
  assert export.main(["--model", str(run_dir), "--out", str(out),
                      "--format", "orbax"]) == cli.EXIT_ERROR
  (line,) = capsys.readouterr().err.splitlines()
  assert line == (f"python -m hysac_jax.export: error: --out {out} is a "
                  "file, not a directory")
  assert convert.main(["--clip", str(tmp_path), "--out",
                       str(out)]) == cli.EXIT_ERROR
  (line,) = capsys.readouterr().err.splitlines()
  assert line == (f"python -m hysac_jax.convert: error: --out {out} is a "
                  "file, not a directory")
  assert out.read_text() == "not a directory"


def test_predict_on_a_truncated_export_gives_one_line(run_dir, tmp_path,
                                                      capsys):
  out = tmp_path / "exported"
  assert export.main(["--model", str(run_dir), "--out", str(out),
                      "--format", "orbax", "stablehlo", "--platforms",
                      "cpu"]) == 0
  largest = max((p for p in (out / "orbax" / "params").rglob("*")
                 if p.is_file()), key=lambda p: p.stat().st_size)
  with open(largest, "r+b") as f:
    f.truncate(1000)
  with open(out / "stablehlo" / export.STABLEHLO_PARAMS_FILE, "r+b") as f:
    f.truncate(100)
  for fmt, message in (("orbax", f"orbax export {out / 'orbax' / 'params'} "
                                 "cannot be restored: "),
                       ("stablehlo", f"{out / 'stablehlo'}/params.safetensors"
                                     " is not a readable safetensors file")):
    capsys.readouterr()
    assert predict.main(["--model", str(out / fmt), "--text", "a cat"]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("python -m hysac_jax.predict: error: " + message)


def test_closed_event_loop_noise_is_dropped_and_other_errors_kept(
    monkeypatch):
  """After a failed restore, TensorStore threads report "Event loop is
  closed" once per pending read; only that error is silenced, in each hook
  such a thread may report through."""
  import threading  # pylint: disable=g-import-not-at-top
  import types  # pylint: disable=g-import-not-at-top
  seen = []
  monkeypatch.setattr(sys, "excepthook",
                      lambda t, e, tb: seen.append(("sys", str(e))))
  monkeypatch.setattr(threading, "excepthook",
                      lambda a: seen.append(("thread", str(a.exc_value))))
  monkeypatch.setattr(sys, "unraisablehook",
                      lambda a: seen.append(("unraisable", str(a.exc_value))))
  ckpt_lib.silence_failed_restore_reports()
  # Orbax wraps the failed read's TensorStore error; a coroutine freed at
  # exit reports the wrapper.
  wrapped = Exception("Encountered error while reading array index: (0,)")
  wrapped.__cause__ = ValueError('OUT_OF_RANGE: Error reading "k/0.0"')
  # A read still pending when its coroutine is freed: Orbax wraps the
  # GeneratorExit that closing it throws in.
  closed = Exception("Encountered error while reading array index: (1,)")
  closed.__cause__ = GeneratorExit()
  for error in (RuntimeError("Event loop is closed"), wrapped, closed,
                RuntimeError("something else"),
                ValueError("bad value: OUT_OF_RANGE: not at the start")):
    args = types.SimpleNamespace(exc_type=type(error), exc_value=error)
    sys.excepthook(type(error), error, None)
    threading.excepthook(args)
    sys.unraisablehook(args)
  kept = ("something else", "bad value: OUT_OF_RANGE: not at the start")
  assert seen == [(hook, message) for message in kept
                  for hook in ("sys", "thread", "unraisable")]


def test_abandoned_read_futures_are_not_logged_but_other_asyncio_errors_are(
    caplog):
  """Futures of a failed restore, freed late (some at exit), make asyncio log
  "Future exception was never retrieved" after the one-line error; those
  holding a TensorStore error are dropped once a restore has failed."""
  import asyncio  # pylint: disable=g-import-not-at-top

  def free_failed_future(error):
    loop = asyncio.new_event_loop()
    future = loop.create_future()
    future.set_exception(error)
    del future  # never retrieved: asyncio logs it when freed
    gc.collect()
    loop.close()

  ckpt_lib.silence_failed_restore_reports()
  ckpt_lib.silence_failed_restore_reports()  # installed once, however called
  asyncio_logger = logging.getLogger("asyncio")
  assert sum(type(f).__name__ == "_AbandonedReadFilter"
             for f in asyncio_logger.filters) == 1
  with caplog.at_level(logging.ERROR, logger="asyncio"):
    free_failed_future(ValueError(
        'OUT_OF_RANGE: Error reading "params.kernel/0" in OCDBT database'))
    free_failed_future(ValueError("a bug of ours"))
  records = [r for r in caplog.records if r.name == "asyncio"]
  assert len(records) == 1
  assert "never retrieved" in records[0].getMessage()
  assert str(records[0].exc_info[1]) == "a bug of ours"
