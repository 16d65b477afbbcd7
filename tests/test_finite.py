"""Fail closed (hysac_jax/finite.py and its readers): no NaN verdict says
"safe", no NaN in what we write, no leftover partial directory."""

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from hysac_jax import cli
from hysac_jax import config as config_lib
from hysac_jax import convert
from hysac_jax import export
from hysac_jax import finite
from hysac_jax import outdir
from hysac_jax import run_lock
from hysac_jax import safety
from hysac_jax.formats import hf_clip
from hysac_jax.models import sizes

import tiny_runs

ROOT = tiny_runs.ROOT
BOUNDS = {g: {"avg": 0.5, "low_05": 0.4, "up_95": 0.6} for g in safety.GROUPS}


def _last_error(out, prog, code):
  lines = [l for l in out.stderr.splitlines() if l.strip()]
  assert out.returncode == code, out.stderr[-2000:]
  assert lines and lines[-1].startswith(f"{prog}: error: "), out.stderr
  assert "Traceback" not in out.stderr
  return lines[-1]


def _cli(*argv):
  return subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT,
                        env=tiny_runs.run_env(), capture_output=True,
                        text=True, timeout=300)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, "x", None])
def test_check_number_refuses_non_finite_values_naming_source_and_field(
    value):
  with pytest.raises(finite.NonFiniteError, match=r"^head\.json: curv="):
    finite.check_number(value, "head.json", "curv")


def test_check_number_ranges():
  assert finite.check_number(np.float32(2.0), "s", "f", positive=True) == 2.0
  with pytest.raises(finite.NonFiniteError, match="positive"):
    finite.check_number(0.0, "--curv-init", "curv_init", positive=True)
  with pytest.raises(finite.NonFiniteError, match="at most 1"):
    finite.check_number(2.0, "s", "f", high=1)


def test_strict_json_writes_null_for_undefined_values_never_nan():
  text = finite.dumps({"auroc": math.nan, "t": [np.float32(-np.inf), 1.5],
                       "n": np.int64(3)})
  assert json.loads(text) == {"auroc": None, "t": [None, 1.5], "n": 3}
  assert "NaN" not in text and "Infinity" not in text


@pytest.mark.parametrize("field,value", [("optim.lr", math.inf),
                                         ("model.curv_init", math.inf),
                                         ("model.curv_init", math.nan),
                                         ("eval.traversal_alpha", math.nan),
                                         ("loss.entail_weight", math.nan),
                                         ("optim.b1", math.nan),
                                         ("optim.b1", 1.0),
                                         ("optim.b1", -0.1),
                                         ("optim.b2", math.inf),
                                         ("optim.b2", 1.0),
                                         ("optim.eps", 0.0),
                                         ("optim.eps", math.nan),
                                         ("optim.eps", math.inf),
                                         ("optim.weight_decay", -0.1),
                                         ("optim.weight_decay", math.nan),
                                         ("optim.weight_decay", math.inf),
                                         ("optim.warmup_steps", -1),
                                         ("optim.warmup_steps", True),
                                         ("optim.warmup_steps", math.inf),
                                         ("optim.warmup_steps", math.nan),
                                         ("optim.warmup_steps", 2.5)])
def test_check_config_refuses_infinite_and_nan_values(field, value):
  config = config_lib.base_config()
  config.data.name = "synthetic_visu"
  config.model.size = "tiny"
  config_lib.check_config(config)  # the base passes: only `field` is bad
  group, name = field.split(".")
  with config.ignore_type():  # a config file may hold any type
    config[group][name] = value
  with pytest.raises(ValueError, match=rf"config\.{field}="):
    config_lib.check_config(config)


def test_classification_fails_closed_on_nan_alpha_and_nan_distance():
  emb = np.array([[0.1, 0.0], [np.nan, 0.0]], np.float32)
  with pytest.raises(finite.NonFiniteError, match="traversal_alpha"):
    safety.classify_unsafe(emb, 1.0, BOUNDS, "text", alpha=math.nan)
  with pytest.raises(finite.NonFiniteError, match="curv"):
    safety.modality_threshold(math.nan, BOUNDS, "text")
  unsafe = np.asarray(safety.classify_unsafe(emb, 1.0, BOUNDS, "text"))
  assert unsafe.tolist() == [False, True]  # NaN distance: unsafe, not safe


def test_save_pretrained_refuses_non_finite_weights_naming_the_tensor(
    tmp_path):
  config = sizes.get_clip_config("tiny")
  flat = {"/".join(p): np.zeros(s.shape, np.float32)
          for p, s in convert.clip_template(config).items()}
  flat["text_projection/kernel"][0, 0] = np.nan
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  params = {"clip": traverse_util.unflatten_dict(flat, sep="/"),
            **convert.initial_head(config)}
  with pytest.raises(finite.NonFiniteError,
                     match=r"ckpt\.pt: tensor clip/text_projection/kernel "
                           r"holds 1 non-finite"):
    convert.save_pretrained(tmp_path / "out", config, params,
                            source={"open_clip_checkpoint": "ckpt.pt"})
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["nan", "-1", "0", "inf"])
def test_convert_curv_init_nan_negative_zero_is_a_usage_error_naming_flag(
    value, tmp_path):
  out = _cli("-m", "hysac_jax.convert", "--clip", tmp_path, "--out",
             tmp_path / "o", f"--curv-init={value}")
  line = _last_error(out, "python -m hysac_jax.convert", cli.EXIT_USAGE)
  assert "--curv-init" in line and "math domain" not in line


@pytest.mark.parametrize("prog,extra", [
    ("predict", ["--text", "a dog"]),
    ("export", ["--out", "x", "--format", "hf"])])
def test_traversal_alpha_nan_is_a_usage_error(prog, extra, tmp_path):
  out = _cli("-m", f"hysac_jax.{prog}", "--model", tmp_path,
             "--traversal-alpha", "nan", *extra)
  line = _last_error(out, f"python -m hysac_jax.{prog}", cli.EXIT_USAGE)
  assert "--traversal-alpha=nan: expected a finite number" in line


def test_eval_traversal_alpha_and_margin_nan_are_usage_errors(tmp_path):
  for flag in ("--traversal_alpha=nan", "--margin=nan"):
    out = _cli("eval.py", "--workdir", tmp_path, flag)
    line = _last_error(out, "eval.py", cli.EXIT_USAGE)
    assert f"{flag.split('=')[0]}=nan: expected a finite number" in line


def test_write_in_place_removes_partial_dirs_a_killed_write_left(
    tmp_path, capsys):
  stale = tmp_path / ".hf.partial-abc123"
  stale.mkdir()
  (stale / "model.safetensors").write_text("half")
  outdir.write_in_place(tmp_path / "hf", lambda d: None)
  assert sorted(os.listdir(tmp_path)) == ["hf"]
  assert f"removed 1 directory(ies) left by an interrupted earlier write: " \
         f"{stale}" in capsys.readouterr().err


def test_run_lock_holder_reports_a_held_run_read_only(tmp_path):
  assert run_lock.holder(tmp_path) is None
  with run_lock.RunLock(tmp_path):
    held = run_lock.holder(tmp_path)
    assert held["pid"] == os.getpid()
  assert run_lock.holder(tmp_path) is None


def test_a_run_saves_absolute_data_paths(tmp_path, monkeypatch):
  from hysac_jax.training import loop  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(tmp_path)
  config = config_lib.base_config()
  config.data.data_dir = "tfds"
  config.data.manual_dir = "~/visu"
  saved = loop._with_absolute_model_paths(config, None)  # pylint: disable=protected-access
  assert saved.data.data_dir == str(tmp_path / "tfds")
  assert saved.data.manual_dir == os.path.expanduser("~/visu")
  assert os.path.isabs(saved.data.manual_dir)


def test_release_bounds_and_alpha_travel_through_convert(tmp_path):
  release = tmp_path / "release"
  release.mkdir()
  safety.save_bounds(BOUNDS, release / "hysac_bounds.json")
  (release / "hysac_jax.json").write_text('{"traversal_alpha": 3.0}')
  out = tmp_path / "converted"
  assert convert._release_extras(str(release), str(out)) == 3.0  # pylint: disable=protected-access
  assert safety.load_bounds(out / "bounds.json") == BOUNDS
  (release / "hysac_jax.json").write_text('{"traversal_alpha": NaN}')
  with pytest.raises(finite.NonFiniteError, match="hysac_jax.json: "
                                                  "traversal_alpha=nan"):
    convert._release_extras(str(release), str(out))  # pylint: disable=protected-access


def test_a_converted_directory_keeps_its_traversal_alpha(tmp_path):
  config = sizes.get_clip_config("tiny")
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  flat = {"/".join(p): np.zeros(s.shape, np.float32)
          for p, s in convert.clip_template(config).items()}
  params = {"clip": traverse_util.unflatten_dict(flat, sep="/"),
            **convert.initial_head(config)}
  convert.save_pretrained(tmp_path, config, params, traversal_alpha=3.0)
  assert convert.read_converted(tmp_path).traversal_alpha == 3.0


@pytest.fixture
def full_disk(tmp_path):
  """A 1 MiB tmpfs (root only), or skip."""
  mount = tmp_path / "small"
  mount.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs",
                     str(mount)], capture_output=True).returncode:
    pytest.skip("cannot mount a tmpfs here")
  yield mount
  subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_is_one_line_and_leaves_no_tmp_checkpoint(
    full_disk, capfd):
  from hysac_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  ckpts = ckpt_lib.RunCheckpoints(full_disk, keep_last=1)
  state = {"w": np.random.default_rng(0).random((1024, 1024), np.float32)}
  with pytest.raises(ckpt_lib.CheckpointWriteError,
                     match=r"cannot write checkpoint .*/best_recall/4: "):
    ckpts.save(4, state, {}, {}, kind=ckpt_lib.BEST_RECALL)
  ckpts.close()
  assert "Traceback" not in capfd.readouterr().err
  assert not [e for e in os.listdir(full_disk / "best_recall")
              if "tmp" in e]


def test_opening_a_run_for_writing_removes_tmp_checkpoints(tmp_path, capfd):
  from hysac_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  stale = tmp_path / "best_recall" / "8.orbax-checkpoint-tmp-1234"
  stale.mkdir(parents=True)
  ckpt_lib.RunCheckpoints(tmp_path, read_only=True).close()
  assert stale.exists()  # eval.py and the exports leave a run as it was
  ckpt_lib.RunCheckpoints(tmp_path).close()
  assert not stale.exists()
  assert f"removed 1 unfinished checkpoint(s) left by an earlier save: " \
         f"{stale}" in capfd.readouterr().err


def test_report_json_is_strict_and_notes_its_nulls(tmp_path):
  from hysac_jax.evaluation import report as report_lib  # pylint: disable=g-import-not-at-top
  paths = report_lib.write_files({"a": {"auroc": math.nan}, "b": 1.0},
                                 tmp_path, "")
  text = open(paths["json"]).read()
  assert "NaN" not in text
  saved = json.loads(text)
  assert saved["a"]["auroc"] is None
  assert saved["null_note"].endswith("as null: a.auroc")


def _stub_model(alpha=1.0):
  from hysac_jax import serving  # pylint: disable=g-import-not-at-top
  head = {"mode": "hyp", "curv": 1.0, "curv_init": 1.0,
          "traversal_alpha": alpha}
  return serving.Model("converted", head, BOUNDS, 32, 8, None, None)


def test_predict_answers_a_non_finite_distance_with_an_error_not_safe():
  from hysac_jax import predict  # pylint: disable=g-import-not-at-top
  emb = np.array([[0.1, 0.0], [np.nan, 0.0]], np.float32)
  good, bad = predict.answer(_stub_model(), emb, "text")
  assert good["unsafe"] is False and math.isfinite(good["threshold"])
  assert bad == {"error": predict.NON_FINITE_ERROR}
  assert "unsafe" not in finite.dumps(bad)


def test_a_model_with_a_nan_alpha_or_curvature_does_not_load():
  with pytest.raises(finite.NonFiniteError, match="traversal_alpha=nan"):
    _stub_model(alpha=math.nan)


def test_a_restored_checkpoint_names_its_kind_step_and_a_training_run(
    tmp_path):
  from hysac_jax import serving  # pylint: disable=g-import-not-at-top
  for step_dir in ("best_recall/4", "best_recall/8", "checkpoints/12"):
    (tmp_path / step_dir).mkdir(parents=True)
  restored = serving._restored_checkpoint  # pylint: disable=protected-access
  assert restored(str(tmp_path), "best_recall") == {
      "checkpoint_kind": "best_recall", "step": 8, "training": False}
  with run_lock.RunLock(tmp_path):
    # No best_loss step: the restore fell back to the latest checkpoint.
    now = restored(str(tmp_path), "best_loss")
  assert now["step"] == 12
  assert now["checkpoint_kind"] == "checkpoints" and now["training"]
  assert f"PID {os.getpid()}" in now["trainer"]


_TRAIN_WITH_A_NEVER_REACHED_BEST = """
import math, sys
from hysac_jax.training import loop
loop.train_and_evaluate = lambda *a, **k: {
    "stopped_early": False, "preempted": False, "steps": 0, "epochs": 0.0,
    "best": {"loss": math.inf, "recall_sum": -math.inf}, "bounds": None}
sys.argv[0] = "train.py"
import train
from absl import app
app.run(train.main)
"""


def test_train_prints_its_summary_as_strict_json(tmp_path):
  """A best loss never reached (inf) prints as null, not Infinity."""
  out = _cli("-c", _TRAIN_WITH_A_NEVER_REACHED_BEST,
             f"--config={ROOT / 'configs' / 'tiny.py'}",
             f"--workdir={tmp_path / 'run'}")
  assert out.returncode == 0, out.stderr[-2000:]
  start = out.stdout.index("{")
  summary = json.loads(out.stdout[start:], parse_constant=lambda c: 1 / 0)
  assert summary["best"] == {"loss": None, "recall_sum": None}
  assert summary["steps"] == 0


@pytest.mark.parametrize("eps,logit_scale,field", [
    (1e-5, math.inf, "logit_scale_init_value"),
    (math.nan, 10.0, "vision_config.layer_norm_eps")])
def test_an_hf_export_config_is_never_written_with_a_non_finite_value(
    tmp_path, eps, logit_scale, field):
  config = sizes.get_clip_config("tiny")
  config = dataclasses.replace(
      config, vision=dataclasses.replace(config.vision, layer_norm_eps=eps))
  with pytest.raises(finite.NonFiniteError) as e:
    hf_clip.write_hf_clip(tmp_path / "hf", config, {}, logit_scale)
  assert str(e.value) == (f"cannot write {tmp_path / 'hf' / 'config.json'}: "
                          f"{field} not finite")
  assert not (tmp_path / "hf").exists()


@pytest.fixture(scope="module")
def converted_and_hf_export(tmp_path_factory):
  """A converted tiny model (curv 0.7) and its HF export."""
  root = tmp_path_factory.mktemp("nan_files")
  src = tiny_runs.save_converted(root / "converted", seed=0,
                                 lora_b_scale=0.1, curv=0.7, alpha=0.3)
  assert export.main(["--model", str(src), "--out", str(root / "out"),
                      "--format", "hf"]) == 0
  return src, root / "out" / "hf"


def _with_nan(directory, file_name, field, tmp_path):
  """A copy of `directory` whose `file_name` holds `field`: NaN (the text
  literal Python's json writes and reads by default)."""
  copy = tmp_path / directory.name
  shutil.copytree(directory, copy)
  path = copy / file_name
  data = json.loads(path.read_text())
  assert field in data
  data[field] = math.nan
  path.write_text(json.dumps(data, indent=2))
  assert f'"{field}": NaN' in path.read_text()
  return copy, path


@pytest.mark.parametrize("field", ["traversal_alpha", "curv", "curv_init"])
def test_a_nan_in_a_real_hysac_head_json_is_refused_naming_the_file_and_field(
    converted_and_hf_export, tmp_path, field):
  """NaN alpha or curvature in an export's head: no model, so no verdict."""
  from hysac_jax import serving  # pylint: disable=g-import-not-at-top
  _, hf = converted_and_hf_export
  model = serving.load_model(hf)  # the export itself loads
  assert model.curv == pytest.approx(0.7, rel=1e-5)
  broken, head = _with_nan(hf, "hysac_head.json", field, tmp_path)
  with pytest.raises(finite.NonFiniteError) as e:
    serving.load_model(broken)
  message = str(e.value)
  assert "\n" not in message
  assert message.startswith(f"{head}: {field}=nan: expected a finite number")


def test_a_converted_directory_with_a_nan_curv_init_is_refused_naming_it(
    converted_and_hf_export, tmp_path):
  from hysac_jax import serving  # pylint: disable=g-import-not-at-top
  src, _ = converted_and_hf_export
  broken, config_file = _with_nan(src, convert.CONFIG_FILE, "curv_init",
                                  tmp_path)
  with pytest.raises(finite.NonFiniteError) as e:
    serving.load_model(broken)
  message = str(e.value)
  assert "\n" not in message
  assert message.startswith(
      f"{config_file}: curv_init=nan: expected a finite number")


@pytest.mark.parametrize("task", ["report", "unsafe_prompts"])
def test_eval_refuses_an_unwritable_default_out_dir_before_any_work(
    tmp_path, task):
  """RUN/eval is a file (root can write anywhere, so no chmod): one line
  naming the directory and suggesting --out, before the checkpoint is even
  looked for (this run has none: a later check would say so instead)."""
  run = tmp_path / "run"
  run.mkdir()
  config_lib.save_config(tiny_runs.tiny_config(tmp_path / "data", {}), run)
  (run / "eval").write_text("not a directory")
  out = _cli("eval.py", "--workdir", run, f"--task={task}",
             "--dataset=synthetic_visu:shape")
  line = _last_error(out, "eval.py", cli.EXIT_ERROR)
  problem = {"report": f"{run / 'eval' / 'test'} cannot be created: "
                       f"{run / 'eval'} is a file",
             "unsafe_prompts": f"{run / 'eval'} is a file, not a directory"}
  assert line == (f"eval.py: error: the default output directory "
                  f"{problem[task]}; pass --out DIR to write the report "
                  "elsewhere"), line
  assert "checkpoint" not in out.stderr


def test_export_orbax_on_a_full_disk_is_one_line_and_leaves_nothing(
    converted_and_hf_export, tmp_path, monkeypatch, capfd):
  """Orbax's save raises ENOSPC after a half-written tmp directory and
  a logged thread traceback (as its async writer does): exit 1, one line,
  and neither the .orbax.partial-* nor the tmp checkpoint survive."""
  import errno
  import orbax.checkpoint as ocp
  from absl import logging as absl_logging
  src, _ = converted_and_hf_export
  calls = []

  def full_disk(self, directory, *args, **kwargs):
    calls.append(directory)
    tmp = os.path.join(os.path.dirname(directory),
                       "params.orbax-checkpoint-tmp-1234")
    os.makedirs(tmp)
    with open(os.path.join(tmp, "half"), "w") as f:
      f.write("half")
    try:
      raise OSError(errno.ENOSPC, "No space left on device")
    except OSError:
      absl_logging.error("writer thread failed", exc_info=True)
      raise

  monkeypatch.setattr(ocp.StandardCheckpointer, "save", full_disk)
  out = tmp_path / "out"
  capfd.readouterr()
  assert export.main(["--model", str(src), "--out", str(out), "--format",
                      "orbax"]) == cli.EXIT_ERROR == 1
  assert calls  # the patched save was the one export used
  captured = capfd.readouterr()
  text = captured.out + captured.err
  assert "Traceback" not in text and "ERROR:absl" not in text, text
  lines = [l for l in captured.err.splitlines() if l.strip()]
  assert len(lines) == 1, lines
  assert lines[0].startswith("python -m hysac_jax.export: error: cannot "
                             "write orbax export "), lines
  assert "No space left on device" in lines[0]
  left = [os.path.join(d, n) for d, dirs, files in os.walk(tmp_path)
          for n in dirs + files if ".partial-" in n or "tmp" in n]
  assert left == []
