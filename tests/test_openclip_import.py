"""OpenCLIP import (hysac_jax/formats/openclip.py and `convert --open-clip`).

The reference is open_clip's own torch model (`open_clip.model.CLIP`, built
from the same config dict, random weights, `.double()`); both sides run in
float64, so the bound is `numerics.F64_RTOL` of the largest output.
"""

import copy
import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict as flax_flat

from hysac_jax import cli
from hysac_jax import convert
from hysac_jax import export
from hysac_jax.formats import openclip as oi
from hysac_jax import pretrained
from hysac_jax import serving
from hysac_jax.models.clip import CLIPModel
from hysac_jax.training import restore as restore_lib
from numerics import (assert_float32_parity, assert_float64_parity,
                      to_float64, tower_error_terms)
from open_clip_import import load_open_clip
import tiny_runs

ROOT = tiny_runs.ROOT
PROG = "python -m hysac_jax.convert"


def tiny_cfg(**top):
  """A small OpenCLIP config: QuickGELU unless `top` says otherwise."""
  cfg = {"embed_dim": 24, "quick_gelu": True,
         "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32,
                        "layers": 2, "head_width": 16},
         "text_cfg": {"context_length": 20, "vocab_size": 100, "width": 32,
                      "heads": 2, "layers": 2}}
  cfg.update(top)
  return cfg


# GELU (no quick_gelu field: open_clip's default) with the fields that are
# supported exactly although they differ from the defaults, and patch
# dropout, which must not act at inference.
GELU_VARIANTS = tiny_cfg(
    vision_cfg={"image_size": 24, "patch_size": 6, "width": 48, "layers": 2,
                "head_width": 16, "mlp_ratio": 2.5,
                "norm_kwargs": {"eps": 1e-6}, "final_ln_after_pool": True,
                "patch_dropout": 0.5, "block_type": "default"},
    text_cfg={"context_length": 20, "vocab_size": 100, "width": 32,
              "heads": 4, "layers": 2, "mlp_ratio": 3.0,
              "norm_kwargs": {"eps": 1e-6}, "pool_type": "eos",
              "eos_id": 97, "final_ln_after_pool": True})
del GELU_VARIANTS["quick_gelu"]  # absent: open_clip's default, GELU


@pytest.fixture(scope="module")
def open_clip():
  return load_open_clip()


def openclip_model(open_clip, cfg, seed=0):
  """open_clip's CLIP for `cfg`, every weight random (LayerNorms and biases
  too, so that a swapped scale/bias or q/k/v would show)."""
  torch.manual_seed(seed)
  model = open_clip.model.CLIP(**copy.deepcopy(cfg)).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model


def state_numpy(model):
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def inputs(config, batch=3, seed=1):
  """Token ids whose end-of-text sits at different positions, and
  normalised NHWC pixels.

  The end of text is the largest id, or `eos_token_id` when pooling there;
  then the largest id of the vocabulary also comes earlier in each row, so
  that pooling at the largest id would pick another position.
  """
  t, v = config.text, config.vision
  rng = np.random.default_rng(seed)
  top = t.vocab_size - 1
  ids = rng.integers(1, top - 3, size=(batch, t.max_position_embeddings))
  for row, end in enumerate((3, t.max_position_embeddings - 1, 7)[:batch]):
    if t.eos_token_id is None:
      ids[row, end] = top
    else:
      ids[row, end] = t.eos_token_id
      ids[row, 1] = top
    ids[row, end + 1:] = 0
  pixels = rng.normal(size=(batch, v.image_size, v.image_size, 3))
  return ids.astype(np.int32), pixels


def assert_parity(torch_model, config, params):
  """Both towers in float64 against open_clip's forward."""
  ids, pixels = inputs(config)
  reference = copy.deepcopy(torch_model).double()
  with torch.no_grad():
    want_t = reference.encode_text(torch.as_tensor(ids, dtype=torch.long))
    want_v = reference.encode_image(torch.as_tensor(
        pixels.transpose(0, 3, 1, 2)))
  with jax.enable_x64(True):
    model = CLIPModel(config, dtype=jnp.float64)
    p64 = {"params": to_float64(params)}
    got_t = model.apply(p64, ids, method="encode_text")
    got_v = model.apply(p64, jnp.asarray(pixels), method="encode_image")
    errors = []
    for got, want in ((got_t, want_t), (got_v, want_v)):
      got, want = np.asarray(got), want.numpy()
      assert_float64_parity(got, want)
      errors.append(float(np.abs(got - want).max() / np.abs(want).max()))
  return errors


# ------------------------------------------------------------ parity ---


@pytest.mark.parametrize("cfg,act", [(tiny_cfg(), "quick_gelu"),
                                     (GELU_VARIANTS, "gelu")],
                         ids=["quickgelu", "gelu_variants"])
def test_tiny_towers_match_open_clip_forward_in_float64(open_clip, cfg, act):
  torch_model = openclip_model(open_clip, cfg)
  model = oi.config_from_openclip(cfg)
  assert model.config.text.hidden_act == act
  assert model.config.vision.hidden_act == act
  params = oi.params_from_openclip_state(state_numpy(torch_model),
                                         model.config)
  assert_parity(torch_model, model.config, params)


def test_activation_is_not_interchangeable(open_clip):
  """The parity above can fail: the same weights with the other activation
  are far off open_clip's outputs."""
  cfg = tiny_cfg()
  torch_model = openclip_model(open_clip, cfg)
  model = oi.config_from_openclip({**cfg, "quick_gelu": False})
  params = oi.params_from_openclip_state(state_numpy(torch_model),
                                         model.config)
  with pytest.raises(AssertionError):
    assert_parity(torch_model, model.config, params)


def test_vitb16_widths_with_two_layers_match_open_clip(open_clip):
  """open_clip's bundled ViT-B-16 config, found by name, cut to 2 layers."""
  cfg, preprocess_cfg, source = oi.read_config("ViT-B-16")
  assert source.endswith(os.path.join("model_configs", "ViT-B-16.json"))
  assert preprocess_cfg is None
  cfg["vision_cfg"]["layers"] = cfg["text_cfg"]["layers"] = 2
  torch_model = openclip_model(open_clip, cfg)
  model = oi.config_from_openclip(cfg, source)
  c = model.config
  assert (c.vision.hidden_size, c.vision.num_attention_heads,
          c.vision.intermediate_size, c.vision.patch_size) == (768, 12, 3072,
                                                               16)
  assert (c.text.hidden_size, c.text.num_attention_heads,
          c.projection_dim, c.text.hidden_act) == (512, 8, 512, "gelu")
  # OpenCLIP's defaults, since the config names no mean or std.
  assert model.image_mean == oi.OPENAI_MEAN == open_clip.OPENAI_DATASET_MEAN
  assert model.image_std == oi.OPENAI_STD == open_clip.OPENAI_DATASET_STD
  assert "default" in model.preprocess_source
  params = oi.params_from_openclip_state(state_numpy(torch_model), c)
  assert_parity(torch_model, c, params)
  # What users run: float32 on both sides, within the error model's bound.
  ids, pixels = inputs(c)
  with torch.no_grad():
    want_t = torch_model.encode_text(torch.as_tensor(ids, dtype=torch.long))
    want_v = torch_model.encode_image(torch.as_tensor(
        pixels.transpose(0, 3, 1, 2), dtype=torch.float32))
  model = CLIPModel(c)
  got_t = model.apply({"params": params}, ids, method="encode_text")
  got_v = model.apply({"params": params}, jnp.asarray(pixels, jnp.float32),
                      method="encode_image")
  assert np.asarray(got_v).dtype == np.float32
  assert_float32_parity(got_t, want_t.numpy(), *tower_error_terms(c, "text"))
  assert_float32_parity(got_v, want_v.numpy(),
                        *tower_error_terms(c, "vision"))


def test_quickgelu_model_names_resolve_to_quickgelu(open_clip):
  del open_clip  # only its bundled configs are read
  cfg, _, _ = oi.read_config("ViT-B-16-quickgelu")
  assert oi.config_from_openclip(cfg).config.text.hidden_act == "quick_gelu"
  cfg, _, _ = oi.read_config("ViT-B-16")
  assert oi.config_from_openclip(
      cfg, force_quick_gelu=True).config.vision.hidden_act == "quick_gelu"


def test_plain_vit_configs_of_open_clip_convert_and_the_rest_are_named(
    open_clip):
  folder = os.path.dirname(oi.bundled_config_path("ViT-B-16"))
  accepted, refused = set(), {}
  for name in sorted(f[:-5] for f in os.listdir(folder)
                     if f.endswith(".json")):
    cfg, preprocess_cfg, source = oi.read_config(name)
    try:
      oi.config_from_openclip(cfg, source, preprocess_cfg)
      accepted.add(name)
    except oi.OpenCLIPConfigError as e:
      refused[name] = str(e)
  for name in ("ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336",
               "ViT-H-14", "ViT-g-14", "ViT-bigG-14", "ViT-L-14-quickgelu"):
    assert name in accepted
  assert "custom_text" in refused["ViT-B-16-SigLIP"]
  assert "timm_model_name" in refused["convnext_base"]
  assert all(f"{folder}" in msg for msg in refused.values())
  assert len(accepted) == 31 and len(refused) == 113, sorted(accepted)


# --------------------------------------------------------------- CLI ---


def write_hub_layout(tmp_path, torch_model, cfg, mean=None, std=None,
                     wrap=True):
  """open_clip_config.json (model_cfg + preprocess_cfg) and a training
  checkpoint ({"epoch", "state_dict"} with DDP's `module.` prefix)."""
  preprocess = {"interpolation": "bicubic", "resize_mode": "shortest"}
  if mean is not None:
    preprocess.update(mean=mean, std=std)
  config = tmp_path / "open_clip_config.json"
  config.write_text(json.dumps({"model_cfg": cfg,
                                "preprocess_cfg": preprocess}))
  state = torch_model.state_dict()
  if wrap:
    state = {"epoch": 3, "state_dict": {f"module.{k}": v
                                        for k, v in state.items()}}
  checkpoint = tmp_path / "epoch_3.pt"
  torch.save(state, checkpoint)
  return config, checkpoint


def test_cli_converts_a_training_checkpoint_with_its_mean_and_std(
    open_clip, tmp_path, capsys):
  cfg = tiny_cfg()
  torch_model = openclip_model(open_clip, cfg)
  mean, std = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
  config, checkpoint = write_hub_layout(tmp_path, torch_model, cfg, mean,
                                        std)
  out = tmp_path / "converted"
  assert convert.main(["--open-clip", str(tmp_path), "--checkpoint",
                       str(checkpoint), "--out", str(out)]) == 0
  printed = capsys.readouterr().out
  assert "activation quick_gelu" in printed and "[0.5, 0.5, 0.5]" in printed
  meta = json.loads((out / "config.json").read_text())
  assert meta["preprocess"] == {"image_mean": mean, "image_std": std}
  assert meta["source"]["activation"] == "quick_gelu"
  assert meta["source"]["open_clip_config"] == str(config)
  assert meta["source"]["open_clip_preprocess_cfg"]["resize_mode"] == (
      "shortest")
  # Served, its images would be normalised with OpenAI's mean/std: refused.
  with pytest.raises(ValueError, match=r"image_mean \[0.5, 0.5, 0.5\], but "
                     "the image pipelines use OpenAI's"):
    serving.load_model(out)
  loaded = convert.read_converted(out)
  direct = oi.params_from_openclip_state(state_numpy(torch_model),
                                         loaded.config)
  for a, b in zip(jax.tree.leaves(direct),
                  jax.tree.leaves(loaded.params["clip"])):
    np.testing.assert_array_equal(a, b)
  # The head starts where HySAC starts (SPEC §2), not at CLIP's logit scale.
  for name, value in convert.initial_head(loaded.config).items():
    np.testing.assert_array_equal(loaded.params[name], value)


def test_cli_reads_safetensors_and_a_plain_config_json(open_clip, tmp_path):
  from safetensors.torch import save_file
  cfg = GELU_VARIANTS
  torch_model = openclip_model(open_clip, cfg)
  config = tmp_path / "model.json"
  config.write_text(json.dumps(cfg))
  checkpoint = tmp_path / "open_clip_model.safetensors"
  save_file(dict(torch_model.state_dict()), checkpoint)
  out = tmp_path / "converted"
  assert convert.main(["--open-clip", str(config), "--checkpoint",
                       str(checkpoint), "--out", str(out)]) == 0
  meta = json.loads((out / "config.json").read_text())
  assert meta["clip"]["vision"]["hidden_act"] == "gelu"
  assert meta["preprocess"]["image_mean"] == list(oi.OPENAI_MEAN)
  loaded = serving.load_model(out, merge_lora=False)
  assert_parity(torch_model, loaded.config, loaded.params["clip"])


def test_bfloat16_safetensors_convert_exactly(open_clip, tmp_path):
  from safetensors.torch import save_file
  cfg = tiny_cfg()
  state = {k: v.to(torch.bfloat16)
           for k, v in openclip_model(open_clip, cfg).state_dict().items()}
  path = tmp_path / "bf16.safetensors"
  save_file(state, path)
  config = oi.config_from_openclip(cfg).config
  params = oi.params_from_openclip_state(oi.load_state(path), config)
  want = state["visual.proj"].float().numpy()
  got = params["visual_projection"]["kernel"]
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, want)


@pytest.mark.slow
def test_cli_needs_neither_open_clip_nor_torchvision(tiny_files, tmp_path):
  """The converter reads a config JSON and a torch checkpoint in a fresh
  process without importing open_clip or torchvision."""
  config, checkpoint, _ = tiny_files
  code = ("import sys; from hysac_jax import convert; "
          f"rc = convert.main(['--open-clip', {str(config)!r}, "
          f"'--checkpoint', {str(checkpoint)!r}, '--out', "
          f"{str(tmp_path / 'out')!r}]); "
          "bad = [m for m in ('open_clip', 'torchvision') if m in "
          "sys.modules]; print('imported:', bad); sys.exit(rc or len(bad))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, timeout=300, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
  assert out.returncode == 0, out.stdout + out.stderr[-3000:]
  assert "imported: []" in out.stdout


def run_cli(args, capsys):
  code = convert.main(args)
  err = capsys.readouterr().err
  lines = [l for l in err.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith(f"{PROG}: error: "), err
  return code, lines[0]


@pytest.fixture(scope="module")
def tiny_files(open_clip, tmp_path_factory):
  """A tiny config JSON and its matching checkpoint (plain state dict)."""
  folder = tmp_path_factory.mktemp("oc")
  cfg = tiny_cfg()
  config = folder / "tiny.json"
  config.write_text(json.dumps(cfg))
  state = openclip_model(open_clip, cfg).state_dict()
  checkpoint = folder / "tiny.pt"
  torch.save(state, checkpoint)
  return config, checkpoint, state


def test_cli_mismatched_checkpoint_lists_missing_unexpected_and_shapes(
    tiny_files, tmp_path, capsys):
  config, _, state = tiny_files
  broken = dict(state)
  del broken["visual.ln_pre.bias"]
  del broken["transformer.resblocks.1.attn.in_proj_weight"]
  broken["visual.attn_pool.query"] = torch.zeros(4, 32)
  broken["text_projection"] = torch.zeros(32, 8)
  path = tmp_path / "broken.pt"
  torch.save(broken, path)
  code, line = run_cli(["--open-clip", str(config), "--checkpoint", str(path),
                        "--out", str(tmp_path / "out")], capsys)
  assert code == cli.EXIT_ERROR
  for fragment in (str(path), "2 missing keys", "visual.ln_pre.bias",
                   "transformer.resblocks.1.attn.in_proj_weight",
                   "1 unexpected keys [visual.attn_pool.query]",
                   "text_projection: checkpoint (32, 8), config (32, 24)"):
    assert fragment in line, (fragment, line)
  assert not (tmp_path / "out").exists()


def test_cli_checkpoint_of_another_architecture_is_named(tiny_files,
                                                         tmp_path, capsys):
  config, _, _ = tiny_files
  path = tmp_path / "hf.pt"
  torch.save({"text_model.embeddings.token_embedding.weight":
              torch.zeros(3, 2)}, path)
  code, line = run_cli(["--open-clip", str(config), "--checkpoint", str(path),
                        "--out", str(tmp_path / "out")], capsys)
  assert code == cli.EXIT_ERROR
  assert "does not look like an OpenCLIP CLIP checkpoint" in line
  assert "token_embedding.weight" in line


@pytest.mark.parametrize("args,code,fragment", [
    (["--open-clip", "ViT-B-61"], cli.EXIT_ERROR,
     "'ViT-B-61': no such OpenCLIP model"),
    (["--open-clip", "missing/config.json"], cli.EXIT_ERROR,
     "OpenCLIP config not found: missing/config.json"),
    (["--open-clip", "RN50"], cli.EXIT_ERROR,
     "vision_cfg.layers is [3, 4, 6, 3]: a list of stage depths"),
    (["--open-clip", "coca_ViT-B-32"], cli.EXIT_ERROR, "multimodal_cfg"),
    (["--open-clip", "ViT-B-16-SigLIP"], cli.EXIT_ERROR, "custom_text"),
    (["--open-clip", "ViT-B-16", "--checkpoint", "nothing.pt"],
     cli.EXIT_ERROR, "OpenCLIP checkpoint not found: nothing.pt"),
], ids=["unknown_name", "missing_json", "resnet", "coca", "siglip",
        "missing_checkpoint"])
def test_cli_bad_model_or_files_end_in_one_line(args, code, fragment,
                                                tiny_files, tmp_path, capsys):
  if "--checkpoint" not in args:
    args = args + ["--checkpoint", str(tiny_files[1])]
  got, line = run_cli(args + ["--out", str(tmp_path / "out")], capsys)
  assert got == code
  assert fragment in line, line


def test_cli_usage_errors(tiny_files, tmp_path, capsys):
  config, checkpoint, _ = tiny_files
  code, line = run_cli(["--open-clip", str(config), "--out",
                        str(tmp_path)], capsys)
  assert code == cli.EXIT_USAGE and (
      "--open-clip needs --open-clip-weights" in line)
  code, line = run_cli(["--clip", "x", "--checkpoint", str(checkpoint),
                        "--out", str(tmp_path)], capsys)
  assert code == cli.EXIT_USAGE and "go with --open-clip" in line


# ------------------------------------------------- config field rules ---


@pytest.mark.parametrize("section,field,value,fragment", [
    ("vision_cfg", "attentional_pool", True, "attentional pooler"),
    ("vision_cfg", "no_ln_pre", True, "always has ln_pre"),
    ("vision_cfg", "pool_type", "avg", "class-token pooling"),
    ("vision_cfg", "pos_embed_type", "sin_cos_2d", "learned position"),
    ("vision_cfg", "ls_init_value", 1e-5, "layer scale"),
    ("vision_cfg", "timm_model_name", "vit_base_patch16_224", "timm"),
    ("vision_cfg", "qk_norm", True, "custom attention block"),
    ("vision_cfg", "block_type", "custom", "custom attention blocks"),
    ("vision_cfg", "image_size", [32, 48], "only square sizes"),
    ("vision_cfg", "head_width", 12, "does not divide width 32"),
    ("vision_cfg", "act_kwargs", {"approximate": "tanh"},
     "activation arguments"),
    ("vision_cfg", "norm_kwargs", {"elementwise_affine": False},
     "only 'eps'"),
    ("vision_cfg", "patch_szie", 8, "unknown OpenCLIP config field (did you "
     "mean 'patch_size'?)"),
    ("text_cfg", "hf_model_name", "roberta-base", "Hugging Face text towers"),
    ("text_cfg", "hf_tokenizer_name", "bert-base", "OpenAI's CLIP BPE"),
    ("text_cfg", "embed_cls", True, "text class token"),
    ("text_cfg", "no_causal_mask", True, "always causal"),
    ("text_cfg", "proj_bias", True, "no bias"),
    ("text_cfg", "proj_type", "none", "linear projection"),
    ("text_cfg", "pool_type", "last", "only 'argmax' and 'eos'"),
    ("text_cfg", "heads", 3, "does not divide width 32"),
    (None, "quick_gelu", "yes", "quick_gelu is 'yes': expected true"),
    (None, "custom_text", True, "CustomTextCLIP"),
    (None, "embed_dims", 8, "unknown OpenCLIP config field"),
])
def test_unsupported_config_fields_are_named(section, field, value,
                                             fragment):
  cfg = copy.deepcopy(tiny_cfg())
  (cfg[section] if section else cfg)[field] = value
  with pytest.raises(oi.OpenCLIPConfigError) as e:
    oi.config_from_openclip(cfg, "my.json")
  where = f"my.json: {section}.{field}" if section else f"my.json"
  assert where in str(e.value) and field in str(e.value)
  assert fragment in str(e.value), str(e.value)


def test_eos_pooling_at_id_2_is_refused():
  """Our pooling reads eos 2 as OpenAI's largest-id rule."""
  cfg = copy.deepcopy(tiny_cfg())
  cfg["text_cfg"].update(pool_type="eos")  # open_clip's default eos_id: 2
  with pytest.raises(oi.OpenCLIPConfigError, match="text_cfg.eos_id is 2"):
    oi.config_from_openclip(cfg)


def test_every_open_clip_config_field_has_a_rule(open_clip):
  """A field added to open_clip's CLIPVisionCfg / CLIPTextCfg must be
  decided here (supported, ignorable or rejected), not passed over."""
  vision = {f.name for f in dataclasses.fields(open_clip.CLIPVisionCfg)}
  text = {f.name for f in dataclasses.fields(open_clip.CLIPTextCfg)}
  assert vision == set(oi._VISION_FIELDS)  # pylint: disable=protected-access
  assert text == set(oi._TEXT_FIELDS)  # pylint: disable=protected-access


def test_run_compatibility_checks_towers_and_mean_std(open_clip, tmp_path):
  """`train.py --init_from` builds the run's towers and normalises with
  OpenAI's mean/std: a converted model must agree on both."""
  from hysac_jax.models import sizes
  tiny = sizes.get_clip_config("tiny")
  # configs/tiny.py's towers: 32 text positions (model.context_length).
  tiny = dataclasses.replace(tiny, text=dataclasses.replace(
      tiny.text, max_position_embeddings=32))
  cfg = tiny_size_cfg()
  torch_model = openclip_model(open_clip, cfg)
  same = tmp_path / "same"
  same.mkdir()
  _, checkpoint = write_hub_layout(same, torch_model, cfg, wrap=False)
  oi.convert_openclip(same, checkpoint, tmp_path / "ok")
  pretrained.check_run_compatible(tmp_path / "ok", tiny)  # passes
  other = tmp_path / "other"
  other.mkdir()
  _, checkpoint = write_hub_layout(other, torch_model, cfg, mean=[0.5] * 3,
                                   std=[0.5] * 3, wrap=False)
  oi.convert_openclip(other, checkpoint, tmp_path / "mean")
  with pytest.raises(ValueError, match=r"image_mean \[0.5, 0.5, 0.5\], but "
                     "the image pipelines use OpenAI's"):
    pretrained.check_run_compatible(tmp_path / "mean", tiny)
  other_eps = dataclasses.replace(
      tiny, vision=dataclasses.replace(tiny.vision, layer_norm_eps=1e-6))
  with pytest.raises(ValueError, match=r"vision.layer_norm_eps 1e-05 \(run: "
                     r"1e-06\)"):
    pretrained.check_run_compatible(tmp_path / "ok", other_eps)
  # Hugging Face configs pool at eos id 49407, the named sizes at the
  # largest id: the same position on the OpenAI vocabulary.
  hf_like = dataclasses.replace(
      tiny, text=dataclasses.replace(tiny.text, eos_token_id=49407))
  pretrained.check_run_compatible(tmp_path / "ok", hf_like)


# ------------------------------------------- round trip through training ---

# The micro run of tests/test_training_loop.py, one epoch of 4 steps.
TRAIN_OVERRIDES = {**tiny_runs.MICRO_OVERRIDES, "train.epochs": 1}


def tiny_size_cfg(quick_gelu=True):
  """OpenCLIP's config of configs/tiny.py's towers (`sizes` "tiny", with
  its 32 text positions)."""
  return {"embed_dim": 64, "quick_gelu": quick_gelu,
          "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64,
                         "layers": 2, "head_width": 32},
          "text_cfg": {"context_length": 32, "vocab_size": 49408,
                       "width": 64, "heads": 2, "layers": 2}}


def convert_cli(args):
  return subprocess.run([sys.executable, "-m", "hysac_jax.convert"] + args,
                        capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT)


def train_cli(args):
  return subprocess.run([sys.executable, str(ROOT / "train.py")] + args,
                        capture_output=True, text=True, timeout=600,
                        env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT)


@pytest.fixture(scope="module")
def openclip_run(open_clip, tmp_path_factory):
  """A tiny OpenCLIP checkpoint, converted by the CLI, trained by train.py.

  Returns a dict: `config` / `checkpoint` (the OpenCLIP files),
  `converted` (the hysac_jax directory), `workdir` (the run), `data_dir`,
  `train` (train.py's CompletedProcess). A later step (the run's export)
  takes these paths.
  """
  folder = tmp_path_factory.mktemp("openclip_run")
  cfg = tiny_size_cfg()
  config = folder / "tiny.json"
  config.write_text(json.dumps(cfg))
  checkpoint = folder / "tiny.pt"
  torch.save(openclip_model(open_clip, cfg).state_dict(), checkpoint)
  converted = folder / "converted"
  out = convert_cli(["--open-clip", str(config), "--checkpoint",
                     str(checkpoint), "--out", str(converted)])
  assert out.returncode == 0, out.stderr[-3000:]
  data_dir, workdir = folder / "tfds", folder / "run"
  train = train_cli(tiny_runs.tiny_cli_flags(data_dir, TRAIN_OVERRIDES)
                    + [f"--workdir={workdir}", f"--init_from={converted}"])
  return {"config": config, "checkpoint": checkpoint,
          "converted": converted, "workdir": workdir, "data_dir": data_dir,
          "train": train}


@pytest.mark.slow
def test_converted_openclip_model_trains_from_its_weights(openclip_run):
  import orbax.checkpoint as ocp
  train = openclip_run["train"]
  assert train.returncode == 0, train.stderr[-3000:]
  workdir = openclip_run["workdir"]
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()
                 if p.name.isdigit())
  assert steps[-1] == 4
  state = ocp.PyTreeCheckpointer().restore(
      workdir / "checkpoints" / str(steps[-1]) / "state")
  start = convert.read_converted(openclip_run["converted"]).params
  trained = state["trainable"]["clip"]["text_projection"]["kernel"]
  initial = start["clip"]["text_projection"]["kernel"]
  moved = float(np.abs(np.asarray(trained) - initial).max())
  # Four Adam steps at lr <= 1e-3 move a weight by about 4e-3 at most; a
  # run that started from anything but the converted weights would be
  # O(0.1) away (the weights' own scale).
  assert 0 < moved < 0.02, moved
  assert float(np.abs(initial).max()) > 0.1
  assert (workdir / "bounds.json").is_file()


@pytest.fixture(scope="module")
def gelu_converted(open_clip, tmp_path_factory):
  """A tiny GELU (LAION-style) OpenCLIP model, converted."""
  folder = tmp_path_factory.mktemp("gelu")
  cfg = tiny_size_cfg(quick_gelu=False)
  config = folder / "gelu.json"
  config.write_text(json.dumps(cfg))
  checkpoint = folder / "gelu.pt"
  torch.save(openclip_model(open_clip, cfg).state_dict(), checkpoint)
  converted = folder / "converted"
  assert convert.main(["--open-clip", str(config), "--checkpoint",
                       str(checkpoint), "--out", str(converted)]) == 0
  return converted


@pytest.mark.slow
def test_converted_openclip_run_exports_to_the_release_format(openclip_run,
                                                             tmp_path):
  """The round trip of issue 17: OpenCLIP -> convert -> train.py
  --init_from -> export --format release, read back by the release importer
  as exactly the run's params (unmerged LoRA, head, base towers)."""
  assert openclip_run["train"].returncode == 0
  workdir = openclip_run["workdir"]
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["model"]["init_from"] == str(openclip_run["converted"])
  out = tmp_path / "exported"
  assert export.main(["--model", str(workdir), "--out", str(out),
                      "--format", "release"]) == 0
  release = out / "release"
  _, lora, back = convert.hysac_params_from_pytorch(
      release / "hysac_model.pth", release / "clip")
  run = serving.load_model(workdir, merge_lora=False)
  assert (lora.rank, lora.alpha, set(lora.targets)) == (
      run.lora.rank, run.lora.alpha, set(run.lora.targets))
  want = flax_flat(jax.device_get(run.params))
  got = flax_flat(back)
  assert sorted(got) == sorted(want)
  for path in want:
    np.testing.assert_array_equal(got[path], np.asarray(want[path]),
                                  err_msg=str(path))


@pytest.mark.slow
def test_init_from_refuses_a_model_the_run_config_does_not_describe(
    gelu_converted, tmp_path):
  """configs/tiny.py builds QuickGELU towers: GELU weights are refused, not
  run with the wrong activation."""
  out = train_cli(tiny_runs.tiny_cli_flags(tmp_path / "tfds", TRAIN_OVERRIDES)
                  + [f"--workdir={tmp_path / 'run'}",
                     f"--init_from={gelu_converted}"])
  lines = [l for l in out.stderr.splitlines() if l.strip()]
  assert out.returncode == cli.EXIT_ERROR, out.stderr[-3000:]
  assert "Traceback" not in out.stderr
  assert lines[-1].startswith(f"train.py: error: converted model "
                              f"{gelu_converted} does not match")
  assert "text.hidden_act 'gelu' (run: 'quick_gelu')" in lines[-1]
  assert f"--config.model.clip={gelu_converted} builds" in lines[-1]


@pytest.mark.slow
def test_gelu_model_trains_as_config_model_clip_and_evaluates_from_it(
    gelu_converted, tmp_path):
  """`config.model.clip=DIR` builds the run's towers from DIR (GELU here)
  and starts from its weights; with the base frozen (LoRA only), the run's
  evaluation rebuilds the frozen weights from DIR, not from a random init."""
  from hysac_jax.training import loop as loop_lib
  config = tiny_runs.tiny_config(tmp_path / "tfds", {
      **TRAIN_OVERRIDES, "model.clip": str(gelu_converted),
      "model.train_base": False})
  workdir = tmp_path / "run"
  summary = loop_lib.train_and_evaluate(config, workdir)
  assert not summary["preempted"]
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["model"]["clip"] == str(gelu_converted)
  assert pretrained.model_from_config(config).clip.text.hidden_act == "gelu"
  _, state = restore_lib.restore_run(workdir, config=config)
  start = convert.read_converted(gelu_converted)
  params = jax.device_get(state.params)
  frozen = ("clip", "vision_model", "encoder", "layers_1", "mlp", "fc1",
            "kernel")
  lora_b = frozen[:-1] + ("lora_B",)
  get = lambda tree, path: tree if not path else get(tree[path[0]], path[1:])
  np.testing.assert_array_equal(get(params, frozen), get(start.params,
                                                         frozen))
  assert np.abs(get(params, lora_b)).max() > 0  # LoRA B trained from 0


@pytest.mark.parametrize("section,field,value,message", [
    ("vision_cfg", "head_width", 0,
     "vision_cfg.head_width must be a positive integer, got 0"),
    ("text_cfg", "heads", 0, "text_cfg.heads must be a positive integer, "
     "got 0"),
    ("text_cfg", "width", "32", "text_cfg.width must be a positive "
     "integer, got '32'"),
    ("text_cfg", "context_length", 20.0, "text_cfg.context_length must be "
     "a positive integer, got 20.0"),
    ("text_cfg", "layers", -2, "text_cfg.layers must be a positive "
     "integer, got -2"),
    ("vision_cfg", "layers", True, "vision_cfg.layers must be a positive "
     "integer, got True"),
    (None, "embed_dim", "24", "embed_dim must be a positive integer, got "
     "'24'"),
    ("vision_cfg", "norm_kwargs", {"eps": "tiny"},
     "vision_cfg.norm_kwargs.eps must be a positive finite number, got "
     "'tiny'"),
    ("text_cfg", "norm_kwargs", {"eps": float("nan")},
     "text_cfg.norm_kwargs.eps must be a positive finite number, got nan"),
    ("vision_cfg", "mlp_ratio", float("nan"), "vision_cfg.mlp_ratio must "
     "be a positive finite number, got nan"),
    ("text_cfg", "mlp_ratio", float("inf"), "text_cfg.mlp_ratio must be a "
     "positive finite number, got inf"),
    ("text_cfg", "mlp_ratio", -1.0, "text_cfg.mlp_ratio must be a positive "
     "finite number, got -1.0"),
    ("vision_cfg", "mlp_ratio", True, "vision_cfg.mlp_ratio must be a "
     "positive finite number, got True"),
    ("vision_cfg", "mlp_ratio", "4", "vision_cfg.mlp_ratio must be a "
     "positive finite number, got '4'"),
])
def test_config_values_of_the_wrong_type_or_sign_name_the_file_and_field(
    section, field, value, message):
  # These were a ZeroDivisionError, a TypeError, or shape mismatches
  # blamed on the checkpoint.
  cfg = copy.deepcopy(tiny_cfg())
  (cfg[section] if section else cfg)[field] = value
  with pytest.raises(oi.OpenCLIPConfigError) as e:
    oi.config_from_openclip(cfg, "open_clip_config.json")
  assert str(e.value) == f"open_clip_config.json: {message}"
