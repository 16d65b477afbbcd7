"""LoRA layers: parity with peft, merging, the custom backward, dropout, init."""

import copy
import math

import jax
import jax.test_util  # pylint: disable=unused-import  (check_grads)
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

from hysac_jax.convert import hysac_params_from_pytorch
from hysac_jax.models import clip as clip_lib
from hysac_jax.models import lora as lora_lib
from hysac_jax.models import sizes
from hysac_jax.models.clip import CLIPModel, LoRAConfig, dummy_inputs
from numerics import (assert_float32_parity, assert_float64_parity,
                      to_float64)

TARGETS = ["k_proj", "v_proj", "out_proj", "fc1", "fc2", "patch_embedding"]


def release_lora_config(r=4):
  """The HySAC release's LoraConfig, at rank r."""
  return peft.LoraConfig(r=r, lora_alpha=1, target_modules=TARGETS,
                         lora_dropout=0.1, bias="none")


@pytest.fixture(scope="module")
def peft_towers():
  """Tiny peft-wrapped HF towers with random non-zero LoRA weights.

  Returns (text_peft, vision_peft, CLIPConfig, our converted params).
  """
  cfg = sizes.get_clip_config("tiny")
  t, v = cfg.text, cfg.vision
  torch.manual_seed(0)
  text = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
      vocab_size=t.vocab_size, hidden_size=t.hidden_size,
      intermediate_size=t.intermediate_size,
      num_hidden_layers=t.num_hidden_layers,
      num_attention_heads=t.num_attention_heads,
      max_position_embeddings=t.max_position_embeddings,
      projection_dim=cfg.projection_dim))
  vision = transformers.CLIPVisionModelWithProjection(
      transformers.CLIPVisionConfig(
          image_size=v.image_size, patch_size=v.patch_size,
          hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
          num_hidden_layers=v.num_hidden_layers,
          num_attention_heads=v.num_attention_heads,
          projection_dim=cfg.projection_dim))
  text = peft.get_peft_model(text, release_lora_config()).eval()
  vision = peft.get_peft_model(vision, release_lora_config()).eval()
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for model in (text, vision):
      for name, p in model.named_parameters():
        if "lora_" in name:  # peft inits B to zero: make LoRA matter
          p.copy_(0.3 * torch.randn(p.shape, generator=gen))
  state = {f"textual.{k}": x for k, x in text.state_dict().items()}
  state.update({f"visual.{k}": x for k, x in vision.state_dict().items()})
  state.update({k: torch.tensor(0.0) for k in ("curv", "visual_alpha",
                                               "textual_alpha",
                                               "logit_scale")})
  config, lora, params = hysac_params_from_pytorch(state, cfg)
  assert lora == LoRAConfig(rank=4, alpha=1.0, dropout=0.1,
                            targets=tuple(TARGETS))
  return text, vision, config, params["clip"]


def inputs():
  rng = np.random.default_rng(0)
  ids = rng.integers(1, 49406, size=(2, 77)).astype(np.int32)
  ids[:, 30] = 49407
  pixels = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
  return ids, pixels


def peft_features(text, vision, ids, pixels):
  """(text, image) embeddings of the peft towers, in float64."""
  text, vision = copy.deepcopy(text).double(), copy.deepcopy(vision).double()
  with torch.no_grad():
    t = text(input_ids=torch.as_tensor(ids)).text_embeds.numpy()
    px = torch.as_tensor(pixels.transpose(0, 3, 1, 2), dtype=torch.float64)
    v = vision(pixel_values=px).image_embeds.numpy()
  return t, v


def ours_f64(config, lora, params, ids, pixels):
  """Both our towers in float64."""
  with jax.enable_x64(True):
    t, v = CLIPModel(config, lora, dtype=jnp.float64).apply(
        {"params": to_float64(params)}, ids, pixels)
    return np.asarray(t), np.asarray(v)


def test_lora_forward_matches_peft_in_float64(peft_towers):
  text, vision, config, params = peft_towers
  ids, pixels = inputs()
  want_t, want_v = peft_features(text, vision, ids, pixels)
  with text.disable_adapter(), vision.disable_adapter():
    base_t, base_v = peft_features(text, vision, ids, pixels)
  # The LoRA weights change the outputs well beyond the tolerance.
  assert np.abs(want_t - base_t).max() > 1e-2
  assert np.abs(want_v - base_v).max() > 1e-2
  got_t, got_v = ours_f64(config, LoRAConfig(rank=4, alpha=1.0, dropout=0.1),
                          params, ids, pixels)
  assert_float64_parity(got_t, want_t)
  assert_float64_parity(got_v, want_v)


def test_merge_lora_matches_peft_in_float64_and_drops_lora_leaves(
    peft_towers):
  text, vision, config, params = peft_towers
  ids, pixels = inputs()
  want_t, want_v = peft_features(text, vision, ids, pixels)
  with jax.enable_x64(True):
    merged = lora_lib.merge_lora(to_float64(params),
                                 LoRAConfig(rank=4, alpha=1.0))
  plain = jax.eval_shape(CLIPModel(config).init, jax.random.key(0),
                         *dummy_inputs(config))["params"]
  assert (jax.tree.structure(merged) == jax.tree.structure(plain))
  got_t, got_v = ours_f64(config, None, merged, ids, pixels)
  assert_float64_parity(got_t, want_t)
  assert_float64_parity(got_v, want_v)


def test_merge_lora_refuses_a_rank_mismatch(peft_towers):
  *_, params = peft_towers
  with pytest.raises(ValueError, match="rank mismatch at text_model/encoder/layers_0"):
    lora_lib.merge_lora(params, LoRAConfig(rank=8))


@pytest.mark.parametrize("with_mask", [False, True])
def test_lora_dense_custom_backward_matches_autodiff_in_float64(with_mask):
  rng = np.random.default_rng(0)
  keep = jnp.asarray(rng.random((37, 12)) > 0.3) if with_mask else None
  scale = 0.7

  def reference(x, w, a, b):  # plain expression, differentiated by JAX
    xm = x if keep is None else x * keep
    return x @ w + scale * (xm @ a) @ b

  ours = lambda x, w, a, b: lora_lib.lora_dense(x, w, a, b, scale, keep)
  with jax.enable_x64(True):
    x, w, a, b, g = (jnp.asarray(rng.normal(size=s), jnp.float64)
                     for s in ((37, 12), (12, 9), (12, 3), (3, 9), (37, 9)))
    y, vjp = jax.vjp(ours, x, w, a, b)
    y_ref, vjp_ref = jax.vjp(reference, x, w, a, b)
    assert_float64_parity(np.asarray(y), np.asarray(y_ref))
    for got, want in zip(vjp(g), vjp_ref(g)):
      assert_float64_parity(np.asarray(got), np.asarray(want))


def test_lora_dense_gradient_matches_finite_differences():
  rng = np.random.default_rng(1)
  with jax.enable_x64(True):
    x = jnp.asarray(rng.normal(size=(5, 4)))
    w = jnp.asarray(rng.normal(size=(4, 3)))
    a = jnp.asarray(rng.normal(size=(4, 2)))
    b = jnp.asarray(rng.normal(size=(2, 3)))
    keep = jnp.asarray(rng.random((5, 4)) > 0.5)
    jax.test_util.check_grads(
        lambda x, w, a, b: lora_lib.lora_dense(x, w, a, b, 0.25, keep),
        (x, w, a, b), order=1, modes=["rev"], eps=1e-6, atol=1e-7,
        rtol=1e-7)


def test_dropout_mask_drops_exactly_26_of_256():
  assert lora_lib.keep_probability(0.1) == 230 / 256
  assert lora_lib.keep_probability(0.0) == 1.0
  n = 1 << 20
  keep = lora_lib.dropout_keep_mask(jax.random.key(0), (n,), 0.1)
  p = 230 / 256
  assert abs(float(keep.mean()) - p) < 5 * math.sqrt(p * (1 - p) / n)
  with pytest.raises(ValueError, match="dropout rate"):
    lora_lib.dropout_keep_mask(jax.random.key(0), (4,), 1.0)


def test_one_draw_gives_each_input_its_own_independent_mask():
  """`keep_masks` slices one draw into per-input masks: each at the exact
  rate, independent of the others (agreement p² + (1-p)²), widths that are
  not a multiple of four included."""
  rows, widths = 4096, {"k_proj": 64, "v_proj": 64, "fc2": 258}
  masks = lora_lib.keep_masks(jax.random.key(3), rows, widths, 0.1)
  assert {k: m.shape for k, m in masks.items()} == {
      k: (rows, w) for k, w in widths.items()}
  p = 230 / 256
  for m in masks.values():
    n = m.size
    assert abs(float(m.mean()) - p) < 5 * math.sqrt(p * (1 - p) / n)
  k, v = np.asarray(masks["k_proj"]), np.asarray(masks["v_proj"])
  agree, want = float((k == v).mean()), p * p + (1 - p) * (1 - p)
  assert abs(agree - want) < 5 * math.sqrt(want * (1 - want) / k.size)
  # The one-input draw is the same function.
  one = lora_lib.dropout_keep_mask(jax.random.key(3), (8, 16, 64), 0.1)
  np.testing.assert_array_equal(
      one, lora_lib.keep_masks(jax.random.key(3), 128, {"x": 64}, 0.1)[
          "x"].reshape(8, 16, 64))


def test_an_encoder_layer_hands_every_lora_target_its_own_mask(monkeypatch):
  """Dropout on: the layer draws once and each targeted dense layer gets
  its own (N, in) mask; off (deterministic) none gets one."""
  seen = {}
  real = lora_lib.lora_dense

  def recording(x, kernel, a, b, scale, keep):
    seen[(x.shape, kernel.shape[1], len(seen))] = keep
    return real(x, kernel, a, b, scale, keep)

  monkeypatch.setattr(lora_lib, "lora_dense", recording)
  lora = clip_lib.LoRAConfig(rank=2, dropout=0.1)
  layer = clip_lib.EncoderLayer(16, 64, 2, "quick_gelu", 1e-5, lora)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 16)),
                  jnp.float32)
  params = layer.init(jax.random.key(0), x)
  seen.clear()
  layer.apply(params, x, deterministic=False,
              rngs={"dropout": jax.random.key(1)})
  masks = [np.asarray(m) for m in seen.values()]
  targets = [t for t in clip_lib.LAYER_LORA_SITES if t in lora.targets]
  assert len(masks) == len(targets)
  assert all(m.dtype == bool and m.shape[0] == 10 for m in masks)
  assert sorted(m.shape[1] for m in masks) == sorted(
      64 if t == "fc2" else 16 for t in targets)
  same_width = [m for m in masks if m.shape[1] == 16]
  assert all(not np.array_equal(a, b) for i, a in enumerate(same_width)
             for b in same_width[i + 1:])
  seen.clear()
  layer.apply(params, x)
  assert all(m is None for m in seen.values())


def test_lora_dropout_preserves_the_expectation_and_needs_an_rng():
  layer = lora_lib.LoRADense(6, rank=2, alpha=2.0, dropout=0.5)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 5)), jnp.float32)
  params = layer.init(jax.random.key(0), x)["params"]
  params["lora_B"] = jnp.ones_like(params["lora_B"])
  det = layer.apply({"params": params}, x)

  def noisy(key):
    return layer.apply({"params": params}, x, deterministic=False,
                       rngs={"dropout": key})

  draws = jax.jit(jax.vmap(noisy))(jax.random.split(jax.random.key(1), 2000))
  assert not np.allclose(draws[0], det)
  sem = draws.std(0) / math.sqrt(draws.shape[0])
  np.testing.assert_array_less(np.abs(draws.mean(0) - det), 5 * sem + 1e-6)
  with pytest.raises(Exception, match="dropout"):
    layer.apply({"params": params}, x, deterministic=False)


@pytest.mark.parametrize("kind", ["dense", "patch_conv"])
def test_init_b_is_zero_so_lora_layer_equals_base_layer(kind):
  rng = np.random.default_rng(0)
  if kind == "dense":
    make = lambda r: lora_lib.LoRADense(48, rank=r, dropout=0.1)
    x = jnp.asarray(rng.normal(size=(2, 7, 96)), jnp.float32)
    fan_in, a_shape, b_shape = 96, (96, 4), (4, 48)
  else:
    make = lambda r: lora_lib.LoRAPatchConv(48, patch=8, rank=r, dropout=0.1)
    x = jnp.asarray(rng.normal(size=(2, 32, 32, 3)), jnp.float32)
    # peft's conv A is (r, C, p, p): fan_in = C * p * p.
    fan_in, a_shape, b_shape = 8 * 8 * 3, (8, 8, 3, 4), (1, 1, 4, 48)
  params = make(4).init(jax.random.key(0), x)["params"]
  a, b = params["lora_A"], params["lora_B"]
  assert a.shape == a_shape and b.shape == b_shape
  assert not np.any(b)
  # peft: kaiming_uniform_(a=sqrt(5)) -> U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
  bound = 1 / math.sqrt(fan_in)
  assert bound * 0.9 < np.abs(a).max() <= bound
  assert abs(float(a.mean())) < 0.1 * bound
  with_lora = make(4).apply({"params": params}, x, deterministic=False,
                            rngs={"dropout": jax.random.key(1)})
  base = {k: v for k, v in params.items() if not k.startswith("lora_")}
  # B = 0 adds exact zeros, but the fused [x | s·h] @ [W ; B] matmul has a
  # longer reduction (K + r), which a CPU may block and round differently.
  assert_float32_parity(with_lora, make(0).apply({"params": base}, x),
                        reduction=fan_in + 4, depth=1)


def test_patch_conv_equals_a_strided_convolution():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 36, 36, 3)), jnp.float32)  # 36 = 4*8+4
  layer = lora_lib.LoRAPatchConv(16, patch=8)
  params = layer.init(jax.random.key(0), x)["params"]
  want = jax.lax.conv_general_dilated(
      x, params["kernel"], (8, 8), "VALID",
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=jax.lax.Precision.HIGHEST)
  got = layer.apply({"params": params}, x)
  assert got.shape == (2, 4, 4, 16)
  assert_float32_parity(got, want, reduction=8 * 8 * 3, depth=1)
