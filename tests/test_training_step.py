"""Tests of hysac_jax.training.step with the real HySAC model at the `tiny` size.

Compilations are the cost here, so the module compiles four train steps (one
and four devices, global negatives with dropout; one device accumulating four
micro-batches and four devices, local negatives without dropout) and one eval
step, and every test reuses them. XLA's backend optimisation is turned off
for these compilations (half the compile time; same maths).

The steps run in float64 (x64 on for this module, float64 towers and params):
one and four devices reduce in different orders, and after one Adam step
(update ≈ lr · sign(g)) a float32 rounding difference in a near-zero gradient
could flip a parameter by 2·lr on some CPU. In float64 the equivalence checks
hold to 1e-10 on any machine.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import vitl14
from hysac_jax import lorentz
from hysac_jax import pretrained
from hysac_jax.models import hysac as hysac_lib
from hysac_jax.training import step as step_lib

BATCH = 8
FAST_COMPILE = {"xla_backend_optimization_level": 0}
F64_TOL = 1e-10
# The train step reports its metrics as float32: two float64 values that
# agree to F64_TOL may still round to neighbouring float32 numbers.
METRIC_TOL = 2.0**-23


@pytest.fixture(scope="module", autouse=True)
def float64():
  with jax.enable_x64(True):
    yield


def tiny_config(**loss_and_optim):
  config = vitl14.get_config()
  config.model.clip = ""
  config.model.size = "tiny"
  config.model.dtype = "float32"
  # Unrolled layers: the leaf counts below are per layer (the scanned step
  # is checked against this one in tests/test_scan_layers.py).
  config.model.scan_layers = False
  for key, value in loss_and_optim.items():
    section, field = key.split("__")
    config[section][field] = value
  return config


def random_batch(seed, n=BATCH):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, 1000, size=(2, n, 77)).astype(np.int32)
  ids[:, :, -1] = 49407  # the end-of-text id pools the last position
  return {
      "safe_image": rng.normal(size=(n, 32, 32, 3)).astype(np.float32),
      "unsafe_image": rng.normal(size=(n, 32, 32, 3)).astype(np.float32),
      "safe_ids": ids[0],
      "unsafe_ids": ids[1],
  }


def flat(tree):
  return traverse_util.flatten_dict(jax.device_get(tree))


def copy_state(state):
  """A fresh-buffer copy (the step donates its input state)."""
  return jax.tree.map(jnp.copy, state)


@pytest.fixture(scope="module")
def params():
  """Tiny HySAC params; LoRA B is made non-zero so that A gets gradients."""
  model = pretrained.model_from_config(tiny_config())
  params = step_lib.init_model_params(model, jax.random.key(0))
  rng = np.random.default_rng(1)
  flat_params = traverse_util.flatten_dict(jax.device_get(params))
  for k, v in flat_params.items():
    flat_params[k] = np.asarray(v, np.float64)
    if k[-1] == "lora_B":
      flat_params[k] = 0.05 * rng.normal(size=v.shape)
  return traverse_util.unflatten_dict(flat_params)


def _run(config, mesh, params, batch):
  """(initial state copy, new state, metrics, compiled step) of one step,
  float64 towers."""
  model = pretrained.model_from_config(config).clone(dtype=jnp.float64)
  state = step_lib.create_train_state(config, jax.random.key(2),
                                       init_params=params, mesh=mesh,
                                       model=model)
  pristine = copy_state(state)
  step = step_lib.make_train_step(config, mesh, FAST_COMPILE)
  new_state, metrics = step(state, step_lib.shard_batch(batch, mesh),
                            jax.random.key(3))
  return pristine, new_state, jax.device_get(metrics), step


@pytest.fixture(scope="module")
def global_runs(params):
  """One step with global negatives (dropout on) on 1 and on 4 devices."""
  config = tiny_config()
  batch = random_batch(0)
  devices = jax.devices()
  assert len(devices) >= 4, "tests/conftest.py should force 4 CPU devices"
  return {n: _run(config, step_lib.make_mesh(devices[:n]), params, batch)
          for n in (1, 4)}


@pytest.fixture(scope="module")
def local_runs(params):
  """Local negatives, no dropout: 4 devices vs 1 device with 4 micro-batches."""
  devices = jax.devices()
  batch = random_batch(1)
  out = {}
  for n, accum in ((4, 1), (1, 4)):
    config = tiny_config(loss__local_negatives=True, optim__accum_steps=accum)
    config.model.lora.dropout = 0.0
    out[n] = _run(config, step_lib.make_mesh(devices[:n]), params, batch)
  return out


def assert_trees_close(a, b, rtol, atol):
  a, b = flat(a), flat(b)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol,
                               err_msg="/".join(k))


# ------------------------------------------------------------- labelling ---


def test_labels_mark_lora_matrices_head_scalars_and_frozen_base(params):
  labels = flat(step_lib.label_params(params))
  for path, label in labels.items():
    if path[-1] in ("lora_A", "lora_B"):
      assert label == "lora", path
    elif path in [(h,) for h in hysac_lib.HEAD_NAMES]:
      assert label == "head", path
    else:
      assert label == "frozen", path
  counts = {l: sum(v == l for v in labels.values()) for l in step_lib.LABELS}
  # 2 towers x 2 layers x 5 targets + the patch conv, A and B each.
  assert counts == {"lora": 2 * (2 * 2 * 5 + 1), "head": 4, "base": 0,
                    "frozen": counts["frozen"]}
  assert counts["frozen"] > 20
  assert labels[("clip", "text_model", "encoder", "layers_0", "self_attn",
                 "k_proj", "kernel")] == "frozen"


def test_full_fine_tune_labels_every_clip_weight_base(params):
  frozen = flat(step_lib.label_params(params))
  labels = flat(step_lib.label_params(params, train_base=True))
  for path, label in labels.items():
    want = "base" if frozen[path] == "frozen" else frozen[path]
    assert label == want, path
  trainable = flat(step_lib.trainable_params(params, train_base=True))
  assert trainable.keys() == flat(params).keys()


def test_optimizer_state_holds_only_trainable_params(global_runs):
  state = global_runs[4][0]
  trainable = flat(step_lib.trainable_params(state.params))
  adam = step_lib._adamw_state(state.opt_state).inner_state[0]
  for moment in (adam.mu, adam.nu):
    assert flat(moment).keys() == trainable.keys()
  n_trainable = sum(v.size for v in trainable.values())
  n_state = sum(np.size(x) for x in jax.tree.leaves(state.opt_state))
  # mu and nu, plus a handful of scalars (counts, hyperparameters).
  assert 2 * n_trainable <= n_state < 2 * n_trainable + 20
  n_frozen = sum(v.size for k, v in flat(state.params).items()
                 if k not in trainable)
  assert n_frozen > 10 * n_trainable


def test_weight_decay_applies_to_lora_only():
  config = tiny_config(optim__weight_decay=0.5, optim__lr=0.1)
  tx = step_lib.make_optimizer(config.optim, config.optim.lr)
  tree = {"clip": {"fc1": {"lora_A": jnp.ones((2, 2))}},
          "log_curv": jnp.ones(())}
  zero_grads = jax.tree.map(jnp.zeros_like, tree)
  updates, _ = tx.update(zero_grads, tx.init(tree), tree)
  np.testing.assert_allclose(updates["clip"]["fc1"]["lora_A"], -0.1 * 0.5)
  assert float(updates["log_curv"]) == 0.0


def test_warmup_cosine_schedule_is_merus_linear_warmup_then_cos_squared():
  config = tiny_config(optim__schedule="warmup_cosine", optim__warmup_steps=10,
                       optim__lr=2e-4)
  schedule = step_lib.learning_rate_schedule(config.optim, total_steps=110)
  for step in (0, 5, 10, 30, 60, 109, 110):
    if step < 10:
      expected = 2e-4 * step / 10
    else:
      expected = 2e-4 * math.cos((step - 10) / 100 * math.pi / 2) ** 2
    np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-5,
                               atol=1e-10)
  with pytest.raises(ValueError, match="total_steps"):
    step_lib.learning_rate_schedule(config.optim, total_steps=None)


# -------------------------------------------------------------- the step ---


def test_four_devices_match_one_device_with_global_negatives(global_runs):
  _, one, m1, _ = global_runs[1]
  _, four, m4, _ = global_runs[4]
  assert_trees_close(step_lib.trainable_params(one.params),
                     step_lib.trainable_params(four.params),
                     rtol=F64_TOL, atol=F64_TOL)
  for name in m1:
    np.testing.assert_allclose(m1[name], m4[name], rtol=METRIC_TOL,
                               atol=F64_TOL, err_msg=name)
  # The step really moved every LoRA matrix (a head scalar may stay on its
  # bound: the initial logit scale sits on its lower bound).
  before = flat(step_lib.trainable_params(global_runs[4][0].params))
  after = flat(step_lib.trainable_params(four.params))
  for k in before:
    if k[-1] in ("lora_A", "lora_B"):
      assert not np.array_equal(before[k], after[k]), k


def test_step_metrics_are_the_loss_terms_and_head_values(global_runs):
  pristine, _, metrics, _ = global_runs[4]
  expected = {"contrastive_safe", "contrastive_unsafe", "contrastive_cross_a",
              "contrastive_cross_b", "entail_safe", "entail_unsafe",
              "entail_d", "loss", "curv", "logit_scale", "alpha_image",
              "alpha_text", "grad_norm", "lr", "dist0_S", "dist0_U",
              "dist0_V", "dist0_G"}
  assert set(metrics) == expected
  assert all(np.isfinite(v) for v in metrics.values())
  np.testing.assert_allclose(metrics["logit_scale"], 1 / 0.07, rtol=1e-6)
  np.testing.assert_allclose(metrics["alpha_text"], 64**-0.5, rtol=1e-6)
  np.testing.assert_allclose(metrics["lr"], 1e-4, rtol=1e-6)
  terms = np.array([metrics[k] for k in expected if k.startswith(
      ("contrastive", "entail"))])
  np.testing.assert_allclose(metrics["loss"], terms.sum() / 7 / 7, rtol=1e-5)


def test_accumulated_micro_batches_equal_a_larger_mesh_with_local_negatives(
    local_runs):
  _, four, m4, _ = local_runs[4]
  _, one, m1, _ = local_runs[1]
  assert_trees_close(step_lib.trainable_params(one.params),
                     step_lib.trainable_params(four.params),
                     rtol=F64_TOL, atol=F64_TOL)
  for name in ("loss", "contrastive_safe", "entail_d", "grad_norm"):
    np.testing.assert_allclose(m1[name], m4[name], rtol=METRIC_TOL,
                               err_msg=name)


def test_huge_learning_rate_keeps_head_in_range_and_frozen_bit_identical(
    global_runs, params):
  pristine, _, _, step = global_runs[4]
  mesh = step_lib.make_mesh(jax.devices()[:4])
  # 3e4 times the paper's rate: every Adam step moves each scalar by ~3,
  # past the curvature's and logit scale's bounds.
  state = step_lib.with_learning_rate(copy_state(pristine), 3.0)
  batch = step_lib.shard_batch(random_batch(2), mesh)
  for i in range(3):
    state, metrics = step(state, batch, jax.random.key(i))
  after = flat(state.params)
  before = flat(params)
  labels = flat(step_lib.label_params(params))
  for k, label in labels.items():
    if label == "frozen":
      assert after[k].dtype == before[k].dtype
      assert np.array_equal(after[k], before[k]), k
  bounds = hysac_lib.head_bounds(1.0)
  at_bound = 0
  for name, (low, high) in bounds.items():
    value = after[(name,)]  # float64 here, compared with float64 bounds
    low, high = np.float64(low), np.float64(high)
    assert low <= value <= high, (name, value)
    at_bound += value in (low, high)
  assert at_bound >= 2, {n: after[(n,)] for n in bounds}
  assert int(state.step) == 3
  metrics = jax.device_get(metrics)
  np.testing.assert_allclose(metrics["lr"], 3.0)
  assert all(np.isfinite(v) for v in metrics.values()), metrics


def test_eval_step_embeds_like_the_model_and_reports_the_train_loss(
    local_runs):
  pristine, _, train_metrics, _ = local_runs[4]
  config = tiny_config(loss__local_negatives=True)
  mesh = step_lib.make_mesh(jax.devices()[:4])
  batch = random_batch(1)
  emb, metrics = step_lib.make_eval_step(config, mesh, FAST_COMPILE)(
      pristine, step_lib.shard_batch(batch, mesh))
  # Without dropout the train step's (pre-update) loss is the eval loss.
  for name in ("loss", "contrastive_cross_b", "entail_safe", "dist0_G"):
    np.testing.assert_allclose(metrics[name], train_metrics[name],
                               rtol=METRIC_TOL, err_msg=name)
  params = jax.device_get(pristine.params)
  model = pristine.model
  direct = model.apply({"params": params}, batch["unsafe_image"][:3],
                       method=model.encode_image)
  np.testing.assert_allclose(emb["G"][:3], direct, rtol=F64_TOL,
                             atol=F64_TOL)
  # The eval step's points sit where the head scalars say.
  curv = hysac_lib.head_scalars(params)["curv"]
  np.testing.assert_allclose(float(metrics["dist0_S"]),
                             float(jnp.mean(lorentz.dist0(emb["S"], curv))),
                             rtol=F64_TOL)


def test_batch_errors_name_the_problem(global_runs):
  mesh = step_lib.make_mesh(jax.devices()[:4])
  with pytest.raises(ValueError, match="divisible"):
    step_lib.shard_batch(random_batch(0, n=6), mesh)
  pristine, _, _, step = global_runs[4]
  bad = dict(random_batch(0))
  del bad["unsafe_ids"]
  with pytest.raises(KeyError, match="unsafe_ids"):
    step(copy_state(pristine), step_lib.shard_batch(bad, mesh),
         jax.random.key(0))


def clip_without_lora(params):
  flat_clip = traverse_util.flatten_dict(jax.tree.map(np.asarray,
                                                      params["clip"]))
  return traverse_util.unflatten_dict(
      {k: v for k, v in flat_clip.items() if k[-1] not in ("lora_A",
                                                           "lora_B")})


def test_pretrained_init_takes_given_leaves_and_inits_only_lora_and_head(
    params, monkeypatch):
  config = tiny_config()
  config.model.curv_init = 0.5
  # float32 weights, as converted from PyTorch (the fixture is float64).
  clip_only = jax.tree.map(lambda x: np.asarray(x, np.float32),
                           clip_without_lora(params))

  def no_random_init(*args):
    raise AssertionError("the towers were random-initialised")

  monkeypatch.setattr(step_lib, "_jitted_init", no_random_init)
  state = step_lib.create_train_state(config, jax.random.key(5),
                                       init_params=clip_only)
  got = flat(state.params)
  # The model's tree, leaf for leaf (checkpoints hold these paths).
  reference = traverse_util.flatten_dict(
      step_lib.abstract_params(state.model))
  assert {k: (v.shape, v.dtype) for k, v in got.items()} == {
      k: (v.shape, v.dtype) for k, v in reference.items()}
  for k, v in traverse_util.flatten_dict(clip_only).items():
    assert got[("clip",) + k].dtype == v.dtype
    assert np.array_equal(got[("clip",) + k], v), k
  # Head scalars at SPEC's inits: log c0, log(dim^-1/2), log(1/0.07).
  np.testing.assert_allclose(got[("log_curv",)], math.log(0.5), rtol=1e-7)
  for name in ("log_alpha_image", "log_alpha_text"):
    np.testing.assert_allclose(got[(name,)], math.log(64**-0.5), rtol=1e-7)
  np.testing.assert_allclose(got[("log_logit_scale",)], math.log(1 / 0.07),
                             rtol=1e-7)
  # LoRA: B = 0; A uniform on [-1/sqrt(fan_in), 1/sqrt(fan_in)] (peft's
  # kaiming_uniform_(a=sqrt(5))), each leaf its own draw.
  lora_b = {k: v for k, v in got.items() if k[-1] == "lora_B"}
  lora_a = {k: v for k, v in got.items() if k[-1] == "lora_A"}
  assert len(lora_b) == len(lora_a) == 2 * 2 * 5 + 1  # 2 towers x 2 layers
  assert all(not v.any() for v in lora_b.values())
  unit = []
  for k, v in lora_a.items():
    bound = 1 / math.sqrt(np.prod(v.shape[:-1]))
    assert np.abs(v).max() <= bound, k
    unit.append(v.ravel() / bound)
  assert len({v.tobytes() for v in lora_a.values()}) == len(lora_a)
  unit = np.sort(np.concatenate(unit))
  # Kolmogorov-Smirnov distance to U(-1, 1); 1.95/sqrt(n) is p = 0.001.
  cdf = (unit + 1) / 2
  n = unit.size
  ks = max(np.max(np.arange(1, n + 1) / n - cdf),
           np.max(cdf - np.arange(n) / n))
  assert ks < 1.95 / math.sqrt(n), ks
  # A fixed key gives fixed values (a rerun starts the same).
  again = flat(step_lib.create_train_state(
      config, jax.random.key(5), init_params=clip_only).params)
  for k in lora_a:
    assert np.array_equal(again[k], got[k]), k


def test_given_arrays_survive_donating_the_state(params):
  """The state never aliases the caller's arrays: the step donates it."""
  mesh = step_lib.make_mesh(jax.devices()[:4])
  given = jax.device_put(params, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec()))
  state = step_lib.create_train_state(tiny_config(), jax.random.key(2),
                                       init_params=given, mesh=mesh)
  doubled = jax.jit(lambda p: jax.tree.map(lambda x: 2 * x, p),
                    donate_argnums=0)(state.params)
  jax.block_until_ready(doubled)
  for a, b in zip(jax.tree.leaves(given), jax.tree.leaves(params)):
    assert np.array_equal(np.asarray(a), b)


def test_init_params_from_a_clip_tree_keep_fresh_lora_and_head(params):
  config = tiny_config()
  clip_only = jax.tree.map(np.asarray, params["clip"])
  clip_flat = traverse_util.flatten_dict(clip_only)
  clip_only = traverse_util.unflatten_dict(
      {k: v for k, v in clip_flat.items() if k[-1] not in ("lora_A",
                                                            "lora_B")})
  state = step_lib.create_train_state(config, jax.random.key(5),
                                       init_params=clip_only)
  got = flat(state.params)
  for k, v in traverse_util.flatten_dict(clip_only).items():
    assert np.array_equal(got[("clip",) + k], v)
  lora_b = [v for k, v in got.items() if k[-1] == "lora_B"]
  assert lora_b and all(not v.any() for v in lora_b)  # B starts at zero
  np.testing.assert_allclose(got[("log_logit_scale",)], math.log(1 / 0.07))
  bad = dict(clip_only, text_projection={"kernel": np.zeros((3, 3))})
  with pytest.raises(ValueError, match="text_projection/kernel"):
    step_lib.create_train_state(config, jax.random.key(5), init_params=bad)


# ---------------------------------------------------------- out of memory ---

GPU_OOM = """RESOURCE_EXHAUSTED: Out of memory while trying to allocate 4770354232 bytes.
BufferAssignment OOM Debugging.
BufferAssignment stats:
             parameter allocation:  372.76MiB
              constant allocation:    48.5KiB
        maybe_live_out allocation:    9.64GiB
     preallocated temp allocation:    4.44GiB
                 total allocation:   14.44GiB
              total fragmentation:  680.30MiB (4.60%)
Peak buffers:
\tBuffer 1:
\t\tSize: 1.50GiB"""

TPU_OOM = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of "
           "memory in memory space hbm. Used 20.50G of 15.48G hbm. Exceeded "
           "hbm capacity by 5.02G.")


def test_out_of_memory_message_names_batch_memory_and_remedies():
  msg = step_lib.out_of_memory_message(
      GPU_OOM, batch_per_device=256, global_batch=2048,
      stage="in the train step", available=80 * 2**30)
  assert "\n" not in msg
  assert "at batch 256 per device (2048 global)" in msg
  assert "asked for 4.44 GiB more" in msg  # 4770354232 / 2^30
  assert "the step needs 14.44 GiB" in msg
  assert "80.00 GiB available" in msg
  for remedy in ("config.data.batch_size_per_device",
                 "config.model.remat=dots_saveable or full",
                 "config.optim.accum_steps"):
    assert remedy in msg
  msg = step_lib.out_of_memory_message(
      TPU_OOM, batch_per_device=64, global_batch=512,
      stage="compiling the train step")
  assert ("compiling the train step at batch 64 per device (512 global): "
          "asked for 20.50 GiB, 15.48 GiB available;") in msg
  assert step_lib.out_of_memory_message(
      "INVALID_ARGUMENT: shapes differ", batch_per_device=1,
      global_batch=1) is None


def test_resource_exhausted_becomes_an_out_of_memory_error():
  with pytest.raises(step_lib.OutOfMemoryError,
                     match=r"at batch 8 per device \(32 global\)"):
    with step_lib.explain_out_of_memory("in the train step", 8, 32):
      raise jax.errors.JaxRuntimeError(GPU_OOM)
  with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
    with step_lib.explain_out_of_memory("in the train step", 8, 32):
      raise jax.errors.JaxRuntimeError("INTERNAL: something else")
