"""Export for serving (hysac_jax/export.py): hf, orbax, stablehlo, loaders."""

import json
import math
import os

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util

from configs import tiny
from hysac_jax import convert
from hysac_jax import export
from hysac_jax import pretrained
from hysac_jax import safety
from hysac_jax import serving
from hysac_jax.models.clip import CLIPModel
from hysac_jax.models.lora import merge_lora
from hysac_jax.training import step as step_lib
from numerics import assert_float32_parity, tower_error_terms
import tiny_runs

TOWER = {"text": "text", "image": "vision"}


def assert_close(got, want, modality):
  """Two float32 computations of one tower's outputs (an export against the
  live model, merged against unmerged LoRA): the error-model bound of
  tests/numerics.py for the tiny config's towers."""
  cfg = pretrained.model_from_config(tiny_config()).clip
  assert_float32_parity(got, want, *tower_error_terms(cfg, TOWER[modality]))
# Head scalars (stored logs) away from their initial values.
HEAD = {"log_curv": math.log(0.7), "log_alpha_image": math.log(0.2),
        "log_alpha_text": math.log(0.15), "log_logit_scale": math.log(20.0)}


def tiny_config():
  c = tiny.get_config()
  c.model.lora.rank = 4
  return c


def trained(params):
  """`params` with non-zero LoRA B matrices and non-initial head scalars."""
  return tiny_runs.with_trained_lora(params, 0.1, HEAD)


def inputs(n=7):
  return tiny_runs.random_inputs(n)


def bounds_with_threshold(curv, target):
  """Bounds whose thresholds b' (both modalities) equal `target`.

  b' = b + tanh((b - 0.8)/c) + 1 is increasing in b: solved by bisection.
  """
  lo, hi = -50.0, 50.0
  for _ in range(200):
    mid = (lo + hi) / 2
    if safety.safety_threshold(mid, curv) < target:
      lo = mid
    else:
      hi = mid
  stats = {"avg": lo - 0.5, "low_05": lo - 1.0, "up_95": lo}
  return {g: dict(stats) for g in safety.GROUPS}


def live_points(model, params, ids, pixels):
  """(image points, text points) of the live (LoRA, unmerged) model."""
  image, text = model.apply({"params": params}, pixels, ids)
  return np.asarray(image), np.asarray(text)


@pytest.fixture(scope="module")
def live():
  """The tiny HySAC module and its 'trained' params (LoRA not merged)."""
  config = tiny_config()
  model = pretrained.model_from_config(config)
  params = trained(step_lib.init_model_params(model, jax.random.key(0)))
  return model, jax.device_get(params)


@pytest.fixture(scope="module")
def exported(live, tmp_path_factory):
  """A converted directory with bounds, exported in all three formats by
  the CLI in one call. Returns (converted dir, {format: dir}, bounds)."""
  model, params = live
  src = tmp_path_factory.mktemp("converted")
  convert.save_pretrained(src, model.clip, params, lora=model.lora,
                          curv_init=model.curv_init)
  ids, pixels = inputs()
  image, text = live_points(model, params, ids, pixels)
  dist = np.asarray(safety.origin_distance(np.concatenate([image, text]), 0.7))
  bounds = bounds_with_threshold(0.7, float(np.median(dist)))
  safety.save_bounds(bounds, src / "bounds.json")
  out = tmp_path_factory.mktemp("export")
  assert export.main(["--model", str(src), "--out", str(out), "--format",
                      "hf", "orbax", "stablehlo"]) == 0
  return src, {f: out / f for f in export.FORMATS}, bounds


# ------------------------------------------------------------------- hf ---


@pytest.mark.slow
def test_hf_export_gives_torch_clip_the_features_of_our_towers(live,
                                                               exported):
  model, params = live
  _, dirs, _ = exported
  hf, info = transformers.CLIPModel.from_pretrained(
      dirs["hf"], output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys",
                                   "mismatched_keys")), info
  ids, pixels = inputs()
  towers = CLIPModel(model.clip, model.lora)
  ours_t = towers.apply({"params": params["clip"]}, ids, method="encode_text")
  ours_i = towers.apply({"params": params["clip"]}, pixels,
                        method="encode_image")
  with torch.no_grad():
    hf.eval()
    t = hf.get_text_features(input_ids=torch.as_tensor(ids)).pooler_output
    i = hf.get_image_features(pixel_values=torch.as_tensor(
        pixels.transpose(0, 3, 1, 2))).pooler_output
  assert_close(t.numpy(), ours_t, "text")
  assert_close(i.numpy(), ours_i, "image")
  assert math.isclose(hf.logit_scale.exp().item(), 20.0, rel_tol=1e-6)


@pytest.mark.slow
def test_hf_head_applied_to_torch_features_gives_our_points(live, exported):
  model, params = live
  _, dirs, bounds = exported
  head = json.loads((dirs["hf"] / export.HEAD_FILE).read_text())
  assert head["mode"] == "hyp" and head["bounds"] == bounds
  for key, value in {"curv": 0.7, "alpha_image": 0.2, "alpha_text": 0.15,
                     "logit_scale": 20.0}.items():
    assert math.isclose(head[key], value, rel_tol=1e-6), key
  assert math.isclose(head["thresholds"]["text"], safety.safety_threshold(
      bounds["S"]["up_95"], head["curv"]), rel_tol=1e-9)
  hf = transformers.CLIPModel.from_pretrained(dirs["hf"]).eval()
  ids, pixels = inputs()
  with torch.no_grad():
    t = hf.get_text_features(input_ids=torch.as_tensor(ids)).pooler_output
    i = hf.get_image_features(pixel_values=torch.as_tensor(
        pixels.transpose(0, 3, 1, 2))).pooler_output
  # The head in float64 NumPy (SPEC §1 exp_map0), from the JSON alone.
  def exp_map0(v, c):
    v = np.asarray(v, np.float64)
    r = math.sqrt(c) * np.linalg.norm(v, axis=-1, keepdims=True)
    return np.sinh(r) * v / r
  image, text = live_points(model, params, ids, pixels)
  assert_close(exp_map0(head["alpha_text"] * t.double().numpy(),
                        head["curv"]), text, "text")
  assert_close(exp_map0(head["alpha_image"] * i.double().numpy(),
                        head["curv"]), image, "image")
  assert_close(export.apply_head(i.numpy(), head, "image"), image, "image")


@pytest.mark.slow
def test_hf_export_round_trips_through_convert(live, exported):
  model, params = live
  _, dirs, bounds = exported
  _, back = convert.clip_params_from_hf(dirs["hf"])
  merged = traverse_util.flatten_dict(jax.device_get(
      merge_lora(params, model.lora)["clip"]))
  back = traverse_util.flatten_dict(back)
  assert back.keys() == merged.keys()
  for path in merged:  # transposes only: bit for bit
    np.testing.assert_array_equal(back[path], merged[path],
                                  err_msg="/".join(path))
  loaded = serving.load_model(dirs["hf"])
  ids, pixels = inputs()
  image, text = live_points(model, params, ids, pixels)
  assert_close(loaded.encode_text(ids), text, "text")
  assert_close(loaded.encode_image(pixels), image, "image")
  assert loaded.bounds == bounds and math.isclose(loaded.curv, 0.7,
                                                  rel_tol=1e-6)


@pytest.mark.slow
def test_converting_an_hf_export_keeps_its_head_and_bounds(live, exported,
                                                           tmp_path, capsys):
  """`convert --clip` on an hf export keeps the trained head (curvature,
  scales) and bounds rather than the initial ones; a non-empty --out is
  refused unless --overwrite."""
  model, params = live
  _, dirs, bounds = exported
  out = tmp_path / "converted"
  out.mkdir()
  (out / "old.txt").write_text("x")
  args = ["--clip", str(dirs["hf"]), "--out", str(out)]
  assert convert.main(args) == 1
  assert "is not empty: pass --overwrite" in capsys.readouterr().err
  assert convert.main(args + ["--overwrite"]) == 0
  assert not (out / "old.txt").exists()
  back = serving.load_model(out)
  assert back.kind == "converted" and back.bounds == bounds
  assert math.isclose(back.curv, 0.7, rel_tol=1e-6)
  ids, pixels = inputs()
  image, text = live_points(model, params, ids, pixels)
  assert_close(back.encode_text(ids), text, "text")
  assert_close(back.encode_image(pixels), image, "image")


def test_apply_head_in_euc_mode_normalises():
  feats = np.array([[3.0, 4.0], [0.0, -2.0]], np.float32)
  out = export.apply_head(feats, {"mode": "euc"}, "text")
  np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, -1.0]], rtol=1e-6)
  with pytest.raises(ValueError, match="modality"):
    export.apply_head(feats, {"mode": "euc"}, "audio")


# ---------------------------------------------------------------- orbax ---


@pytest.mark.slow
def test_orbax_export_holds_merged_params_and_gives_the_same_points(
    live, exported):
  model, params = live
  _, dirs, bounds = exported
  loaded = serving.load_model(dirs["orbax"])
  ids, pixels = inputs()
  image, text = live_points(model, params, ids, pixels)
  assert_close(loaded.encode_image(pixels), image, "image")
  assert_close(loaded.encode_text(ids), text, "text")
  assert loaded.bounds == bounds
  # Only the merged params: the leaves of a model without LoRA, no more.
  import orbax.checkpoint as ocp
  stored = traverse_util.flatten_dict(ocp.StandardCheckpointer().restore(
      os.path.join(dirs["orbax"], export.ORBAX_PARAMS_DIR)))
  expected = {("clip",) + k for k in convert.clip_template(model.clip)}
  assert set(stored) == expected | {(k,) for k in HEAD}


# ------------------------------------------------------------ stablehlo ---


@pytest.mark.slow
def test_stablehlo_functions_match_the_live_model_at_batch_1_and_7(
    live, exported):
  model, params = live
  _, dirs, bounds = exported
  loaded = serving.load_model(dirs["stablehlo"])
  fns = loaded.functions
  assert str(fns["encode_image"].in_avals[-1].shape[0]) == "b"
  assert str(fns["encode_text"].in_avals[-1].shape[0]) == "b"
  assert set(fns["encode_text"].platforms) == {"cpu", "cuda", "tpu"}
  ids, pixels = inputs()
  image, text = live_points(model, params, ids, pixels)
  for n in (1, 7):
    assert_close(loaded.encode_image(pixels[:n]), image[:n], "image")
    assert_close(loaded.encode_text(ids[:n]), text[:n], "text")
    for emb, modality in ((image[:n], "image"), (text[:n], "text")):
      unsafe, dist = loaded.classify_unsafe(emb, modality)
      np.testing.assert_allclose(dist, safety.origin_distance(emb, 0.7),
                                 rtol=1e-6)
      np.testing.assert_array_equal(
          unsafe, safety.classify_unsafe(emb, 0.7, bounds, modality))
      np.testing.assert_allclose(
          loaded.traverse_to_safe(emb, modality),
          safety.traverse_to_safe(emb, 0.7,
                                  bounds[safety.SAFE_GROUP[modality]]["up_95"]),
          atol=1e-6, rtol=1e-6)
  # The threshold sits at the median distance: both outcomes occur.
  unsafe, _ = loaded.classify_unsafe(np.concatenate([image, text]), "text")
  assert 0 < unsafe.sum() < len(unsafe)


@pytest.mark.slow
def test_load_model_reads_every_format(exported):
  _, dirs, _ = exported
  kinds = {f: serving.load_model(dirs[f]).kind for f in export.FORMATS}
  assert kinds == {f: f for f in export.FORMATS}


# ----------------------------------------------------------- run dirs ---


@pytest.mark.slow
def test_export_of_a_training_run_uses_its_checkpoint_and_bounds(tmp_path):
  """A run directory as the trainer leaves it: config.json, a best_recall
  checkpoint of the trainable params only, and bounds.json."""
  run = tmp_path / "run"
  bounds = bounds_with_threshold(0.7, 1.0)
  state = tiny_runs.save_run(run, tiny_config(), trained, step=3,
                             bounds=bounds)
  assert serving.detect_kind(run) == "run"

  out = tmp_path / "out"
  assert export.main(["--model", str(run), "--out", str(out), "--format",
                      "orbax"]) == 0
  loaded = serving.load_model(out / "orbax")
  ids, pixels = inputs(3)
  image, text = live_points(state.model, state.params, ids, pixels)
  assert_close(loaded.encode_image(pixels), image, "image")
  assert_close(loaded.encode_text(ids), text, "text")
  assert loaded.bounds == bounds
  source = loaded.head["source"]
  assert {k: source[k] for k in ("run", "checkpoint")} == {
      "run": str(run), "checkpoint": "best_recall"}
  # What was exported: the kind and step restored, the run not training.
  assert source["checkpoint_kind"] in ("best_recall", "checkpoints")
  assert isinstance(source["step"], int) and source["training"] is False


@pytest.mark.parametrize("make,message", [
    (lambda d: d / "missing", "is missing"),
    (lambda d: (d / "f.txt").write_text("x") and d / "f.txt", "is a file"),
    (lambda d: d, "neither hysac_head.json nor config.json"),
    (lambda d: (d / "config.json").write_text('{"model_type": "clip"}')
     and d, "plain Hugging Face CLIP"),
    (lambda d: (d / "config.json").write_text('{"model": {}, "train": {}}')
     and d, "no checkpoints"),
    (lambda d: (d / "hf").mkdir() or (d / "hf" / "hysac_head.json").write_text(
        "{}") and d, "holds exports, not a model: pass one of them"),
])
def test_model_dir_of_the_wrong_kind_is_refused_by_name(tmp_path, capsys,
                                                        make, message):
  path = make(tmp_path)
  assert export.main(["--model", str(path), "--out", str(tmp_path / "o"),
                      "--format", "hf"]) == 1
  err = capsys.readouterr().err
  assert message in err and str(path) in err


@pytest.mark.slow
def test_exporting_an_export_is_refused(exported, capsys, tmp_path):
  _, dirs, _ = exported
  assert export.main(["--model", str(dirs["orbax"]), "--out", str(tmp_path),
                      "--format", "hf"]) == 1
  assert "already an export (orbax)" in capsys.readouterr().err


@pytest.mark.slow
def test_an_earlier_export_is_kept_unless_overwrite(exported, capsys,
                                                     tmp_path):
  src, _, _ = exported
  out = tmp_path / "out"
  (out / "hf").mkdir(parents=True)
  (out / "hf" / "stale.txt").write_text("earlier")
  args = ["--model", str(src), "--out", str(out), "--format", "orbax", "hf"]
  assert export.main(args) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and f"{out / 'hf'} is not empty: pass --overwrite" \
      in err[0], err
  assert not (out / "orbax").exists()  # refused before any format was written
  assert (out / "hf" / "stale.txt").read_text() == "earlier"
  assert export.main(args + ["--overwrite"]) == 0
  assert (out / "hf" / "model.safetensors").is_file()
  assert not (out / "hf" / "stale.txt").exists()  # replaced, not mixed
  assert sorted(p.name for p in out.iterdir()) == ["hf", "orbax"]


def test_an_explicit_bounds_file_replaces_a_broken_own_one(tmp_path):
  """--bounds is the only bounds file read: the model's own, broken one
  does not stop the load."""
  src = tiny_runs.save_converted(tmp_path / "m", seed=0, lora_b_scale=0.1,
                                 curv=0.7, alpha=0.3)
  (src / "bounds.json").write_text('{"S": {"avg"')
  with pytest.raises(ValueError):
    serving.load_model(src)
  bounds = bounds_with_threshold(0.7, 1.0)
  safety.save_bounds(bounds, tmp_path / "given.json")
  model = serving.load_model(src, bounds_path=tmp_path / "given.json")
  assert model.bounds == bounds
  assert model.bounds_source == str(tmp_path / "given.json")


def test_convert_refuses_an_export_other_than_hf(tmp_path, capsys):
  stablehlo = tmp_path / "stablehlo"
  stablehlo.mkdir()
  (stablehlo / "hysac_head.json").write_text(json.dumps(
      {"format": serving.EXPORT_FORMAT, "kind": "stablehlo"}))
  assert convert.main(["--clip", str(stablehlo), "--out",
                       str(tmp_path / "out")]) == 1
  assert f"{stablehlo} is a stablehlo export: --clip takes" in \
      capsys.readouterr().err
  assert not (tmp_path / "out").exists()

