"""Conversion of HF CLIP and HySAC release checkpoints, the CLI, and loading
the converted directory with serving.load_model."""

import copy
import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

import hysac_jax
from hysac_jax import convert
from hysac_jax import export
from hysac_jax import serving
from hysac_jax.formats import hf_clip
from hysac_jax.models import sizes
from hysac_jax.models.clip import CLIPModel
from numerics import (assert_float32_parity, assert_float64_parity,
                      to_float64, tower_error_terms)
TARGETS = ["k_proj", "v_proj", "out_proj", "fc1", "fc2", "patch_embedding"]
# Release head scalars, stored as logs, chosen inside the clamp ranges.
HEAD = {"curv": math.log(0.7), "visual_alpha": math.log(0.05),
        "textual_alpha": math.log(0.08), "logit_scale": math.log(20.0)}


def hf_clip_config():
  t, v = sizes.get_clip_config("tiny").text, sizes.get_clip_config("tiny").vision
  return transformers.CLIPConfig(
      text_config=dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size,
                       intermediate_size=t.intermediate_size,
                       num_hidden_layers=t.num_hidden_layers,
                       num_attention_heads=t.num_attention_heads,
                       max_position_embeddings=t.max_position_embeddings,
                       projection_dim=64),
      vision_config=dict(image_size=v.image_size, patch_size=v.patch_size,
                         hidden_size=v.hidden_size,
                         intermediate_size=v.intermediate_size,
                         num_hidden_layers=v.num_hidden_layers,
                         num_attention_heads=v.num_attention_heads,
                         projection_dim=64),
      projection_dim=64)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  """A tiny random HF CLIP saved as safetensors and as pytorch_model.bin."""
  torch.manual_seed(0)
  model = transformers.CLIPModel(hf_clip_config()).eval()
  st = tmp_path_factory.mktemp("clip_st")
  binary = tmp_path_factory.mktemp("clip_bin")
  model.save_pretrained(st)
  # transformers 5 writes safetensors only: write the legacy layout by hand,
  # with the position_ids buffers that older checkpoints carry.
  (binary / "config.json").write_text((st / "config.json").read_text())
  legacy = dict(model.state_dict())
  legacy["text_model.embeddings.position_ids"] = torch.arange(77)[None]
  legacy["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
  torch.save(legacy, binary / "pytorch_model.bin")
  return model, st, binary


@pytest.fixture(scope="module")
def release(hf_dirs, tmp_path_factory):
  """A tiny HySAC state dict in the release layout, saved with torch.save.

  Returns (text_peft, vision_peft, state_dict, checkpoint path).
  """
  model, st, _ = hf_dirs
  cfg = hf_clip_config()
  text = transformers.CLIPTextModelWithProjection(cfg.text_config)
  vision = transformers.CLIPVisionModelWithProjection(cfg.vision_config)
  text.load_state_dict(model.state_dict(), strict=False)
  vision.load_state_dict(model.state_dict(), strict=False)
  lora = peft.LoraConfig(r=4, lora_alpha=1, target_modules=TARGETS,
                         lora_dropout=0.1, bias="none")
  text = peft.get_peft_model(text, lora).eval()
  vision = peft.get_peft_model(vision, lora).eval()
  gen = torch.Generator().manual_seed(2)
  with torch.no_grad():
    for m in (text, vision):
      for name, p in m.named_parameters():
        if "lora_" in name:
          p.copy_(0.3 * torch.randn(p.shape, generator=gen))
  state = {f"visual.{k}": v for k, v in vision.state_dict().items()}
  state.update({f"textual.{k}": v for k, v in text.state_dict().items()})
  state.update({k: torch.tensor(v) for k, v in HEAD.items()})
  state["pixel_mean"] = torch.tensor([0.485, 0.456, 0.406]).view(-1, 1, 1)
  state["pixel_std"] = torch.tensor([0.229, 0.224, 0.225]).view(-1, 1, 1)
  path = tmp_path_factory.mktemp("release") / "hysac_model.pth"
  torch.save(state, path)
  return text, vision, state, path


def inputs():
  rng = np.random.default_rng(0)
  ids = rng.integers(1, 49406, size=(2, 77)).astype(np.int32)
  ids[:, 12] = 49407
  pixels = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
  return ids, pixels


def exp_map0_f64(v, c):
  """SPEC §1: sinh(sqrt(c)|v|) v / (sqrt(c)|v|), float64."""
  v = np.asarray(v, np.float64)
  r = math.sqrt(c) * np.linalg.norm(v, axis=-1, keepdims=True)
  return np.sinh(r) * v / r


def spec_points(text, vision, ids, pixels):
  """SPEC §2 in PyTorch + NumPy, all float64: the lift of the peft towers'
  features."""
  text, vision = copy.deepcopy(text).double(), copy.deepcopy(vision).double()
  with torch.no_grad():
    t = text(input_ids=torch.as_tensor(ids)).text_embeds.numpy()
    v = vision(pixel_values=torch.as_tensor(
        pixels.transpose(0, 3, 1, 2), dtype=torch.float64)).image_embeds.numpy()
  # The checkpoint stores the head logs as float32 tensors.
  stored = {k: float(np.float32(v)) for k, v in HEAD.items()}
  c = math.exp(stored["curv"])
  return (exp_map0_f64(math.exp(stored["textual_alpha"]) * t, c),
          exp_map0_f64(math.exp(stored["visual_alpha"]) * v, c))


def test_safetensors_and_pytorch_bin_give_identical_params(hf_dirs):
  model, st, binary = hf_dirs
  cfg_a, params_a = convert.clip_params_from_hf(st)
  cfg_b, params_b = convert.clip_params_from_hf(binary)
  assert cfg_a == cfg_b
  assert jax.tree.structure(params_a) == jax.tree.structure(params_b)
  for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    np.testing.assert_array_equal(a, b)
  # One rename + transpose, checked by hand.
  np.testing.assert_array_equal(
      params_a["text_model"]["encoder"]["layers_1"]["mlp"]["fc1"]["kernel"],
      model.text_model.encoder.layers[1].mlp.fc1.weight.detach().numpy().T)
  ids, _ = inputs()
  with torch.no_grad():
    want = copy.deepcopy(model).double().get_text_features(
        input_ids=torch.as_tensor(ids))
    want = getattr(want, "pooler_output", want).numpy()
  with jax.enable_x64(True):
    got = CLIPModel(cfg_b, dtype=jnp.float64).apply(
        {"params": to_float64(params_b)}, ids, method="encode_text")
    assert_float64_parity(np.asarray(got), want)


def test_release_checkpoint_round_trip_matches_pytorch_spec(
    hf_dirs, release, tmp_path, capsys):
  _, st, _ = hf_dirs
  text, vision, _, path = release
  out = tmp_path / "converted"
  assert convert.main(["--clip", str(st), "--hysac-checkpoint", str(path),
                       "--out", str(out)]) == 0
  assert "wrote" in capsys.readouterr().out
  model = serving.load_model(out, merge_lora=False)
  assert model.kind == "converted"
  assert model.lora.rank == 4 and model.lora.targets == tuple(TARGETS)
  assert model.curv == pytest.approx(0.7, rel=1e-6)
  assert float(model.params["log_alpha_image"]) == pytest.approx(
      HEAD["visual_alpha"], rel=1e-6)
  ids, pixels = inputs()
  want_t, want_v = spec_points(text, vision, ids, pixels)
  # The math, in float64: the converted params on the hyperboloid.
  with jax.enable_x64(True):
    model64 = serving.Model.from_params(
        "converted", model.config, to_float64(model.params),
        lora=model.lora, mode=model.mode, curv_init=model.curv_init,
        dtype=jnp.float64)
    assert_float64_parity(np.asarray(model64.encode_image(pixels)), want_v)
    assert_float64_parity(np.asarray(model64.encode_text(ids)), want_t)
  # What users get: float32 points, within the error model.
  got_v = np.asarray(model.encode_image(pixels))
  got_t = np.asarray(model.encode_text(ids))
  assert got_v.dtype == np.float32 and got_v.shape == (2, 64)
  vision_terms = tower_error_terms(model.config, "vision")
  assert_float32_parity(got_v, want_v, *vision_terms)
  assert_float32_parity(got_t, want_t,
                        *tower_error_terms(model.config, "text"))
  merged = serving.load_model(out)  # LoRA merged: the default
  assert merged.lora is None
  assert_float32_parity(merged.encode_image(pixels), want_v, *vision_terms)


def _old_peft(key):
  return key.replace(".base_layer.", ".")


def _no_adapter_name(key):
  return re.sub(r"\.(lora_[AB])\.default\.", r".\1.", key)


def _ddp(key):
  return "module." + key


@pytest.mark.parametrize("rename", [_old_peft, _no_adapter_name, _ddp])
def test_peft_key_layouts_convert_identically(hf_dirs, release, rename):
  _, st, _ = hf_dirs
  _, _, state, _ = release
  assert any(".base_layer." in k for k in state)
  assert any(".lora_A.default." in k for k in state)
  _, _, want = convert.hysac_params_from_pytorch(state, st)
  _, _, got = convert.hysac_params_from_pytorch(
      {rename(k): v for k, v in state.items()}, st)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)


def test_clip_only_conversion_starts_from_the_initial_head(hf_dirs, tmp_path):
  model, st, _ = hf_dirs
  out = convert.convert(str(st), str(tmp_path / "clip_only"))
  loaded = serving.load_model(out)
  assert loaded.lora is None and loaded.curv == pytest.approx(1.0)
  ids, _ = inputs()
  with torch.no_grad():
    feats = model.text_projection(model.text_model(
        input_ids=torch.as_tensor(ids)).pooler_output).double().numpy()
  want = exp_map0_f64(64**-0.5 * feats, 1.0)
  assert_float32_parity(loaded.encode_text(ids), want,
                        *tower_error_terms(loaded.config, "text"))
  # Strings are tokenised with the CLIP tokenizer.
  assert loaded.encode_text(["a photo of a cat"]).shape == (1, 64)


def test_missing_key_is_listed(hf_dirs, release):
  _, st, _ = hf_dirs
  _, _, state, _ = release
  key = ("textual.base_model.model.text_model.encoder.layers.1.mlp.fc2."
         "lora_B.default.weight")
  broken = {k: v for k, v in state.items() if k != key}
  with pytest.raises(convert.CheckpointError,
                     match=r"1 missing keys \[text_model\.encoder\.layers\.1"
                           r"\.mlp\.fc2\.lora_B\.weight\]; 0 unexpected"):
    convert.hysac_params_from_pytorch(broken, st)


def test_unexpected_key_is_listed(hf_dirs, release):
  _, st, _ = hf_dirs
  _, _, state, _ = release
  extra = dict(state, **{"visual.base_model.model.vision_model.extra.weight":
                         torch.zeros(3)})
  with pytest.raises(convert.CheckpointError,
                     match=r"1 unexpected keys \[vision_model\.extra\.weight"):
    convert.hysac_params_from_pytorch(extra, st)


def test_wrong_shape_names_the_key_and_both_shapes(hf_dirs, release):
  _, st, _ = hf_dirs
  _, _, state, _ = release
  key = "visual.base_model.model.visual_projection.weight"
  broken = dict(state, **{key: torch.zeros(32, 64)})
  with pytest.raises(convert.CheckpointError,
                     match=r"shape mismatch for visual_projection\.weight: "
                           r"checkpoint has \(32, 64\), the model expects "
                           r"\(64, 64\)"):
    convert.hysac_params_from_pytorch(broken, st)


def test_missing_head_scalar_is_named(hf_dirs, release):
  _, st, _ = hf_dirs
  _, _, state, _ = release
  broken = {k: v for k, v in state.items() if k != "visual_alpha"}
  with pytest.raises(convert.CheckpointError,
                     match=r"missing head scalars \['visual_alpha"):
    convert.hysac_params_from_pytorch(broken, st)


def test_non_clip_files_are_refused_clearly(hf_dirs, tmp_path):
  _, st, _ = hf_dirs
  other = tmp_path / "resnet.pth"
  torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7)}, other)
  with pytest.raises(convert.CheckpointError,
                     match="resnet.pth is not a HySAC checkpoint"):
    convert.hysac_params_from_pytorch(other, st)
  garbage = tmp_path / "notes.pth"
  garbage.write_text("not a checkpoint")
  with pytest.raises(convert.CheckpointError,
                     match="notes.pth is not a readable PyTorch checkpoint"):
    convert.hysac_params_from_pytorch(garbage, st)
  hf_like = tmp_path / "bert"
  hf_like.mkdir()
  (hf_like / "config.json").write_text((st / "config.json").read_text())
  torch.save({"bert.embeddings.word_embeddings.weight": torch.zeros(4, 4)},
             hf_like / "pytorch_model.bin")
  with pytest.raises(convert.CheckpointError,
                     match="does not look like a CLIP checkpoint"):
    convert.clip_params_from_hf(hf_like)


def test_read_clip_config_reads_a_directory_or_its_file(hf_dirs, tmp_path):
  _, st, _ = hf_dirs
  want = sizes.clip_config_from_hf(
      json.loads((st / "config.json").read_text()))
  assert hf_clip.read_clip_config(st) == want
  assert hf_clip.read_clip_config(st / "config.json") == want
  with pytest.raises(FileNotFoundError, match="CLIP config not found"):
    hf_clip.read_clip_config(tmp_path)
  (tmp_path / "config.json").write_text('{"model_type": "bert"}')
  with pytest.raises(ValueError, match="config.json is not a Hugging Face "
                     "CLIPModel config"):
    hf_clip.read_clip_config(tmp_path)


def test_unreachable_hub_id_and_bad_directories_fail_clearly(tmp_path,
                                                             capsys):
  with pytest.raises(FileNotFoundError, match="could not be fetched"):
    convert.clip_params_from_hf("no-such-user/no-such-clip-model")
  assert convert.main(["--clip", str(tmp_path / "absent"), "--out",
                       str(tmp_path / "out")]) == 1
  assert "error:" in capsys.readouterr().err
  with pytest.raises(serving.ModelDirError,
                     match="neither hysac_head.json nor config.json"):
    serving.load_model(tmp_path)


def test_deprecated_loaders_warn_and_still_load(hf_dirs, tmp_path):
  _, st, _ = hf_dirs
  out = convert.convert(str(st), str(tmp_path / "clip_only"))
  want = serving.load_model(out).encode_text(["a photo of a cat"])
  for load in (hysac_jax.load_pretrained, convert.load_pretrained,
               export.load_model):
    with pytest.warns(DeprecationWarning, match="serving.load_model"):
      model = load(out)
    np.testing.assert_array_equal(
        np.asarray(model.encode_text(["a photo of a cat"])),
        np.asarray(want))
