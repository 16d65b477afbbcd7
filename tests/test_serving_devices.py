"""serving.Model on every local device (the suite simulates 4): params
replicated, each batch split across the devices, padded when it does not
divide; what eval.py reports equals the one-device model's to float32
rounding."""

import jax
import numpy as np
import pytest

from hysac_jax import evaluate_run
from hysac_jax import lorentz
from hysac_jax import serving

import tiny_runs
from numerics import SAFETY
from numerics import assert_float32_parity
from numerics import tower_error_terms


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  return tiny_runs.save_converted(tmp_path_factory.mktemp("model"), seed=3,
                                  lora_b_scale=0.1, curv=0.7, alpha=0.3)


@pytest.fixture(scope="module")
def models(model_dir):
  assert jax.local_device_count() == 4, "conftest.py simulates 4 devices"
  return (serving.load_model(model_dir),
          serving.load_model(model_dir, devices=jax.local_devices()[:1]))


def test_a_batch_is_split_across_every_local_device(models):
  sharded, single = models
  assert sharded.mesh.size == 4 and single.mesh.size == 1
  pixels = np.random.default_rng(0).normal(
      size=(8, sharded.image_size, sharded.image_size, 3)).astype(np.float32)
  out = sharded.encode_image(pixels)
  assert len(out.sharding.device_set) == 4
  assert {s.data.shape[0] for s in out.addressable_shards} == {2}
  leaf = jax.tree.leaves(sharded.params)[0]
  assert len(leaf.sharding.device_set) == 4 and leaf.sharding.is_fully_replicated


@pytest.mark.parametrize("rows", [1, 3, 6, 8])
def test_sharded_points_equal_one_device_points(models, rows):
  sharded, single = models
  rng = np.random.default_rng(rows)
  pixels = rng.normal(size=(rows, sharded.image_size, sharded.image_size,
                            3)).astype(np.float32)
  ids = rng.integers(1, 400, size=(rows, sharded.context_length))
  ids[:, 0], ids[:, -1] = 49406, 49407
  for encode, tower, x in (("encode_image", "vision", pixels),
                           ("encode_text", "text", ids)):
    got = np.asarray(getattr(sharded, encode)(x))
    want = np.asarray(getattr(single, encode)(x))
    assert got.shape == want.shape == (rows, want.shape[1])
    assert_float32_parity(got, want, *tower_error_terms(sharded.config, tower))


def test_the_evaluation_report_equals_the_one_device_report(
    model_dir, tmp_path, monkeypatch):
  config = tiny_runs.tiny_config(tmp_path / "tfds", {
      **tiny_runs.MICRO_OVERRIDES, "data.synthetic_sizes": (16, 16, 22),
      "data.eval_batch_size_per_device": 4})
  real = serving.load_model
  reports, embeddings = {}, {}
  for name, devices in (("sharded", None), ("single", jax.local_devices()[:1])):
    loaded = []

    def load_model(*args, _devices=devices, _loaded=loaded, **kwargs):
      _loaded.append(real(*args, devices=_devices, **kwargs))
      return _loaded[-1]

    monkeypatch.setattr(serving, "load_model", load_model)
    reports[name], _ = evaluate_run.run(config, model_dir=model_dir,
                                        out_dir=tmp_path / name, plots=False)
    assert loaded[0].mesh.size == (4 if devices is None else 1)
    embeddings[name] = evaluate_run.embed_split_groups(loaded[0], config,
                                                       "test")
  monkeypatch.undo()
  for group in "SUVG":
    got, want = embeddings["sharded"][group], embeddings["single"][group]
    assert got.shape == want.shape == (22, got.shape[1])
    tower = "text" if group in "SU" else "vision"
    assert_float32_parity(got, want,
                          *tower_error_terms(loaded[0].config, tower))
  # The report is a function of the embeddings. Let delta be the largest
  # change of a point between the two (a Euclidean norm, bounded above by
  # the error model). Distance-valued entries (dist0 and its mean, std and
  # percentiles, the bounds; b' and the thresholds at most SAFETY times as
  # sensitive) move by at most SAFETY * delta. Every other entry is a rank
  # statistic (recalls, AUROC, accuracies, unsafe shares) over the 22 items
  # of a group: an item's outcome can change only where one of its scores
  # (distance to the origin, or its row of text-image distances) lies within
  # 2 * SAFETY * delta of another. So rank entries may differ by at most
  # (items with such a near score) / 22, and by nothing when there are none.
  one, other = embeddings["single"], embeddings["sharded"]
  delta = max(float(np.linalg.norm(np.asarray(other[g], np.float64)
                                   - np.asarray(one[g], np.float64),
                                   axis=1).max()) for g in "SUVG")
  curv = reports["single"]["curv"]
  texts = np.concatenate([one["S"], one["U"]])
  images = np.concatenate([one["V"], one["G"]])
  cross = np.asarray(lorentz.pairwise_dist(texts, images, curv), np.float64)
  margin = 2 * SAFETY * delta
  near_items = 0
  for x in (texts, images):
    r = np.asarray(lorentz.dist0(x, curv), np.float64)
    gaps = np.abs(r[:, None] - r[None, :]) + np.eye(len(r)) * np.inf
    near_items = max(near_items, int((gaps.min(axis=1) <= margin).sum()))
  for rows in (cross, cross.T):
    gaps = np.diff(np.sort(rows, axis=1), axis=1)
    near_items = max(near_items, int((gaps.min(axis=1) <= margin).sum()))
  flat_s = _numbers(reports["sharded"])
  flat_1 = _numbers(reports["single"])
  assert flat_s.keys() == flat_1.keys() and flat_s
  for key, value in flat_1.items():
    distance_valued = key.startswith(("distances.", "bounds.")) or (
        key.endswith("threshold"))
    tol = SAFETY * delta if distance_valued else near_items / 22
    assert flat_s[key] == value or abs(flat_s[key] - value) <= tol, (
        key, flat_s[key], value, tol)


def _numbers(tree, prefix=""):
  """{dotted key: number} of a report's numeric leaves."""
  out = {}
  if isinstance(tree, dict):
    for k, v in tree.items():
      out.update(_numbers(v, f"{prefix}{k}."))
  elif isinstance(tree, (list, tuple)):
    for i, v in enumerate(tree):
      out.update(_numbers(v, f"{prefix}{i}."))
  elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
    out[prefix[:-1]] = float(tree)
  return out
