"""Scanned tower layers (`config.model.scan_layers`, models/clip.py `Encoder`):
the same model as the unrolled stack, in every layout a run, a conversion and
an export meet."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import tiny
from hysac_jax import config as config_lib
from hysac_jax import convert
from hysac_jax import export
from hysac_jax import pretrained
from hysac_jax import serving
from hysac_jax.models import clip as clip_lib
from hysac_jax.models import lora as lora_lib
from hysac_jax.models import sizes
from hysac_jax.training import restore as restore_lib
from hysac_jax.training import step as step_lib
from numerics import assert_float32_parity, tower_error_terms
import tiny_runs

HEAD = {"log_curv": math.log(0.7), "log_alpha_image": math.log(0.2),
        "log_alpha_text": math.log(0.15), "log_logit_scale": math.log(20.0)}


def flat(tree):
  return traverse_util.flatten_dict(jax.device_get(tree))


def assert_trees_equal(a, b):
  fa, fb = flat(a), flat(b)
  assert sorted(fa) == sorted(fb)
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]),
                                  err_msg="/".join(k))


def tiny_config(scan, rank=4):
  c = tiny.get_config()
  c.model.lora.rank = rank
  c.model.scan_layers = scan
  return c


@pytest.fixture(scope="module")
def unrolled_params():
  """Random float32 CLIP params of the tiny towers with LoRA leaves whose A
  and B are both non-zero (so that LoRA changes the features)."""
  config = sizes.get_clip_config("tiny")
  lora = clip_lib.LoRAConfig(rank=2, dropout=0.1)
  shapes = jax.eval_shape(clip_lib.CLIPModel(config, lora).init,
                          jax.random.key(0),
                          *clip_lib.dummy_inputs(config))["params"]
  rng = np.random.default_rng(3)
  leaves = {k: (0.05 * rng.normal(size=v.shape)).astype(np.float32)
            for k, v in traverse_util.flatten_dict(shapes).items()}
  return config, lora, traverse_util.unflatten_dict(leaves)


def test_stacking_adds_a_leading_layer_axis_and_round_trips_exactly(
    unrolled_params):
  config, lora, params = unrolled_params
  stacked = clip_lib.stack_layers(params)
  enc = stacked["vision_model"]["encoder"]
  assert list(enc) == ["layers"]
  depth = config.vision.num_hidden_layers
  k = enc["layers"]["self_attn"]["k_proj"]
  assert k["kernel"].shape == (depth,) + params["vision_model"]["encoder"][
      "layers_0"]["self_attn"]["k_proj"]["kernel"].shape
  np.testing.assert_array_equal(
      k["lora_A"][1],
      params["vision_model"]["encoder"]["layers_1"]["self_attn"]["k_proj"][
          "lora_A"])
  # The scanned model's own param tree has exactly these shapes.
  want = jax.eval_shape(
      clip_lib.CLIPModel(config, lora, scan=True).init, jax.random.key(0),
      *clip_lib.dummy_inputs(config))["params"]
  assert ({k: v.shape for k, v in traverse_util.flatten_dict(want).items()}
          == {k: v.shape for k, v in flat(stacked).items()})
  assert clip_lib.is_scanned(stacked) and not clip_lib.is_scanned(params)
  assert_trees_equal(clip_lib.unstack_layers(stacked), params)
  # Each is idempotent on its own layout.
  assert_trees_equal(clip_lib.stack_layers(stacked), stacked)
  assert_trees_equal(clip_lib.unstack_layers(params), params)


def test_stacking_refuses_gaps_and_mismatched_layers(unrolled_params):
  _, _, params = unrolled_params
  text = dict(params["text_model"]["encoder"])
  gap = {"layers_0": text["layers_0"], "layers_2": text["layers_1"]}
  with pytest.raises(ValueError, match=r"not numbered 0..n-1: \[0, 2\]"):
    clip_lib.stack_layers({"encoder": gap})
  odd = dict(text["layers_1"])
  odd.pop("layer_norm1")
  with pytest.raises(ValueError, match="layers_1 holds other leaves"):
    clip_lib.stack_layers({"encoder": {"layers_0": text["layers_0"],
                                       "layers_1": odd}})


def test_scanned_towers_equal_unrolled_in_float64_forward_and_lora_grads(
    unrolled_params):
  """Both towers (the text one causal), every remat policy: features and
  the gradients of every LoRA leaf agree to 1e-12."""
  config, lora, params = unrolled_params
  rng = np.random.default_rng(4)
  pixels = jnp.asarray(rng.normal(size=(2, 32, 32, 3)))
  ids = jnp.asarray(tiny_runs.random_inputs(3)[0])

  def loss_and_grads(scan, remat):
    p = clip_lib.stack_layers(params) if scan else params
    p = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), p)
    model = clip_lib.CLIPModel(config, lora, dtype=jnp.float64, remat=remat,
                               scan=scan)

    def loss(q):
      text, image = model.apply({"params": q}, ids, pixels)
      return jnp.sum(image**2) + jnp.sum(jnp.sin(text)), (text, image)

    (value, feats), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(p)
    g = clip_lib.unstack_layers(jax.device_get(g))
    return float(value), jax.device_get(feats), flat(g)

  with jax.enable_x64(True):
    for remat in ("none", "full"):
      v0, f0, g0 = loss_and_grads(False, remat)
      v1, f1, g1 = loss_and_grads(True, remat)
      np.testing.assert_allclose(v1, v0, rtol=1e-12)
      for a, b in zip(f0, f1):
        assert a.dtype == np.float64
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-14)
      lora_keys = [k for k in g0 if k[-1] in step_lib.LORA_NAMES]
      assert lora_keys and sorted(g0) == sorted(g1)
      for k in lora_keys:
        assert np.abs(g0[k]).max() > 0, k
        np.testing.assert_allclose(g1[k], g0[k], rtol=1e-12, atol=1e-14,
                                   err_msg="/".join(k))


def test_scanned_layers_draw_a_different_dropout_key_per_layer(
    monkeypatch, unrolled_params):
  """Every layer of the scanned towers draws its LoRA dropout masks (one
  draw for all its targets) from its own key: were the dropout stream not
  split over the scan, all layers would share their masks."""
  config, lora, params = unrolled_params
  seen = []
  real = lora_lib.keep_masks

  def recording(rng, rows, widths, rate):
    jax.debug.callback(lambda k: seen.append(tuple(np.ravel(k))),
                       jax.random.key_data(rng))
    return real(rng, rows, widths, rate)

  monkeypatch.setattr(lora_lib, "keep_masks", recording)
  model = clip_lib.CLIPModel(config, lora, scan=True)
  ids = jnp.asarray(tiny_runs.random_inputs(2)[0])
  out = model.apply({"params": clip_lib.stack_layers(params)}, ids,
                    deterministic=False, rngs={"dropout": jax.random.key(0)},
                    method="encode_text")
  jax.block_until_ready(out)
  assert len(seen) == config.text.num_hidden_layers
  assert len(set(seen)) == len(seen)


def test_a_scanned_run_starts_from_the_unrolled_runs_values():
  """build_params stacks converted (unrolled) weights and draws LoRA A per
  layer path: the scanned start is the unrolled start, stacked."""
  given = step_lib.random_clip_params(
      pretrained.model_from_config(tiny_config(False)), seed=2)
  built = {}
  for scan in (False, True):
    model = pretrained.model_from_config(tiny_config(scan))
    assert model.scan_layers is scan
    built[scan] = step_lib.build_params(model, jax.random.key(5), given)
  assert_trees_equal(built[True], clip_lib.stack_layers(flat_to_tree(
      built[False])))
  # A scanned tree given to an unrolled model is unstacked as well.
  model = pretrained.model_from_config(tiny_config(False))
  again = step_lib.build_params(model, jax.random.key(5), built[True])
  assert_trees_equal(again, built[False])


def flat_to_tree(tree):
  return traverse_util.unflatten_dict(flat(tree))


def test_scanned_and_unrolled_train_steps_agree_in_float64():
  """One train step of the tiny model on 4 devices from the same start
  (LoRA B non-zero, dropout off), float64 towers: the same loss and, once
  unstacked, the same params to 1e-10. (In float32, Adam's first update,
  about lr * sign(g), would turn a rounding difference in a near-zero
  gradient into 2 * lr.)"""
  given = step_lib.random_clip_params(
      pretrained.model_from_config(tiny_config(False)), seed=2)
  ids, pixels = tiny_runs.random_inputs(8)
  batch = {"safe_image": pixels, "unsafe_image": pixels[::-1].copy(),
           "safe_ids": ids, "unsafe_ids": ids[::-1].copy()}
  mesh = step_lib.make_mesh()
  results = {}
  with jax.enable_x64(True):
    for scan in (False, True):
      config = tiny_config(scan)
      config.model.lora.dropout = 0.0
      model = pretrained.model_from_config(config).clone(dtype=jnp.float64)
      # LoRA B drawn in the unrolled layout, so both start from one tree.
      start = tiny_runs.with_trained_lora(clip_lib.unstack_layers(
          flat_to_tree(step_lib.build_params(model, jax.random.key(5),
                                             given))), 0.05, {})
      start = jax.tree.map(lambda x: np.asarray(x, np.float64), start)
      if scan:
        start = clip_lib.stack_layers(start)
      state = step_lib.create_train_state(config, jax.random.key(0), start,
                                          mesh=mesh, total_steps=10,
                                          model=model)
      train_step = step_lib.make_train_step(
          config, mesh, {"xla_backend_optimization_level": 0})
      state, metrics = train_step(state, step_lib.shard_batch(batch, mesh),
                                  jax.random.key(1))
      results[scan] = (float(metrics["loss"]), flat(
          clip_lib.unstack_layers(flat_to_tree(state.params))))
  loss0, p0 = results[False]
  loss1, p1 = results[True]
  np.testing.assert_allclose(loss1, loss0, rtol=2.0**-23)  # float32 metric
  assert sorted(p0) == sorted(p1)
  for k in p0:
    np.testing.assert_allclose(p1[k], p0[k], rtol=1e-10, atol=1e-12,
                               err_msg="/".join(k))


@pytest.fixture(scope="module")
def scanned_run(tmp_path_factory):
  """A saved tiny run trained with scanned layers (trained LoRA and head)."""
  run = tmp_path_factory.mktemp("scanned") / "run"
  config = tiny_config(True)
  state = tiny_runs.save_run(
      run, config, lambda p: tiny_runs.with_trained_lora(p, 0.1, HEAD))
  return run, config, state


def test_a_scanned_run_restores_serves_and_exports_unrolled(scanned_run,
                                                            tmp_path):
  run, _, state = scanned_run
  assert clip_lib.is_scanned(state.params)
  assert config_lib.load_run_config(run).model.scan_layers is True
  model = serving.load_model(run, merge_lora=False)
  assert clip_lib.is_scanned(model.params)
  assert_trees_equal(model.params, state.params)

  out = tmp_path / "out"
  assert export.main(["--model", str(run), "--out", str(out), "--format",
                      "hf", "orbax"]) == 0
  # The hf export is the unrolled, LoRA-merged towers, exactly.
  unrolled = clip_lib.unstack_layers(flat_to_tree(state.params))
  merged = jax.device_get(lora_lib.merge_lora(
      jax.tree.map(lambda x: np.asarray(x, np.float32), unrolled),
      state.model.lora))
  _, hf_params = convert.clip_params_from_hf(out / "hf")
  want = flat(merged["clip"])
  got = flat(hf_params)
  assert sorted(got) == sorted(want)
  for k in want:
    np.testing.assert_array_equal(got[k], np.asarray(want[k], np.float32),
                                  err_msg="/".join(k))
  # Served from either, the points are the run's.
  ids, pixels = tiny_runs.random_inputs(3)
  for path in (out / "hf", out / "orbax"):
    served = serving.load_model(path)
    assert not clip_lib.is_scanned(served.params)
    # Two float32 computations (merged vs unmerged LoRA, unrolled vs
    # scanned): the error-model bound of tests/numerics.py.
    cfg = state.model.clip
    assert_float32_parity(served.encode_text(ids), model.encode_text(ids),
                          *tower_error_terms(cfg, "text"))
    assert_float32_parity(served.encode_image(pixels),
                          model.encode_image(pixels),
                          *tower_error_terms(cfg, "vision"))


def test_the_export_source_of_a_scanned_run_is_unrolled_exactly(scanned_run):
  """What every export writer (hf, orbax, stablehlo, release) reads."""
  run, _, state = scanned_run
  src = export.load_source(run, merge=False)
  assert not clip_lib.is_scanned(src.params)
  assert_trees_equal(src.params, jax.tree.map(
      lambda x: np.asarray(x, np.float32),
      clip_lib.unstack_layers(flat_to_tree(state.params))))


def test_an_unrolled_run_saved_before_scan_layers_restores(tmp_path):
  """config.json without model.scan_layers (runs before the field) holds
  layers_<i> checkpoints: it restores unrolled and serves."""
  run = tmp_path / "old"
  state = tiny_runs.save_run(run, tiny_config(False), lambda p:
                             tiny_runs.with_trained_lora(p, 0.1, HEAD))
  path = run / config_lib.CONFIG_FILE
  saved = json.loads(path.read_text())
  del saved["model"]["scan_layers"]
  path.write_text(json.dumps(saved))
  config = config_lib.load_run_config(run)
  assert config.model.scan_layers is False
  _, restored = restore_lib.restore_run(run)
  assert not clip_lib.is_scanned(restored.params)
  assert_trees_equal(restored.params, state.params)
  served = serving.load_model(run)
  ids, _ = tiny_runs.random_inputs(2)
  assert np.isfinite(served.encode_text(ids)).all()


def test_resuming_in_the_other_layout_is_refused_by_field():
  saved = tiny_config(False)
  now = tiny_config(True)
  assert config_lib.resume_conflicts(saved, now) == [
      "model.scan_layers False (now True)"]


def test_scan_layers_must_be_a_bool():
  c = tiny_config(True)
  with c.ignore_type():  # as a config.json read back may hold
    c.model.scan_layers = "yes"
  with pytest.raises(ValueError, match="model.scan_layers"):
    config_lib.check_config(c)


def test_large_configs_scan_and_tiny_does_not():
  from configs import vitb16, vitl14
  assert vitl14.get_config().model.scan_layers is True
  assert vitb16.get_config().model.scan_layers is True
  assert tiny.get_config().model.scan_layers is False
