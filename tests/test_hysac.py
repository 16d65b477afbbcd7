"""Tests of hysac_jax.models.hysac: head scalars, clamps, lifting, modes."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hysac_jax import config as config_lib
from hysac_jax import losses
from hysac_jax.training import step as step_lib
from hysac_jax.models import clip as clip_lib
from hysac_jax.models import hysac as hysac_lib
from hysac_jax.models import sizes

CLIP = sizes.get_clip_config("tiny")
LORA = clip_lib.LoRAConfig()


def make_model(**kwargs):
  return hysac_lib.HySAC(clip=CLIP, lora=LORA, **kwargs)


@pytest.fixture(scope="module")
def params():
  # train_lib caches the jitted init per model: shared with test_train_lib.
  return jax.device_get(step_lib.init_model_params(make_model(),
                                                    jax.random.key(0)))


@pytest.fixture(scope="module")
def inputs():
  rng = np.random.default_rng(0)
  pixels = rng.normal(size=(3, 32, 32, 3)).astype(np.float32)
  ids = rng.integers(1, 1000, size=(3, 77)).astype(np.int32)
  ids[:, 9] = 49407
  return pixels, ids


def clip_features(params, pixels, ids):
  towers = clip_lib.CLIPModel(CLIP, LORA)
  variables = {"params": params["clip"]}
  image = towers.apply(variables, pixels, method=towers.encode_image)
  text = towers.apply(variables, ids, method=towers.encode_text)
  return np.float64(image), np.float64(text)


def np_exp_map0(v, c):
  """SPEC §1: sinh's argument clamped to asinh(2^15)."""
  r = np.sqrt(c) * np.linalg.norm(v, axis=-1, keepdims=True)
  return np.sinh(np.minimum(r, np.arcsinh(2.0**15))) * v / r


def test_params_are_clip_towers_plus_four_head_scalars_at_their_inits(params):
  assert set(params) == {"clip", *hysac_lib.HEAD_NAMES}
  assert {"text_model", "vision_model", "text_projection",
          "visual_projection"} <= set(params["clip"])
  for name in hysac_lib.HEAD_NAMES:
    assert params[name].shape == () and params[name].dtype == np.float32
  np.testing.assert_allclose(params["log_curv"], 0.0)
  np.testing.assert_allclose(params["log_alpha_image"],
                             math.log(CLIP.projection_dim**-0.5), rtol=1e-6)
  np.testing.assert_allclose(params["log_alpha_text"],
                             math.log(CLIP.projection_dim**-0.5), rtol=1e-6)
  np.testing.assert_allclose(params["log_logit_scale"], math.log(1 / 0.07),
                             rtol=1e-6)


def test_curvature_init_sets_its_value_and_range():
  model = make_model(curv_init=2.0)
  abstract = jax.eval_shape(
      lambda: model.init(jax.random.key(0), None,
                         jnp.zeros((1, 77), jnp.int32))["params"])
  assert "log_curv" in abstract
  bounds = hysac_lib.head_bounds(2.0)
  np.testing.assert_allclose(bounds["log_curv"],
                             (math.log(0.2), math.log(20.0)))
  head = {"log_curv": jnp.float32(math.log(2.0)),
          "log_alpha_image": jnp.float32(0.0),
          "log_alpha_text": jnp.float32(0.0),
          "log_logit_scale": jnp.float32(0.0)}
  np.testing.assert_allclose(hysac_lib.head_scalars(head, 2.0)["curv"], 2.0,
                             rtol=1e-6)


def test_head_scalars_clamp_to_the_release_ranges():
  high = {"log_curv": 9.0, "log_alpha_image": 2.0, "log_alpha_text": 0.5,
          "log_logit_scale": 9.0}
  low = {"log_curv": -9.0, "log_alpha_image": -3.0, "log_alpha_text": -40.0,
         "log_logit_scale": 0.0}
  hi = hysac_lib.head_scalars(high)
  lo = hysac_lib.head_scalars(low)
  np.testing.assert_allclose(
      [hi["curv"], hi["alpha_image"], hi["alpha_text"], hi["logit_scale"]],
      [10.0, 1.0, 1.0, 100.0], rtol=1e-5)
  np.testing.assert_allclose(
      [lo["curv"], lo["alpha_image"], lo["alpha_text"], lo["logit_scale"]],
      [0.1, math.exp(-3.0), math.exp(-40.0), 1 / 0.07], rtol=1e-5)


def test_clamp_passes_the_gradient_on_the_bounds_and_blocks_it_outside():
  def scale(v):
    return hysac_lib.head_scalars({"log_curv": 0.0, "log_alpha_image": 0.0,
                                   "log_alpha_text": 0.0,
                                   "log_logit_scale": v})["logit_scale"]

  at_bound = jnp.float32(math.log(1 / 0.07))  # the initial value
  np.testing.assert_allclose(jax.grad(scale)(at_bound), 1 / 0.07, rtol=1e-5)
  assert float(jax.grad(scale)(jnp.float32(1.0))) == 0.0
  assert float(jax.grad(scale)(jnp.float32(8.0))) == 0.0


def test_project_head_clips_stored_values_and_leaves_the_rest():
  tree = {"log_curv": jnp.float32(5.0), "log_alpha_text": jnp.float32(0.3),
          "log_logit_scale": jnp.float32(-1.0), "clip": {"w": jnp.ones(2)}}
  out = hysac_lib.project_head(tree)
  np.testing.assert_allclose(out["log_curv"], math.log(10.0), rtol=1e-6)
  assert float(out["log_alpha_text"]) == 0.0
  np.testing.assert_allclose(out["log_logit_scale"], math.log(1 / 0.07),
                             rtol=1e-6)
  assert out["clip"] is tree["clip"]


def test_encoders_lift_clip_features_with_the_clamped_head(params, inputs):
  pixels, ids = inputs
  params = dict(params, log_curv=np.float32(0.4),
                log_alpha_image=np.float32(-1.3),
                log_alpha_text=np.float32(0.7))  # clamped to alpha = 1
  model = make_model()
  image = model.apply({"params": params}, pixels, method=model.encode_image)
  text = model.apply({"params": params}, ids, method=model.encode_text)
  f_image, f_text = clip_features(params, pixels, ids)
  c = math.exp(0.4)
  np.testing.assert_allclose(image, np_exp_map0(math.exp(-1.3) * f_image, c),
                             rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(text, np_exp_map0(1.0 * f_text, c), rtol=2e-5,
                             atol=1e-6)
  both = model.apply({"params": params}, pixels, ids)
  np.testing.assert_array_equal(both[0], image)
  np.testing.assert_array_equal(both[1], text)


def test_euc_mode_gives_unit_clip_features(params, inputs):
  pixels, ids = inputs
  model = make_model(mode="euc")
  image, text = model.apply({"params": params}, pixels, ids)
  f_image, f_text = clip_features(params, pixels, ids)
  np.testing.assert_allclose(
      image, f_image / np.linalg.norm(f_image, axis=-1, keepdims=True),
      rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      text, f_text / np.linalg.norm(f_text, axis=-1, keepdims=True),
      rtol=1e-5, atol=1e-6)


def test_unknown_mode_names_the_config_field(params, inputs):
  with pytest.raises(ValueError, match="config.model.mode"):
    make_model(mode="sphere").apply({"params": params}, inputs[0],
                                    method="encode_image")


def test_loss_gradient_wrt_the_four_log_scalars_matches_finite_differences():
  """Float64: features -> lift with the head -> HySAC loss -> total."""
  rng = np.random.default_rng(3)
  feats = [rng.normal(size=(5, 6)) for _ in range(4)]  # S, U, V, G features
  config = config_lib.base_config().loss  # weights 1, global negatives
  with jax.enable_x64(True):
    def total(head):
      s = hysac_lib.head_scalars(head)
      S, U = (hysac_lib.lift(f, s["alpha_text"], s["curv"]) for f in feats[:2])
      V, G = (hysac_lib.lift(f, s["alpha_image"], s["curv"])
              for f in feats[2:])
      return losses.hysac_loss(S, U, V, G, s["curv"], s["logit_scale"],
                               config)[0]

    # Interior values (the clamps are flat outside, kinked on the bounds).
    head = {"log_curv": jnp.float64(0.3), "log_alpha_image": jnp.float64(-0.9),
            "log_alpha_text": jnp.float64(-0.6),
            "log_logit_scale": jnp.float64(math.log(20.0))}
    grads = jax.jit(jax.grad(total))(head)
    total_jit = jax.jit(total)
    h = 1e-6
    for name in hysac_lib.HEAD_NAMES:
      up = float(total_jit(dict(head, **{name: head[name] + h})))
      down = float(total_jit(dict(head, **{name: head[name] - h})))
      fd = (up - down) / (2 * h)
      assert abs(fd) > 1e-6, name  # each scalar matters to the loss
      np.testing.assert_allclose(float(grads[name]), fd, rtol=1e-5,
                                 atol=1e-9, err_msg=name)
