"""Export in the HySAC release's format (hysac_jax/formats/release.py)."""

import dataclasses
import math
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
from flax import traverse_util

from configs import tiny
from hysac_jax import convert
from hysac_jax import export
from hysac_jax import pretrained
from hysac_jax import safety
from hysac_jax import serving
from hysac_jax.formats import release as release_format
from hysac_jax.models.clip import LoRAConfig
from hysac_jax.training import step as step_lib
from numerics import (assert_float32_parity, assert_float64_parity,
                      to_float64, tower_error_terms)
import tiny_runs

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
TARGETS = ("k_proj", "v_proj", "out_proj", "fc1", "fc2", "patch_embedding")
# Head scalars (stored logs) away from their initial values, inside range.
HEAD = {"log_curv": math.log(0.7), "log_alpha_image": math.log(0.2),
        "log_alpha_text": math.log(0.15), "log_logit_scale": math.log(20.0)}
BOUNDS = {g: {"avg": 1.0 + i, "low_05": 0.5 + i, "up_95": 1.5 + i}
          for i, g in enumerate(safety.GROUPS)}


class HySAC(torch.nn.Module):
  """The release's `HySAC` module: its attributes, names and encoders.

  Written from the release's description (SPEC.md §2): peft-wrapped towers
  `visual` / `textual`, the logs `logit_scale`, `curv`, `visual_alpha`,
  `textual_alpha` (registered in that order), and the `pixel_mean` /
  `pixel_std` buffers. `encode_*(…, project=True)` is
  `exp_map0(exp(alpha) · embeds, exp(curv))`, unclamped, as in the release.
  """

  def __init__(self, visual, textual, embed_dim=768, curv_init=1.0,
               pixel_mean=(0.485, 0.456, 0.406),
               pixel_std=(0.229, 0.224, 0.225), bounds=None):
    super().__init__()
    self.visual, self.textual = visual, textual
    self.logit_scale = torch.nn.Parameter(torch.tensor(1 / 0.07).log())
    self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1))
    self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1))
    self.curv = torch.nn.Parameter(torch.tensor(curv_init).log())
    self.visual_alpha = torch.nn.Parameter(torch.tensor(embed_dim**-0.5).log())
    self.textual_alpha = torch.nn.Parameter(
        torch.tensor(embed_dim**-0.5).log())
    self.bounds = bounds

  @staticmethod
  def _exp_map0(v, curv):
    r = curv.sqrt() * torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    return torch.sinh(torch.clamp(r, max=math.asinh(2.0**15))) * v / r

  def encode_image(self, images, project):
    feats = self.visual(pixel_values=images).image_embeds
    if not project:
      return feats
    return self._exp_map0(feats * self.visual_alpha.exp(), self.curv.exp())

  def encode_text(self, tokens, project):
    feats = self.textual(input_ids=tokens).text_embeds
    if not project:
      return feats
    return self._exp_map0(feats * self.textual_alpha.exp(), self.curv.exp())


def readme_release_load():
  """The README's release-side load block, without its `from hysac…` line
  (the tests pass their `HySAC` instead)."""
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
  block, = [b for b in blocks if "load_state_dict(" in b
            and "get_peft_model(" in b]
  assert "from hysac.models import HySAC\n" in block
  return block.replace("from hysac.models import HySAC\n", "")


def tiny_config(rank=16, alpha=1.0, targets=TARGETS):
  c = tiny.get_config()
  c.model.lora.rank, c.model.lora.alpha = rank, alpha
  c.model.lora.targets = targets
  return c


def trained(params):
  """`params` with non-zero LoRA B and head scalars away from their inits."""
  return tiny_runs.with_trained_lora(params, 0.3, HEAD)


def save_converted(directory, model, params, lora, bounds=True):
  """A converted directory (with bounds.json) of `params`."""
  convert.save_pretrained(directory, model.clip, params, lora=lora,
                          curv_init=model.curv_init)
  if bounds:
    safety.save_bounds(BOUNDS, directory / "bounds.json")
  return directory


@pytest.fixture(scope="module")
def source():
  """A 'trained' tiny model with the release's LoRA: (HySAC module, params)."""
  model = pretrained.model_from_config(tiny_config())
  params = trained(step_lib.init_model_params(model, jax.random.key(0)))
  return model, params


@pytest.fixture(scope="module")
def released(source, tmp_path_factory):
  """The source model, converted and exported by the CLI.

  Returns (HySAC module, params, OUT/release).
  """
  model, params = source
  src = save_converted(tmp_path_factory.mktemp("converted"), model, params,
                       model.lora)
  out = tmp_path_factory.mktemp("export")
  assert export.main(["--model", str(src), "--out", str(out),
                      "--format", "release"]) == 0
  return model, params, out / "release"


def with_lora(params, rank):
  """`params` with LoRA cut to `rank` (0: no LoRA leaves): a valid model of
  that rank, without initialising one."""
  flat = {}
  for path, value in traverse_util.flatten_dict(params).items():
    if path[-1] == "lora_A":
      value = value[..., :rank]
    elif path[-1] == "lora_B":
      value = value[..., :rank, :]
    if rank or path[-1] not in ("lora_A", "lora_B"):
      flat[path] = value
  return traverse_util.unflatten_dict(flat)


def inputs(n=3):
  return tiny_runs.random_inputs(n)


def test_export_then_import_gives_identical_params(released):
  model, params, out = released
  assert sorted(p.name for p in out.iterdir()) == [
      "clip", "hysac_bounds.json", "hysac_jax.json", "hysac_model.pth"]
  config, lora, back = convert.hysac_params_from_pytorch(
      out / "hysac_model.pth", out / "clip")
  # HF spells our argmax pooling (eos_token_id None) as OpenAI's 2.
  assert config.text.eos_token_id == 2 and model.clip.text.eos_token_id is None
  assert config == dataclasses.replace(
      model.clip, text=dataclasses.replace(model.clip.text, eos_token_id=2))
  assert (lora.rank, lora.alpha, set(lora.targets)) == (16, 1.0, set(TARGETS))
  want, got = (traverse_util.flatten_dict(t) for t in (params, back))
  assert sorted(got) == sorted(want)
  for path in want:
    np.testing.assert_array_equal(got[path], want[path], err_msg=str(path))
  # clip/ holds the base towers: the same, without LoRA.
  _, base = convert.clip_params_from_hf(out / "clip")
  base = traverse_util.flatten_dict(base)
  assert sorted(base) == sorted(p[1:] for p in want
                                if p[0] == "clip" and "lora" not in p[-1])
  for path, value in base.items():
    np.testing.assert_array_equal(value, want[("clip",) + path])
  assert safety.load_bounds(out / "hysac_bounds.json") == BOUNDS


def test_bounds_and_alpha_travel_through_the_release_round_trip(
    source, tmp_path):
  """converted (alpha 3.0) -> export --format release -> convert
  --hysac-checkpoint: the bounds and the alpha come back (they were
  dropped: the alpha fell back to 0.8 and an image flipped to safe)."""
  model, params = source
  src = tmp_path / "src"
  convert.save_pretrained(src, model.clip, params, lora=model.lora,
                          curv_init=model.curv_init, traversal_alpha=3.0)
  safety.save_bounds(BOUNDS, src / "bounds.json")
  out = tmp_path / "out"
  assert export.main(["--model", str(src), "--out", str(out), "--format",
                      "release"]) == 0
  back = tmp_path / "back"
  assert convert.main(["--clip", str(out / "release" / "clip"),
                       "--hysac-checkpoint",
                       str(out / "release" / "hysac_model.pth"),
                       "--out", str(back)]) == 0
  served = serving.load_model(back)
  assert served.traversal_alpha == 3.0
  assert served.bounds == BOUNDS
  assert served.bounds_source == str(back / "bounds.json")


def test_serving_names_the_conversion_a_release_export_needs(released):
  """The release format is for the PyTorch release; served here, it is
  refused with the convert command that reads it back."""
  _, _, out = released
  with pytest.raises(serving.ModelDirError,
                     match=r"PyTorch release's format.*--hysac-checkpoint "
                           + str(out / "hysac_model.pth")):
    serving.load_model(out)


def test_release_module_loads_strictly_and_gives_our_points(released):
  """The README's load, run on a module with the release's structure.

  float64 on both sides checks the math (F64_RTOL); float32 is checked with
  the error-model bound of tests/numerics.py for the tiny towers (K = 256,
  depth 14: 1.1e-4 of the largest output).
  """
  model, params, out = released
  ids, pixels = inputs()
  pixels_nchw = torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())
  scope = {"HySAC": HySAC, "pixels_nchw": pixels_nchw}
  code = readme_release_load().replace('"exported/release"', repr(str(out)))
  with torch.no_grad():
    exec(code, scope)  # pylint: disable=exec-used
  torch_model = scope["model"]
  ours = serving.Model.from_params("converted", model.clip, params,
                                   lora=model.lora, mode="hyp",
                                   curv_init=model.curv_init)
  with torch.no_grad():
    text32 = torch_model.encode_text(torch.from_numpy(ids.astype(np.int64)),
                                     project=True).numpy()
  image32 = scope["points"].detach().numpy()
  got_v, got_t = np.asarray(ours.encode_image(pixels)), np.asarray(
      ours.encode_text(ids))
  for got, want, tower in ((got_v, image32, "vision"),
                           (got_t, text32, "text")):
    terms = tower_error_terms(model.clip, tower)
    assert_float32_parity(got, want, *terms)
  torch_model.double()
  with torch.no_grad():
    image64 = torch_model.encode_image(pixels_nchw.double(),
                                       project=True).numpy()
    text64 = torch_model.encode_text(torch.from_numpy(ids.astype(np.int64)),
                                     project=True).numpy()
  with jax.enable_x64(True):
    ours64 = serving.Model.from_params(
        "converted", model.clip, to_float64(params), lora=model.lora,
        mode="hyp", curv_init=model.curv_init, dtype=jnp.float64)
    assert_float64_parity(np.asarray(ours64.encode_image(pixels)), image64)
    assert_float64_parity(np.asarray(ours64.encode_text(ids)), text64)


def test_model_without_lora_gets_zero_adapters(source, tmp_path):
  model, params = source
  base = with_lora(params, 0)
  src = save_converted(tmp_path / "src", model, base, None)
  written = export.export(export.load_source(src, merge=False),
                          tmp_path / "out", ("release",))
  _, lora, back = convert.hysac_params_from_pytorch(
      pathlib.Path(written["release"]) / "hysac_model.pth", model.clip)
  assert lora.rank == 16
  want = traverse_util.flatten_dict(base)
  for path, value in traverse_util.flatten_dict(back).items():
    if path[-1] in ("lora_A", "lora_B"):
      assert not value.any(), path
    else:
      np.testing.assert_array_equal(value, want[path])


def test_head_logs_are_written_clamped():
  params = {"log_curv": np.float32(5.0), "log_alpha_image": np.float32(0.5),
            "log_alpha_text": np.float32(-2.0),
            "log_logit_scale": np.float32(1.0)}
  head = release_format.clamped_head(params, curv_init=1.0)
  assert head["curv"] == np.float32(math.log(10.0))
  assert head["visual_alpha"] == 0.0
  assert head["textual_alpha"] == np.float32(-2.0)  # in range: unchanged
  assert head["logit_scale"] == np.float32(math.log(1 / 0.07))


@pytest.mark.parametrize("lora, says", [
    (LoRAConfig(rank=8), "this model has rank 8, alpha 1"),
    (LoRAConfig(alpha=2.0), "this model has rank 16, alpha 2"),
    (LoRAConfig(targets=("q_proj", "v_proj")), "targets ['q_proj', 'v_proj']"),
])
def test_other_lora_is_refused(lora, says):
  with pytest.raises(release_format.ReleaseFormatError, match=re.escape(says)):
    release_format.check_lora(lora)
  release_format.check_lora(None)  # no LoRA: zero adapters, no error
  release_format.check_lora(LoRAConfig(targets=TARGETS[::-1]))  # any order


def test_other_lora_ends_the_cli_in_one_line_before_writing(
    source, tmp_path, capsys):
  model, params = source
  lora = dataclasses.replace(model.lora, rank=8)
  src = save_converted(tmp_path / "src", model, with_lora(params, 8), lora)
  out = tmp_path / "out"
  assert export.main(["--model", str(src), "--out", str(out),
                      "--format", "hf", "release"]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(
      "python -m hysac_jax.export: error: the release format holds the "
      "release's LoRA only (rank 16, alpha 1"), err
  assert not out.exists()  # refused before any format was written


def test_missing_bounds_and_non_empty_out_are_refused(source, tmp_path,
                                                      capsys):
  model, params = source
  src = save_converted(tmp_path / "src", model, params, model.lora,
                       bounds=False)
  out = tmp_path / "out"
  args = ["--model", str(src), "--out", str(out), "--format", "release"]
  assert export.main(args) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "needs bounds (hysac_bounds.json" in err[0], err
  assert "which train.py writes when the run ends" in err[0]
  assert "written by eval.py" not in err[0]  # eval.py writes no bounds
  safety.save_bounds(BOUNDS, src / "bounds.json")
  (out / "release").mkdir(parents=True)
  (out / "release" / "old.txt").write_text("x")
  assert export.main(args) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "is not empty: pass --overwrite" in err[0], err
  assert export.main(args + ["--overwrite"]) == 0
  assert (out / "release" / "hysac_model.pth").is_file()


@pytest.mark.slow
def test_training_run_exports_its_unmerged_lora(tmp_path):
  """A run directory (config.json, a best_recall checkpoint of the trainable
  params, bounds.json) exports its LoRA and head as trained."""
  run = tmp_path / "run"
  state = tiny_runs.save_run(run, tiny_config(), trained, step=3,
                             bounds=BOUNDS)
  out = tmp_path / "out"
  assert export.main(["--model", str(run), "--out", str(out), "--format",
                      "release", "orbax"]) == 0
  _, lora, back = convert.hysac_params_from_pytorch(
      out / "release" / "hysac_model.pth", out / "release" / "clip")
  assert lora.rank == 16
  want = traverse_util.flatten_dict(jax.device_get(state.params))
  got = traverse_util.flatten_dict(back)
  assert sorted(got) == sorted(want)
  for path in want:
    np.testing.assert_array_equal(got[path], want[path], err_msg=str(path))
  # The serving format of the same call still gets the LoRA merged.
  with ocp.StandardCheckpointer() as ckpt:
    merged = traverse_util.flatten_dict(ckpt.restore(out / "orbax" / "params"))
  assert merged and not any(p[-1].startswith("lora") for p in merged)


def test_euclidean_model_is_refused(source, tmp_path):
  model, params = source
  src = serving.Model.from_params("converted", model.clip, params,
                                  mode="euc", curv_init=1.0, bounds=BOUNDS,
                                  lora=model.lora)
  with pytest.raises(release_format.ReleaseFormatError,
                     match=r"HySAC models \(mode 'hyp'\); this one is 'euc'"):
    export.export(src, tmp_path, ("release",))
  assert not (tmp_path / "release").exists()
