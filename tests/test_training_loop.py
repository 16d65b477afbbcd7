"""The training loop (hysac_jax/training/loop.py) and the train.py / eval.py CLIs."""

import contextlib
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util
import pytest

from hysac_jax import checkpoint as ckpt_lib
from hysac_jax import cli
from hysac_jax import config as config_lib
from hysac_jax import evaluate_run
from hysac_jax import safety
from hysac_jax import serving
from hysac_jax.models import sizes
from hysac_jax.training import loop as loop_lib
from hysac_jax.training import restore as restore_lib

import numerics
import tiny_runs

ROOT = tiny_runs.ROOT
OVERRIDES = tiny_runs.MICRO_OVERRIDES  # 2 epochs of 4 steps


def micro_config(data_dir, **extra):
  return tiny_runs.tiny_config(data_dir, {**OVERRIDES, **extra})


def cli_flags(data_dir):
  return tiny_runs.tiny_cli_flags(data_dir, OVERRIDES)


run_env = tiny_runs.run_env


def final_state(workdir):
  """The `state` item of a run's latest checkpoint, as numpy."""
  steps = sorted(int(p.name) for p in (Path(workdir) / "checkpoints").iterdir()
                 if p.name.isdigit())
  path = Path(workdir) / "checkpoints" / str(steps[-1]) / "state"
  return steps[-1], ocp.PyTreeCheckpointer().restore(path)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def finished_run(data_dir, tmp_path_factory):
  """One uninterrupted in-process run of the micro config."""
  workdir = tmp_path_factory.mktemp("run")
  summary = loop_lib.train_and_evaluate(micro_config(data_dir), workdir)
  return workdir, summary


# ------------------------------------------------------------- config ---


@pytest.mark.parametrize("field,value", [
    ("model.mode", "poincare"), ("model.dtype", "float8"),
    ("model.size", "vit-huge"), ("data.name", "laion"),
    ("optim.schedule", "linear"), ("train.epochs", 0),
    ("data.batch_size_per_device", 0), ("model.lora.dropout", 1.5),
    ("data.synthetic_sizes", (128, 64)), ("data.synthetic_sizes", (128, 0, 64)),
    ("data.synthetic_sizes", ("(1,2,a)",)), ("model.remat", "some"),
    ("model.attention", "flash"), ("train.preemption_check_every", 0)])
def test_bad_config_value_names_the_field(field, value, tmp_path):
  c = micro_config(tmp_path, **{field: value})
  with pytest.raises(ValueError, match=f"config.{field.replace('.', '[.]')}="):
    config_lib.check_config(c)


def test_init_from_names_what_it_is_and_how_to_convert_it(tmp_path):
  export_dir = tmp_path / "hf"
  export_dir.mkdir()
  (export_dir / "hysac_head.json").write_text(
      '{"format": "hysac_jax.export", "kind": "hf"}')
  run = tmp_path / "run"
  (run / "checkpoints").mkdir(parents=True)
  (run / "config.json").write_text('{"model": {}, "train": {}}')
  for path, says in ((tmp_path / "missing", "there is no directory"),
                     (export_dir, "this is an hf export: convert it"),
                     (run, "this is a training run: to start from its "
                           "weights, export it as hf")):
    c = micro_config(tmp_path, **{"model.init_from": str(path)})
    with pytest.raises(ValueError, match="config.model.init_from=.*expected "
                       f"a converted directory.*; {says}"):
      config_lib.check_config(c)
  workdir = tmp_path / "new_run"
  with pytest.raises(ValueError, match="this is an hf export"):
    loop_lib.train_and_evaluate(micro_config(tmp_path), workdir,
                                init_from=str(export_dir))
  assert not workdir.exists()  # checked before the run directory is made


def test_visu_without_manual_dir_says_what_to_set(tmp_path):
  c = micro_config(tmp_path, **{"data.name": "visu", "data.manual_dir": ""})
  with pytest.raises(ValueError, match="config.data.manual_dir"):
    config_lib.check_config(c)


def test_cli_rejects_unknown_and_bad_fields(tmp_path):
  base = [sys.executable, str(ROOT / "train.py"), f"--workdir={tmp_path}"]
  out = subprocess.run(base + cli_flags(tmp_path) + ["--config.optim.lrr=1"],
                       capture_output=True, text=True, timeout=300,
                       env=run_env(), cwd=ROOT)
  assert out.returncode != 0 and "lrr" in out.stderr
  out = subprocess.run(
      base + cli_flags(tmp_path) + ["--config.model.mode=poincare"],
      capture_output=True, text=True, timeout=300, env=run_env(),
      cwd=ROOT)
  assert out.returncode == 1
  assert "config.model.mode='poincare'" in out.stderr


def train_cli(args, timeout=300, cwd=ROOT):
  return subprocess.run([sys.executable, str(ROOT / "train.py")] + args,
                        capture_output=True, text=True, timeout=timeout,
                        env=run_env(), cwd=cwd)


def assert_one_line_error(out, code, *fragments):
  """The run ended with `code` and one `train.py: error:` line last."""
  lines = [l for l in out.stderr.splitlines() if l.strip()]
  assert out.returncode == code, out.stderr[-3000:]
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  assert lines[-1].startswith("train.py: error: "), lines[-3:]
  for fragment in fragments:
    assert fragment in lines[-1], (fragment, lines[-1])
  return lines[-1]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["field", "config_file", "workdir_file",
                                  "empty_workdir", "sizes"])
def test_cli_bad_input_ends_in_one_line(case, tmp_path):
  flags = cli_flags(tmp_path) + [f"--workdir={tmp_path / 'run'}"]
  if case == "field":
    out = train_cli(flags + ["--config.model.modee=hyp"])
    assert_one_line_error(out, cli.EXIT_USAGE, "--config.model.modee",
                          'Did you mean "mode"')
    out = train_cli(flags + ["--config.training.epochs=1"])  # a group
    assert_one_line_error(out, cli.EXIT_USAGE, "--config.training.epochs",
                          'Did you mean "train"')
  elif case == "config_file":
    out = train_cli([f"--config={tmp_path / 'nope.py'}",
                     f"--workdir={tmp_path / 'run'}"])
    assert_one_line_error(out, cli.EXIT_USAGE, str(tmp_path / "nope.py"))
  elif case == "workdir_file":
    (tmp_path / "afile").write_text("")
    out = train_cli(cli_flags(tmp_path) + [f"--workdir={tmp_path / 'afile'}"])
    assert_one_line_error(out, cli.EXIT_ERROR, str(tmp_path / "afile"),
                          "is a file")
  elif case == "empty_workdir":  # would train into the current directory
    out = train_cli(cli_flags(tmp_path) + ["--workdir="], cwd=tmp_path)
    assert_one_line_error(out, cli.EXIT_USAGE, "--workdir is empty")
  else:
    out = train_cli(
        [f for f in flags if "synthetic_sizes" not in f]
        + ["--config.data.synthetic_sizes=(128,64)"])
    assert_one_line_error(out, cli.EXIT_ERROR, "config.data.synthetic_sizes")


def test_noresume_refuses_and_overwrite_moves_the_run_aside(tmp_path):
  workdir = tmp_path / "run"
  (workdir / "checkpoints" / "4").mkdir(parents=True)
  (workdir / "metrics.jsonl").write_text('{"step": 4}\n')
  with pytest.raises(FileExistsError,
                     match=f"{workdir} holds checkpoints up to step 4"):
    loop_lib.open_run_dir(str(workdir), resume=False)
  assert (workdir / "metrics.jsonl").exists()  # untouched
  lock = loop_lib.open_run_dir(str(workdir), overwrite=True)
  lock.release()
  assert sorted(os.listdir(workdir)) == [".lock"]
  (old,) = tmp_path.glob("run.old-*")
  assert sorted(os.listdir(old)) == ["checkpoints", "metrics.jsonl"]
  assert (old / "checkpoints" / "4").is_dir()


# ------------------------------------------------------ early stopping ---


def test_resume_refuses_a_config_that_changes_the_run(finished_run,
                                                      data_dir):
  """Resuming a run with another model, loss, optimiser or data would mix
  two runs in one: refused before anything is written, config.json kept."""
  workdir, _ = finished_run
  saved = (workdir / "config.json").read_text()
  changed = micro_config(data_dir, **{"model.mode": "euc",
                                      "loss.entail_weight": 0.5,
                                      "train.epochs": 3})
  with pytest.raises(ValueError) as raised:
    loop_lib.train_and_evaluate(changed, workdir)
  message = str(raised.value)
  assert "loss.entail_weight 1.0 (now 0.5)" in message, message
  assert "model.mode 'hyp' (now 'euc')" in message, message
  assert "train.epochs" not in message  # may change: train longer
  assert (workdir / "config.json").read_text() == saved
  loop_lib.check_resume_config(  # how it runs may change
      micro_config(data_dir, **{"train.epochs": 9, "model.remat": "full",
                                "eval.traversal_alpha": 2.0,
                                "data.batch_size_per_device": 4}), workdir)


@pytest.mark.parametrize("files,what", [
    ({"hysac_head.json": "{}", "model.safetensors": "w"}, "an export"),
    ({"config.json": '{"format": "hysac_jax.pretrained"}',
      "params.safetensors": "w"}, "a converted model"),
    ({"hysac_model.pth": "w"}, "a model in the release's format"),
    ({"config.json": '{"model_type": "clip"}'}, "a config.json of another"),
    ({"config.json": "{not json"}, "a config.json that is not valid JSON")])
def test_a_model_directory_is_not_trained_into(tmp_path, files, what):
  """--workdir on a converted model or an export would overwrite its
  config.json and bounds: refused, every file kept."""
  for name, text in files.items():
    (tmp_path / name).write_text(text)
  with pytest.raises(FileExistsError, match=f"holds {what}.*not a training "
                                            "run"):
    loop_lib.open_run_dir(str(tmp_path))
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(files)
  for name, text in files.items():
    assert (tmp_path / name).read_text() == text


def test_a_directory_with_other_files_or_a_run_opens(tmp_path):
  (tmp_path / "slurm-1234.out").write_text("log")  # the scheduler's own log
  loop_lib.open_run_dir(str(tmp_path)).release()
  (tmp_path / "config.json").write_text('{"model": {}, "train": {}}')
  loop_lib.open_run_dir(str(tmp_path)).release()  # a run (no step saved yet)


def test_early_stopping_follows_the_release_rule():
  stop = loop_lib.EarlyStopping(patience=2)
  assert stop.update(1.0, 0.5) == (True, True, False)
  assert stop.update(1.1, 0.4) == (False, False, False)   # worse: 1 left
  assert stop.update(1.2, 0.6) == (False, True, False)    # recall resets
  assert stop.remaining == 2
  assert stop.update(0.9, 0.1) == (True, False, False)    # loss resets
  assert stop.update(1.0, 0.1) == (False, False, False)
  assert stop.update(1.0, 0.1) == (False, False, True)    # patience spent
  again = loop_lib.EarlyStopping.from_json(stop.to_json())
  assert again == stop


@pytest.mark.slow
def test_early_stopping_ends_training_when_validation_loss_rises(
    data_dir, tmp_path, monkeypatch):
  calls = []

  def rising_validation(state, config, mesh, eval_step, image_size,
                        context_length, desc="validation"):
    calls.append(desc)
    n = len(calls)
    emb = {g: np.full((4, 8), 0.1 * n, np.float32) for g in "SUVG"}
    return emb, {"loss": float(n), "recall_sum": 1.0 / n}, 1.0

  monkeypatch.setattr(loop_lib, "validate", rising_validation)
  c = micro_config(data_dir, **{"train.epochs": 10, "train.patience": 2})
  summary = loop_lib.train_and_evaluate(c, tmp_path)
  assert summary["stopped_early"]
  # Epoch 1 sets the bests; epochs 2 and 3 spend the patience of 2.
  assert summary["epochs"] == 3
  assert summary["best"]["loss"] == 1.0
  assert sorted(int(p.name) for p in (tmp_path / "best_loss").iterdir()
                if p.name.isdigit()) == [4]


# ------------------------------------------------------------ failures ---


@pytest.mark.slow
def test_nan_in_a_batch_stops_training_without_saving_it(
    data_dir, tmp_path, monkeypatch):
  def poison_fourth(count, next_batch):
    batch = next_batch()
    if count == 4:  # the batch of step index 3
      batch = dict(batch)
      batch["safe_image"] = np.full_like(batch["safe_image"], np.nan)
    return batch

  tiny_runs.hook_train_batches(monkeypatch, poison_fourth)
  with pytest.raises(loop_lib.TrainingDiverged,
                     match=r"at step 3;.*last good checkpoint is step 2"):
    loop_lib.train_and_evaluate(micro_config(data_dir), tmp_path)
  step, state = final_state(tmp_path)
  assert step == 2
  for leaf in jax.tree.leaves(state):
    assert np.isfinite(np.asarray(leaf, np.float64)).all()


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT],
                         ids=["SIGTERM", "SIGINT"])
def test_sigterm_and_sigint_save_a_checkpoint_and_stop(
    signum, data_dir, tmp_path, monkeypatch):
  # Batches are drawn PREFETCH_BATCHES ahead of the step: the fifth is
  # drawn while step 2 (the third) runs, so the loop stops after it.
  def preempt_at_third(count, next_batch):
    if count == 3 + loop_lib.PREFETCH_BATCHES:
      os.kill(os.getpid(), signum)
    return next_batch()

  tiny_runs.hook_train_batches(monkeypatch, preempt_at_third)
  # The suite may start with SIGINT ignored (`make test &`, nohup), and the
  # loop rightly keeps an inherited SIG_IGN: give this process Python's
  # foreground Ctrl-C handler, as a terminal would.
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    summary = loop_lib.train_and_evaluate(micro_config(data_dir), tmp_path)
  finally:
    signal.signal(signal.SIGINT, previous)
  assert summary["preempted"] and summary["steps"] == 3
  assert summary["signal"] == signal.Signals(signum).name
  assert final_state(tmp_path)[0] == 3
  if signum != signal.SIGTERM:
    return
  # A line logged after the checkpoint (as by a run killed later) is moved
  # aside on resume, so the resumed run's steps are not repeated.
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write(json.dumps({"step": 4, "kind": "train", "loss": 9.0}) + "\n")
  monkeypatch.undo()
  summary = loop_lib.train_and_evaluate(micro_config(data_dir), tmp_path)
  assert summary["steps"] == 8 and not summary["preempted"]
  lines = [json.loads(l) for l in
           (tmp_path / "metrics.jsonl").read_text().splitlines()]
  train_steps = [l["step"] for l in lines if l["kind"] == "train"]
  assert train_steps == [2, 4, 6, 8]
  assert all(l.get("loss") != 9.0 for l in lines)
  discarded = (tmp_path / "metrics.jsonl.discarded").read_text()
  assert json.loads(discarded)["loss"] == 9.0


@pytest.mark.slow
def test_nothing_is_read_back_from_the_devices_between_log_steps(
    data_dir, tmp_path, monkeypatch):
  # On CPU a jax.Array is read without a transfer, so the transfer guard the
  # loop enters between log steps cannot fire here: count reads of array
  # values (what device_get, float() and np.asarray go through) inside it.
  array_type = type(jax.numpy.zeros(()))
  real_value = array_type._value
  reads = {"between_logs": 0, "elsewhere": 0}
  inside = []

  def counted(self):
    reads["between_logs" if inside else "elsewhere"] += 1
    return real_value.fget(self)

  real_guard = jax.transfer_guard_device_to_host

  @contextlib.contextmanager
  def guard(mode):
    assert mode == loop_lib.BETWEEN_LOGS_GUARD
    inside.append(mode)
    try:
      with real_guard(mode):
        yield
    finally:
      inside.pop()

  monkeypatch.setattr(array_type, "_value", property(counted))
  monkeypatch.setattr(jax, "transfer_guard_device_to_host", guard)
  summary = loop_lib.train_and_evaluate(
      micro_config(data_dir, **{"train.log_every": 4,
                                "train.checkpoint_every": 0}), tmp_path)
  monkeypatch.undo()
  assert summary["steps"] == 8
  assert reads["between_logs"] == 0
  assert reads["elsewhere"] > 0  # the log steps' metrics, the saves
  lines = [json.loads(l) for l in
           (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines if l["kind"] == "train"] == [4, 8]


def _truncate_largest_array_file(step_dir):
  files = [p for p in (step_dir / "state").rglob("*")
           if p.is_file() and p.parent.name == "d"]
  largest = max(files, key=lambda p: p.stat().st_size)
  os.truncate(largest, 100)


@pytest.mark.slow
def test_corrupt_checkpoint_is_named_and_fallback_resumes_before_it(
    finished_run, data_dir, tmp_path, monkeypatch):
  workdir = tmp_path / "run"
  shutil.copytree(finished_run[0], workdir)
  _truncate_largest_array_file(workdir / "checkpoints" / "8")
  config = micro_config(data_dir)

  out = train_cli(cli_flags(data_dir) + [f"--workdir={workdir}"])
  assert_one_line_error(out, cli.EXIT_ERROR, "checkpoints/8", "byte range",
                        "--fallback_checkpoint", "step 6")
  # In process, too: one exception, and none of the "Exception ignored" /
  # "Event loop is closed" reports of Orbax's abandoned read coroutines
  # (about 100 per failed restore before they were collected quietly).
  unraisable = []
  monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
  with pytest.raises(ckpt_lib.CheckpointError, match="checkpoints/8"):
    loop_lib.train_and_evaluate(config, workdir)
  gc.collect()
  monkeypatch.undo()
  assert unraisable == []
  assert (workdir / "checkpoints" / "8").is_dir()  # nothing moved

  summary = loop_lib.train_and_evaluate(config, workdir,
                                       fallback_checkpoint=True)
  assert summary["steps"] == 8
  (aside,) = (workdir / ckpt_lib.SET_ASIDE).iterdir()
  assert aside.name.startswith("checkpoints-8-")
  step, _ = final_state(workdir)  # step 8 again, written afresh
  assert step == 8


# ------------------------------------------------------- resume (kill) ---


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_gives_bitwise_equal_params(
    data_dir, tmp_path):
  env = run_env()
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  cmd = [sys.executable, str(ROOT / "train.py")] + cli_flags(data_dir)
  subprocess.run(cmd + [f"--workdir={straight}"], check=True, env=env,
                 cwd=ROOT, timeout=600, capture_output=True)

  proc = subprocess.Popen(cmd + [f"--workdir={killed}"], env=env, cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  mid_epoch = killed / "checkpoints" / "2"  # step 2 of a 4-step epoch
  deadline = time.time() + 300
  while not mid_epoch.exists() and proc.poll() is None:
    assert time.time() < deadline, "no mid-epoch checkpoint appeared"
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL, "the run ended before the kill"

  resumed = subprocess.run(cmd + [f"--workdir={killed}"], env=env, cwd=ROOT,
                           timeout=600, capture_output=True, text=True)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from step" in resumed.stdout + resumed.stderr
  for stage in ("imports", "distributed_init", "data", "params", "state",
                "restore", "first_batch", "compile", "first_step"):
    assert f"startup: {stage} " in resumed.stdout, stage

  step_a, a = final_state(straight)
  step_b, b = final_state(killed)
  assert step_a == step_b == 8
  flat_a = jax.tree_util.tree_leaves_with_path(a)
  flat_b = jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  for (path, x), (_, y) in zip(flat_a, flat_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                  err_msg=jax.tree_util.keystr(path))


def _default_sigint():
  """In a child before exec: SIGINT back to the default disposition."""
  signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
def test_lock_sigint_noresume_and_stale_lock_through_train_py(
    data_dir, tmp_path):
  workdir = tmp_path / "run"
  # Long enough (200 steps) that it is still training when interrupted.
  flags = cli_flags(data_dir) + [f"--workdir={workdir}",
                                 "--config.train.epochs=50"]
  first = subprocess.Popen(
      [sys.executable, str(ROOT / "train.py")] + flags, env=run_env(),
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      # SIGINT as in a foreground shell, whatever this suite inherited
      # (`make test &` starts it ignored, and train.py keeps an ignore).
      preexec_fn=_default_sigint)
  deadline = time.time() + 300
  while (not (workdir / "checkpoints" / "2").exists()
         and first.poll() is None):
    assert time.time() < deadline, "no mid-epoch checkpoint appeared"
    time.sleep(0.05)
  try:
    # A second run on the same workdir is refused at once.
    second = train_cli(flags)
    assert_one_line_error(second, cli.EXIT_ERROR, str(workdir),
                          f"PID {first.pid}")
  finally:
    first.send_signal(signal.SIGINT)  # Ctrl-C
    _, stderr = first.communicate(timeout=300)
  assert first.returncode == cli.EXIT_PREEMPTED, stderr[-3000:]
  assert "Traceback" not in stderr
  assert "Using custom data configuration" not in stderr
  saved = [l for l in stderr.splitlines() if "SIGINT: saved step" in l]
  assert len(saved) == 1, stderr[-3000:]
  step = int(saved[0].split("saved step ")[1].split()[0])
  assert final_state(workdir)[0] == step
  assert json.loads((workdir / "config.json").read_text())  # not clobbered

  # A lock left by a process that died (SIGKILL) is taken over with a note;
  # --noresume then refuses the run, which has checkpoints, untouched.
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  (workdir / ".lock").write_text(json.dumps(
      {"pid": dead.pid, "host": os.uname().nodename,
       "started": "2026-01-01T00:00:00"}))
  metrics_before = (workdir / "metrics.jsonl").read_text()
  out = train_cli(flags + ["--noresume"])
  assert f"took over the stale lock of PID {dead.pid}" in out.stderr
  assert_one_line_error(out, cli.EXIT_ERROR, str(workdir),
                        f"up to step {step}", "--overwrite")
  assert (workdir / "metrics.jsonl").read_text() == metrics_before
  assert final_state(workdir)[0] == step


# ------------------------------------------------------ run directory ---


@pytest.mark.slow
def test_finished_run_writes_logs_checkpoints_and_bounds(finished_run):
  workdir, summary = finished_run
  assert summary["steps"] == 8 and not summary["stopped_early"]
  for name in ("config.json", "metrics.jsonl", "bounds.json",
               "best_recall/bounds.json"):
    assert (workdir / name).is_file(), name
  assert any((workdir / "tensorboard").iterdir())
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  records = [json.loads(l) for l in lines]
  kinds = [r["kind"] for r in records]
  assert kinds.count("val") == 2 and kinds.count("train") == 4
  # One start-up record, the stages in order, before any train record.
  assert kinds.count("startup") == 1 and kinds.index("startup") == 0
  startup = records[0]
  stages = ("data", "params", "state", "first_batch", "compile",
            "first_step")
  assert [k for k in startup if k in stages] == list(stages)
  assert all(startup[k] >= 0 for k in stages)
  assert startup["total"] == pytest.approx(sum(startup[k] for k in stages))
  for r in records:
    if r["kind"] == "train":
      assert 0 <= r["input_wait_share"] <= 1 and r["input_wait_s"] >= 0
  bounds = summary["bounds"]
  assert set(bounds) == {"S", "U", "V", "G"}
  for group in bounds.values():
    assert group["low_05"] <= group["avg"] <= group["up_95"]


@pytest.mark.slow
def test_each_best_checkpoint_has_the_bounds_of_its_own_weights(
    finished_run, data_dir):
  """best_recall/ and best_loss/ each hold the bounds of their own weights
  on the validation split (recomputed here through the served model), the
  run's bounds.json those of best_recall, and a served checkpoint reads
  its own."""
  workdir, summary = finished_run
  config = micro_config(data_dir)
  default = safety.load_bounds(workdir / "bounds.json")
  assert default == safety.load_bounds(workdir / "best_recall" / "bounds.json")
  assert summary["bounds"] == default
  clip = sizes.get_clip_config(config.model.size)
  k, depth = max(numerics.tower_error_terms(clip, t)
                 for t in ("vision", "text"))
  for kind in ("best_recall", "best_loss"):
    path = workdir / kind / safety.BOUNDS_FILE
    model = serving.load_model(str(workdir), checkpoint=kind,
                               dtype="float32")
    assert model.bounds_source == str(path)
    emb = evaluate_run.embed_split_groups(model, config, "validation")
    want = safety.compute_bounds(emb["S"], emb["U"], emb["V"], emb["G"],
                                 model.curv)
    saved = safety.load_bounds(path)
    for group, stats in want.items():
      for key, value in stats.items():
        # The exp map and the distance add two roundings to the towers'.
        atol = numerics.float32_atol(value, k, depth + 2)
        assert abs(saved[group][key] - value) <= atol, (kind, group, key)


@pytest.mark.slow
def test_eval_writes_every_report_file(finished_run, data_dir, caplog,
                                       monkeypatch):
  workdir, _ = finished_run
  rows = []
  encoder = evaluate_run.quadruple_encoder

  def recording(model):  # the batches the unsharded serving model gets
    encode = encoder(model)
    return lambda batch: (rows.append(len(batch["safe_ids"])),
                          encode(batch))[1]

  monkeypatch.setattr(evaluate_run, "quadruple_encoder", recording)
  with caplog.at_level("WARNING"):
    report, out_dir = evaluate_run.run(workdir=str(workdir), split="test")
  # One device's batch, not one per simulated device all on the first one.
  per_device = OVERRIDES["data.eval_batch_size_per_device"]
  assert jax.local_device_count() == 4 and max(rows) == per_device, rows
  # The data layer mutes TFDS's per-open note for every tool, not just train.
  assert "Using custom data configuration" not in caplog.text
  assert report["n"] == 64 and report["split"] == "test"
  assert report["bounds_source"].endswith("bounds.json")
  files = sorted(os.listdir(out_dir))
  for name in ("report.json", "report.md"):
    assert name in files
  pngs = [f for f in files if f.endswith(".png")]
  assert len(pngs) >= 3
  for f in pngs:
    assert os.path.getsize(os.path.join(out_dir, f)) > 1000


def test_model_paths_are_saved_absolute_and_hub_ids_as_given(tmp_path,
                                                             monkeypatch):
  """A run's config.json must find its weights from any directory."""
  (tmp_path / "converted").mkdir()
  monkeypatch.chdir(tmp_path)
  config = config_lib.base_config()
  got = loop_lib._with_absolute_model_paths(config, "converted")  # pylint: disable=protected-access
  assert got.model.init_from == str(tmp_path / "converted")
  assert got.model.clip == "openai/clip-vit-large-patch14"  # a hub id
  config.model.clip = "converted"
  got = loop_lib._with_absolute_model_paths(config, None)  # pylint: disable=protected-access
  assert got.model.clip == str(tmp_path / "converted")
  assert got.model.init_from == ""
  assert config.model.clip == "converted"  # the caller's config unchanged


def test_a_warmup_cosine_run_restores_for_evaluation(data_dir, tmp_path):
  """The schedule needs the run's length, which a restore does not know:
  a cosine run still restores, with its trained leaves."""
  config = micro_config(data_dir, **{"optim.schedule": "warmup_cosine",
                                     "optim.warmup_steps": 2})
  loop_lib.train_and_evaluate(config, tmp_path)
  step, saved = final_state(tmp_path)
  _, state = restore_lib.restore_run(tmp_path, ckpt_lib.LAST)
  assert int(state.step) == step
  want = traverse_util.flatten_dict(saved["trainable"])
  lora = [k for k in want if k[-1] == "lora_B"]
  assert lora
  got = traverse_util.flatten_dict(jax.device_get(state.params))
  for k in lora:
    np.testing.assert_array_equal(got[k], want[k])
    assert np.abs(want[k]).max() > 0


def test_restoring_a_run_without_checkpoints_names_the_kind_asked(tmp_path):
  config_lib.save_config(micro_config(tmp_path), tmp_path)
  with pytest.raises(FileNotFoundError,
                     match=f"no checkpoint in {tmp_path} .looked in "
                           f"{ckpt_lib.BEST_LOSS}/ and {ckpt_lib.LAST}/"):
    restore_lib.restore_run(tmp_path, ckpt_lib.BEST_LOSS)
