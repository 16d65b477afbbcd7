"""Flax CLIP towers against the Hugging Face PyTorch CLIP of the same weights.

Parity of the math is checked in float64 on both sides; one float32 check per
tower (ViT-L widths) uses the error-model bound of `tests/numerics.py`.
"""

import copy
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util

from hysac_jax.convert import clip_params_from_hf
from hysac_jax.data.tokenizer import tokenize
from hysac_jax.models import sizes
from hysac_jax.models.clip import (CLIPModel, LoRAConfig, dummy_inputs,
                                   pool_positions)
from numerics import (assert_float32_parity, assert_float64_parity,
                      to_float64, tower_error_terms)


def hf_config(cfg, **text_overrides):
  """A transformers CLIPConfig with the dims of our CLIPConfig."""
  t, v = cfg.text, cfg.vision
  return transformers.CLIPConfig(
      text_config=dict(
          vocab_size=t.vocab_size, hidden_size=t.hidden_size,
          intermediate_size=t.intermediate_size,
          num_hidden_layers=t.num_hidden_layers,
          num_attention_heads=t.num_attention_heads,
          max_position_embeddings=t.max_position_embeddings,
          hidden_act=t.hidden_act, **text_overrides),
      vision_config=dict(
          image_size=v.image_size, patch_size=v.patch_size,
          hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
          num_hidden_layers=v.num_hidden_layers,
          num_attention_heads=v.num_attention_heads, hidden_act=v.hidden_act),
      projection_dim=cfg.projection_dim)


def randomize_(model, seed):
  """Non-trivial weights: HF inits LayerNorm to (1, 0) and biases to 0."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("logit_scale"):
        continue
      p.add_(0.05 * torch.randn(p.shape, generator=gen))


def build_hf(tmp_path_factory, cfg, name, seed=0, hidden_act=None):
  """A random HF CLIPModel saved with save_pretrained; returns (model, dir)."""
  if hidden_act:
    cfg = dataclasses.replace(
        cfg, text=dataclasses.replace(cfg.text, hidden_act=hidden_act),
        vision=dataclasses.replace(cfg.vision, hidden_act=hidden_act))
  torch.manual_seed(seed)
  model = transformers.CLIPModel(hf_config(cfg)).eval()
  randomize_(model, seed)
  path = tmp_path_factory.mktemp(name)
  model.save_pretrained(path)
  return model, path


def torch_text(model, ids):
  with torch.no_grad():
    pooled = model.text_model(input_ids=torch.as_tensor(ids)).pooler_output
    return model.text_projection(pooled).numpy()


def torch_image(model, pixels_nhwc):
  """Pixels are cast to the model's dtype (float32 or float64)."""
  dtype = next(model.parameters()).dtype
  with torch.no_grad():
    px = torch.as_tensor(np.asarray(pixels_nhwc).transpose(0, 3, 1, 2),
                         dtype=dtype)
    pooled = model.vision_model(pixel_values=px).pooler_output
    return model.visual_projection(pooled).numpy()


def ours_f64(config, params, method, inputs, lora=None):
  """Our tower in float64 (params and compute), as a float64 NumPy array."""
  with jax.enable_x64(True):
    out = CLIPModel(config, lora, dtype=jnp.float64).apply(
        {"params": to_float64(params)}, jnp.asarray(inputs), method=method)
    assert out.dtype == jnp.float64
    return np.asarray(out)


def caption_ids():
  """Real tokenizer ids plus an id sequence where the max id is mid-way."""
  ids = tokenize(["a photo of a cat", "two dogs playing in the snow"])
  rng = np.random.default_rng(0)
  rand = rng.integers(1, 49406, size=(1, 77)).astype(np.int32)
  rand[0, 40] = 49407
  return np.concatenate([ids, rand])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(float64 copy of the HF model, our config, our float32 params)."""
  model, path = build_hf(tmp_path_factory, sizes.get_clip_config("tiny"),
                         "tiny_clip")
  config, params = clip_params_from_hf(path)
  return model.double(), config, params


@pytest.fixture(scope="module")
def vitl_widths(tmp_path_factory):
  """ViT-L/14 widths and 224 px input, but 2 layers per tower."""
  base = sizes.get_clip_config("vitl14")
  cfg = dataclasses.replace(
      base, text=dataclasses.replace(base.text, num_hidden_layers=2),
      vision=dataclasses.replace(base.vision, num_hidden_layers=2))
  model, path = build_hf(tmp_path_factory, cfg, "vitl_clip", seed=1)
  config, params = clip_params_from_hf(path)
  return model, config, params


def with_random_lora(params, config, lora, seed):
  """`params` plus LoRA leaves drawn N(0, 0.05²) (non-zero B: LoRA matters)."""
  shapes = jax.eval_shape(CLIPModel(config, lora).init, jax.random.key(0),
                          *dummy_inputs(config))["params"]
  base = traverse_util.flatten_dict(params)
  rng = np.random.default_rng(seed)
  flat = {k: base[k] if k in base else
             (0.05 * rng.normal(size=v.shape)).astype(np.float32)
          for k, v in traverse_util.flatten_dict(shapes).items()}
  return traverse_util.unflatten_dict(flat)


def test_tiny_text_features_match_pytorch_in_float64(tiny):
  model, config, params = tiny
  ids = caption_ids()
  ours = ours_f64(config, params, "encode_text", ids)
  assert ours.shape == (3, 64)
  assert_float64_parity(ours, torch_text(model, ids))


def test_tiny_image_features_match_pytorch_in_float64(tiny):
  model, config, params = tiny
  pixels = np.random.default_rng(1).normal(size=(3, 32, 32, 3))
  ours = ours_f64(config, params, "encode_image", pixels)
  assert ours.shape == (3, 64)
  assert_float64_parity(ours, torch_image(model, pixels))


def test_vitl14_widths_match_pytorch_in_float64(vitl_widths):
  model, config, params = vitl_widths
  model = copy.deepcopy(model).double()
  ids = caption_ids()[:2]
  pixels = np.random.default_rng(2).normal(size=(1, 224, 224, 3))
  assert_float64_parity(ours_f64(config, params, "encode_text", ids),
                        torch_text(model, ids))
  assert_float64_parity(ours_f64(config, params, "encode_image", pixels),
                        torch_image(model, pixels))


def test_vitl14_widths_float32_within_the_error_model(vitl_widths):
  """The one float32 check per tower: what users run, any CPU's rounding."""
  model, config, params = vitl_widths
  assert config.vision.hidden_size == 1024 and config.vision.image_size == 224
  ids = caption_ids()[:2]
  pixels = np.random.default_rng(2).normal(size=(1, 224, 224, 3)).astype(
      np.float32)
  clip = CLIPModel(config)
  text, image = jax.jit(clip.apply)({"params": params}, jnp.asarray(ids),
                                    jnp.asarray(pixels))
  assert text.dtype == image.dtype == jnp.float32
  assert_float32_parity(text, torch_text(model, ids),
                        *tower_error_terms(config, "text"))
  assert_float32_parity(image, torch_image(model, pixels),
                        *tower_error_terms(config, "vision"))


def test_gelu_activation_matches_pytorch_in_float64(tmp_path_factory):
  model, path = build_hf(tmp_path_factory, sizes.get_clip_config("tiny"),
                         "gelu_clip", seed=3, hidden_act="gelu")
  config, params = clip_params_from_hf(path)
  assert config.text.hidden_act == "gelu"
  ids = caption_ids()
  ours = ours_f64(config, params, "encode_text", ids)
  assert_float64_parity(ours, torch_text(model.double(), ids))


def test_eos_token_pooling_matches_pytorch(tiny):
  """A config with a non-legacy eos id pools at its first occurrence."""
  model, config, params = tiny
  eos = 500
  ids = caption_ids()[2:].copy()
  ids[0, 20] = eos  # before the max id (49407 at 40): the two rules differ
  ids[0, 60] = eos
  assert pool_positions(jnp.asarray(ids), eos)[0] == 20
  assert pool_positions(jnp.asarray(ids), 2)[0] == 40
  assert pool_positions(jnp.asarray(ids), None)[0] == 40
  cfg = dataclasses.replace(
      config, text=dataclasses.replace(config.text, eos_token_id=eos))
  ours = ours_f64(cfg, params, "encode_text", ids)
  saved = model.text_model.eos_token_id
  try:
    model.text_model.eos_token_id = eos
    theirs = torch_text(model, ids)
  finally:
    model.text_model.eos_token_id = saved
  assert_float64_parity(ours, theirs)


def test_causal_mask_makes_features_ignore_tokens_after_eot(tiny):
  _, config, params = tiny
  ids = tokenize(["a photo of a cat"])
  other = ids.copy()
  other[0, 10:] = 320  # change only tokens after the end-of-text token
  other[0, 6] = 49407
  clip = CLIPModel(config)
  a = clip.apply({"params": params}, jnp.asarray(ids), method="encode_text")
  b = clip.apply({"params": params}, jnp.asarray(other), method="encode_text")
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bfloat16_compute_keeps_float32_params_and_outputs(tiny):
  _, config, params = tiny
  ids = caption_ids()
  ref = CLIPModel(config).apply({"params": params}, jnp.asarray(ids),
                                method="encode_text")
  clip16 = CLIPModel(config, dtype=jnp.bfloat16)
  out = clip16.apply({"params": params}, jnp.asarray(ids),
                     method="encode_text")
  assert out.dtype == jnp.float32
  rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
  assert 0 < rel < 0.05
  init = jax.eval_shape(clip16.init, jax.random.key(0), jnp.asarray(ids),
                        jnp.zeros((1, 32, 32, 3)))
  assert {x.dtype for x in jax.tree.leaves(init)} == {jnp.dtype("float32")}


def reference_attention(x, p, num_heads, causal):
  """The einsum attention the towers used before jax.nn.dot_product_attention
  (HF's formula), in float64 NumPy: (B, L, D) -> (B, L, D), before out_proj.

  Returns (output, logits) so that callers can bound rounding errors.
  """
  b, l, d = x.shape
  hd = d // num_heads

  def heads(name):
    y = x @ p[name]["kernel"] + p[name]["bias"]
    return y.reshape(b, l, num_heads, hd).transpose(0, 2, 1, 3)

  q, k, v = heads("q_proj") * hd**-0.5, heads("k_proj"), heads("v_proj")
  logits = np.einsum("bhqd,bhkd->bhqk", q, k)
  if causal:  # the old additive bias: float32's lowest value above i
    logits = logits + np.where(np.tril(np.ones((l, l), bool)), 0.0,
                               np.finfo(np.float32).min)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  out = np.einsum("bhqk,bhkd->bhqd", probs, v)
  return out.transpose(0, 2, 1, 3).reshape(b, l, d), logits, v


@pytest.mark.parametrize("causal,length", [(True, 77), (False, 50)])
def test_fused_attention_matches_the_einsum_formula_in_float64(causal,
                                                               length):
  from hysac_jax.models.clip import Attention
  d, h = 32, 4
  rng = np.random.default_rng(6)
  x = rng.normal(size=(2, length, d))
  with jax.enable_x64(True):
    module = Attention(d, h, dtype=jnp.float64, causal=causal,
                       implementation="xla")
    p = {name: {"kernel": rng.normal(size=(d, d)) / math.sqrt(d) * 2,
                "bias": 0.1 * rng.normal(size=(d,))}
         for name in ("q_proj", "k_proj", "v_proj")}
    # out_proj = identity: the module's output is the attention itself.
    p["out_proj"] = {"kernel": np.eye(d), "bias": np.zeros(d)}
    got = np.asarray(module.apply({"params": p}, jnp.asarray(x)))
    assert got.dtype == np.float64
  want, logits, v = reference_attention(x, p, h, causal)
  # jax's XLA path rounds the logits to float32 and takes the softmax in
  # float32 (also for float64 inputs): each probability then carries a
  # relative error below (2 max|logit| + L) * 2^-24, and the output an
  # absolute error below that times max|v|. A wrong mask or head layout
  # errs by O(1).
  finite = logits[logits > -1e30]
  bound = (2 * np.abs(finite).max() + length) * 2.0**-24 * np.abs(v).max()
  err = np.abs(got - want).max()
  assert err <= bound, (err, bound)
  assert err < 1e-4 * np.abs(want).max()
  if causal:  # the first token sees only itself: its value row, exactly
    np.testing.assert_allclose(got[:, 0], (x @ p["v_proj"]["kernel"]
                                           + p["v_proj"]["bias"])[:, 0],
                               rtol=1e-12, atol=1e-12)


def test_attention_implementation_is_cudnn_only_on_gpu_with_half_precision():
  from hysac_jax.models.clip import attention_implementation as impl
  assert impl("auto", jnp.bfloat16, 64, backend="gpu") == "cudnn"
  assert impl(None, jnp.float16, 64, backend="cuda") == "cudnn"
  assert impl("auto", jnp.float32, 64, backend="gpu") == "xla"
  assert impl("auto", jnp.bfloat16, 256, backend="gpu") == "xla"
  assert impl("auto", jnp.bfloat16, 64, backend="cpu") == "einsum"
  assert impl("auto", jnp.float32, 64, backend="cpu") == "einsum"
  assert impl("auto", jnp.bfloat16, 64, backend="tpu") == "xla"
  assert impl("cudnn", jnp.float32, 64, backend="cpu") == "cudnn"
  with pytest.raises(ValueError, match="config.model.attention"):
    impl("flash", jnp.bfloat16, 64)


def test_remat_policies_give_identical_features_and_gradients(tiny):
  """float64, LoRA dropout on, both towers (the text one causal)."""
  _, config, params = tiny
  rng = np.random.default_rng(4)
  pixels = rng.normal(size=(2, 32, 32, 3))
  ids = caption_ids()
  lora = LoRAConfig(rank=2, dropout=0.1)
  full = with_random_lora(params, config, lora, seed=5)
  rngs = {"dropout": jax.random.key(7)}
  results = {}
  with jax.enable_x64(True):
    variables = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64),
                             {"params": full})

    def loss(p, remat):
      text, image = CLIPModel(config, lora, dtype=jnp.float64,
                              remat=remat).apply(
          p, jnp.asarray(ids), jnp.asarray(pixels), deterministic=False,
          rngs=rngs)
      return jnp.sum(image**2) + jnp.sum(jnp.sin(text))

    grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    for policy in ("none", "dots_saveable", "full"):
      value, g = grad(variables, policy)
      results[policy] = (float(value), jax.tree.map(np.asarray, g))
  v0, g0 = results["none"]
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(g0))
  for policy in ("dots_saveable", "full"):
    v1, g1 = results[policy]
    np.testing.assert_allclose(v1, v0, rtol=1e-12)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
      assert a.dtype == np.float64
      np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-14)
  with pytest.raises(ValueError, match="config.model.remat"):
    CLIPModel(config, lora, remat="some").apply(
        {"params": full}, jnp.asarray(ids), method="encode_text")


def test_wrong_image_size_is_refused(tiny):
  _, config, params = tiny
  with pytest.raises(ValueError, match=r"\(B, 32, 32, 3\) NHWC"):
    CLIPModel(config).apply({"params": params}, jnp.zeros((1, 3, 32, 32)),
                            method="encode_image")


def test_named_sizes_match_openai_dims():
  b32 = sizes.get_clip_config("vitb32")
  hf_default = sizes.clip_config_from_hf(transformers.CLIPConfig().to_dict())
  # transformers' CLIPConfig defaults are OpenAI's ViT-B/32.
  assert b32.vision == hf_default.vision
  assert b32.projection_dim == hf_default.projection_dim
  assert dataclasses.replace(b32.text, eos_token_id=49407) == hf_default.text
  l14 = sizes.get_clip_config("vitl14")
  assert (l14.vision.hidden_size, l14.vision.num_hidden_layers,
          l14.vision.num_attention_heads, l14.vision.patch_size) == (
              1024, 24, 16, 14)
  assert (l14.text.hidden_size, l14.text.num_hidden_layers,
          l14.projection_dim) == (768, 12, 768)
  assert sizes.get_clip_config("vitl14_336").vision.image_size == 336
  assert sizes.get_clip_config("vitb16").vision.patch_size == 16
  with pytest.raises(ValueError, match="unknown CLIP size 'vit_huge'"):
    sizes.get_clip_config("vit_huge")


def test_clip_config_from_hf_reads_legacy_eos_and_refuses_non_clip():
  cfg = sizes.clip_config_from_hf({
      "text_config": {"eos_token_id": 2, "hidden_size": 768},
      "vision_config": {"patch_size": 14}, "projection_dim": 768})
  assert cfg.text.eos_token_id == 2 and cfg.text.hidden_size == 768
  assert cfg.vision.patch_size == 14 and cfg.projection_dim == 768
  with pytest.raises(ValueError, match="bert.json is not a Hugging Face "
                     "CLIPModel config"):
    sizes.clip_config_from_hf({"model_type": "bert"}, source="bert.json")
  with pytest.raises(TypeError, match="expected a dict or a path"):
    sizes.clip_config_from_hf(["text_config"])


def test_clip_config_from_hf_of_a_path_warns_and_still_reads(tmp_path):
  (tmp_path / "config.json").write_text(
      '{"text_config": {}, "vision_config": {"patch_size": 14}}')
  with pytest.warns(DeprecationWarning, match="hf_clip.read_clip_config"):
    cfg = sizes.clip_config_from_hf(tmp_path)
  assert cfg.vision.patch_size == 14
  (tmp_path / "config.json").write_text('{"model_type": "bert"}')
  with pytest.warns(DeprecationWarning), pytest.raises(
      ValueError, match="config.json is not a Hugging Face CLIPModel config"):
    sizes.clip_config_from_hf(tmp_path / "config.json")
