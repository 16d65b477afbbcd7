"""The gallery index (hysac_jax/index, hysac_jax/formats/gallery.py)."""

import json
import math
import os
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

import hysac_jax.index
from hysac_jax import cli
from hysac_jax import predict
from hysac_jax import safety
from hysac_jax import serving
from hysac_jax.evaluation import embed as embed_lib
from hysac_jax.formats import gallery
from hysac_jax.index import __main__ as index_cli
from hysac_jax.index import backends
from hysac_jax.index import build as build_lib
import tiny_runs

CURV = 0.7
ALPHA = 0.8
SEARCH_PROG = "python -m hysac_jax.index search: error: "


def lift(directions, radius, curv=CURV):
  """Points at distance `radius` from the origin along unit `directions`."""
  directions = directions / np.linalg.norm(directions, axis=1, keepdims=True)
  return (directions * (np.sinh(math.sqrt(curv) * radius) / math.sqrt(curv))
          [:, None]).astype(np.float32)


def clustered(rng, n, dim=32, latent=8, clusters=20):
  """n points with directions near a `latent`-dimensional subspace, at
  distances 0.5 .. 2.5 from the origin."""
  centres = rng.normal(size=(clusters, latent))
  z = centres[rng.integers(0, clusters, n)] + 0.4 * rng.normal(
      size=(n, latent))
  basis = rng.normal(size=(latent, dim))
  u = z @ basis + 0.05 * rng.normal(size=(n, dim))
  return lift(u, rng.uniform(0.5, 2.5, n))


def dist_f64(x, y, c=CURV):
  """SPEC §1 distances of all pairs, float64."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  xt = np.sqrt(1 / c + np.sum(x * x, -1))[:, None]
  yt = np.sqrt(1 / c + np.sum(y * y, -1))[None, :]
  return np.arccosh(np.maximum(c * (xt * yt - x @ y.T), 1.0)) / math.sqrt(c)


def brute_force(queries, points, k, allowed=None):
  """(Q, k) indices by float64 distance, ties to the lower index."""
  d = dist_f64(queries, points)
  if allowed is not None:
    d[:, ~allowed] = np.inf
  order = np.argsort(d, axis=1, kind="stable")[:, :k]
  if allowed is not None:
    order = [row[np.isfinite(d[i, row])] for i, row in enumerate(order)]
  return [list(map(int, row)) for row in order]


def indices(hits):
  return [[h["index"] for h in row] for row in hits]


# --------------------------------------------------------------------------
# Search on points (no model).


def test_exact_search_equals_a_float64_brute_force_ties_included():
  rng = np.random.default_rng(0)
  points = clustered(rng, 300)
  points[200:230] = points[10:40]  # exact duplicates: ties to the lower
  queries = np.concatenate([points[10:20], clustered(rng, 20)])
  want = brute_force(queries, points, 12)
  # Several chunks merged, or one; on the 4 devices (ties across them: the
  # duplicates lie on other devices than their originals), or on one.
  for chunk, devices in ((16, None), (64, None), (backends.CHUNK, None),
                         (16, jax.local_devices()[:1])):
    idx, dist = backends.Exact(points, CURV, chunk=chunk,
                               devices=devices).search(queries, 12)
    assert idx.tolist() == want, (chunk, devices)
    np.testing.assert_allclose(
        dist, np.take_along_axis(dist_f64(queries, points), idx, 1),
        rtol=1e-5, atol=1e-5)
  index = hysac_jax.index.Index.from_arrays(points, [f"p{i}" for i in
                                                     range(300)], CURV)
  hits = index.search(queries, 12)
  assert indices(hits) == want
  assert hits[0][0]["rank"] == 1 and hits[0][0]["label"] == "p10"
  assert [h["index"] for h in hits[0][:2]] == [10, 200]  # a tie
  # The same records as predict's in-memory ranking, plus the flag.
  pool = predict.Pool(points, index.labels, "image", CURV)
  ranked = predict.rank(queries, pool, CURV, "hyp", 12)
  for ours, theirs in zip(hits, ranked):
    assert [(h["rank"], h["index"], h["label"]) for h in ours] == [
        (h["rank"], h["index"], h["label"]) for h in theirs]
    # rank's all-pairs float32 distances are rounding noise below ~1e-3
    # (lorentz.pairwise_dist); ours are per pair (lorentz.dist).
    assert [h["distance"] for h in ours] == pytest.approx(
        [h["distance"] for h in theirs], rel=1e-5, abs=2e-3)
    assert {h["unsafe"] for h in ours} == {None}  # built without bounds


def test_exact_search_asks_for_more_than_there_is_and_checks_its_input():
  rng = np.random.default_rng(1)
  points = clustered(rng, 5)
  index = hysac_jax.index.Index.from_arrays(points, list("abcde"), CURV)
  (hits,) = index.search(points[:1], 9)
  assert [h["index"] for h in hits] == brute_force(points[:1], points, 5)[0]
  bad = points[:2].copy()
  bad[1, 3] = np.nan
  for args, message in (((bad, 3), "query 1 holds a non-finite"),
                        ((points[:1], 0), "k=0"),
                        ((points[:1, :4], 3), r"expected \(Q, 32\)")):
    with pytest.raises(hysac_jax.index.SearchError, match=message):
      index.search(*args)
  with pytest.raises(hysac_jax.index.SearchError, match="built without"):
    index.search(points[:1], 3, safe_only=True)
  with pytest.raises(hysac_jax.index.SearchError, match="needs the bounds"):
    index.search(points[:1], 3, traversal="geodesic")


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approx_reaches_its_recall_on_a_hidden_seed_set(kind):
  seed = int(np.random.SeedSequence().entropy % 2**32)
  rng = np.random.default_rng(seed)
  points, queries = clustered(rng, 4000), clustered(rng, 200)
  index = hysac_jax.index.Index.from_arrays(points, [""] * 4000, CURV,
                                            approx=kind)
  assert index.approx_params["kind"] == kind
  want = brute_force(queries, points, 10)
  got = indices(index.search(queries, 10, backend="approx"))
  recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(want, got)])
  assert recall >= 0.98, f"recall@10 {recall:.3f} (seed {seed})"
  # Where approx finds the exact set, it gives exact's records.
  exact = index.search(queries, 10)
  approx = index.search(queries, 10, backend="approx")
  same = [i for i, (a, b) in enumerate(zip(want, got)) if a == b]
  assert same and all(approx[i] == exact[i] for i in same)


def test_traversal_and_safe_only_match_safety_on_the_same_points():
  rng = np.random.default_rng(2)
  points, queries = clustered(rng, 400), clustered(rng, 30)
  bound = 1.0
  threshold = safety.safety_threshold(bound, CURV, ALPHA)
  index = hysac_jax.index.Index.from_arrays(points, [""] * 400, CURV,
                                            bound=bound, approx="hnsw")
  unsafe = np.asarray(safety.unsafe_at(safety.origin_distance(points, CURV),
                                       threshold))
  assert 0 < unsafe.sum() < len(unsafe)
  np.testing.assert_array_equal(index.unsafe, unsafe)
  for method in safety.TRAVERSAL_METHODS:
    moved = np.asarray(safety.traverse_to_safe(queries, CURV, bound, ALPHA,
                                               method))
    assert np.any(moved != queries)
    want = brute_force(moved, points, 8)
    for backend in hysac_jax.index.BACKENDS:
      hits = index.search(queries, 8, traversal=method, backend=backend)
      assert indices(hits) == want, (method, backend)
  for backend in hysac_jax.index.BACKENDS:
    hits = index.search(queries, 8, safe_only=True, backend=backend)
    assert indices(hits) == brute_force(queries, points, 8, ~unsafe)
    assert {h["unsafe"] for row in hits for h in row} == {False}


# --------------------------------------------------------------------------
# Building from a model; the CLI.


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  return tiny_runs.save_converted(tmp_path_factory.mktemp("model"), seed=0,
                                  lora_b_scale=0.1, curv=CURV, alpha=0.3)


@pytest.fixture(scope="module")
def model(model_dir):
  return serving.load_model(model_dir)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
  """Seven images in a folder tree, and one unreadable file."""
  d = tmp_path_factory.mktemp("gallery")
  (d / "sub").mkdir()
  rng = np.random.default_rng(0)
  for i in range(7):
    Image.fromarray(rng.integers(0, 256, (30 + i, 40, 3), np.uint8)).save(
        d / ("sub" if i % 2 else ".") / f"im{i}.png")
  (d / "broken.jpg").write_bytes(b"not an image")
  return d


def readable(images):
  return sorted(str(p) for p in images.rglob("im*.png"))


@pytest.fixture(scope="module")
def bounds_file(model, images, tmp_path_factory):
  """Bounds whose image b' falls among the gallery's distances."""
  points = embed_points(model, readable(images))
  d = np.sort(np.asarray(safety.origin_distance(points, CURV)))
  target = (d[3] + d[4]) / 2
  lo, hi = -50.0, 50.0
  for _ in range(200):  # b' is increasing in b
    b = (lo + hi) / 2
    lo, hi = (b, hi) if safety.safety_threshold(b, CURV) < target else (lo, b)
  path = tmp_path_factory.mktemp("bounds") / "bounds.json"
  safety.save_bounds({g: {"avg": lo, "low_05": lo, "up_95": lo}
                      for g in safety.GROUPS}, path)
  return path


def embed_points(model, paths):
  pixels = np.stack([predict.read_image(p, model.image_size) for p in paths])
  return embed_lib.encode_batched(model.encode_image, pixels, 8)


def run_cli(capsys, *argv):
  """(exit code, stdout JSON records, stderr lines)."""
  code = index_cli.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return (code, [json.loads(line) for line in out.splitlines()],
          [line for line in err.splitlines() if "error" in line])


@pytest.fixture(scope="module")
def built(model_dir, images, bounds_file, tmp_path_factory):
  out = tmp_path_factory.mktemp("built") / "idx"
  code = index_cli.main(["build", "--model", str(model_dir), "--images",
                         str(images), "--bounds", str(bounds_file), "--out",
                         str(out), "--shard-size", "3", "--quiet"])
  assert code == 0
  return out


def test_build_flags_items_at_b_prime_and_lists_unreadable_images(
    built, model, images, bounds_file):
  manifest = gallery.read_manifest(built)
  assert manifest["count"] == 7 and manifest["modality"] == "image"
  (skipped,) = manifest["skipped"]
  assert "broken.jpg" in skipped
  index = hysac_jax.index.open(built)
  assert index.labels == readable(images)
  points = embed_points(model, index.labels)
  np.testing.assert_allclose(index.points, points, rtol=1e-5, atol=1e-6)
  model.bounds = safety.load_bounds(bounds_file)
  unsafe, distance = model.classify_unsafe(index.points, "image")
  model.bounds = None
  np.testing.assert_array_equal(index.unsafe, unsafe)
  assert 0 < unsafe.sum() < 7
  np.testing.assert_allclose(index.distance, distance, rtol=1e-6)
  assert manifest["model"]["threshold"] == pytest.approx(
      safety.safety_threshold(safety.load_bounds(bounds_file)["V"]["up_95"],
                              CURV))


def test_search_cli_answers_like_predict_with_the_index(
    capsys, built, images, model_dir, bounds_file):
  query = readable(images)[2]
  argv = ["--index", built, "--image", query, "--text", "a red square",
          "--top-k", 4, "--traversal", "geodesic", "--safe-only"]
  code, lines, err = run_cli(capsys, "search", *argv)
  assert code == 0 and err == []
  image, text = lines
  assert image["input"] == query and text["type"] == "text"
  assert image["index"] == {"traversal": "geodesic", "safe_only": True,
                            "backend": "exact"}
  assert all(h["unsafe"] is False for h in image["top_k"] + text["top_k"])
  code = predict.main([str(a) for a in ["--model", model_dir, "--bounds",
                                        bounds_file, *argv]])
  assert code == 0
  assert [json.loads(l) for l in capsys.readouterr().out.splitlines()] == (
      lines)
  # Unfiltered, untraversed: the image finds itself first.
  code, (hit,), _ = run_cli(capsys, "search", "--index", built, "--image",
                            query, "--backend", "approx")
  assert code == 0 and hit["top_k"][0]["label"] == query
  assert hit["top_k"][0]["distance"] < 0.05


def test_an_interrupted_build_resumes_where_it_stopped(
    built, model, images, bounds_file, tmp_path, monkeypatch):
  model.bounds = safety.load_bounds(bounds_file)
  out = tmp_path / "idx"

  class Stop(Exception):
    pass

  def stop_after_first(i):
    if i == 1:
      raise Stop

  with pytest.raises(Stop):
    build_lib.build(model, out, images=str(images), shard_size=3,
                    on_shard=stop_after_first, progress_bar=False)
  assert not out.exists()  # whole or absent
  assert gallery.done_shards(gallery.building_dir(out)) == [0, 1]
  with pytest.raises(gallery.GalleryError, match="unfinished"):
    hysac_jax.index.open(out)
  embedded = []
  real = embed_lib.embed_images
  monkeypatch.setattr(embed_lib, "embed_images",
                      lambda m, s, **kw: embedded.append(len(s)) or
                      real(m, s, **kw))
  build_lib.build(model, out, images=str(images), shard_size=3,
                  progress_bar=False)
  model.bounds = None
  assert embedded == [2]  # only the last shard (items 6, 7)
  assert not os.path.exists(gallery.building_dir(out))
  again, first = hysac_jax.index.open(out), hysac_jax.index.open(built)
  assert again.labels == first.labels
  np.testing.assert_array_equal(again.unsafe, first.unsafe)
  np.testing.assert_allclose(again.points, first.points, rtol=1e-6)


def test_a_shard_of_unreadable_images_only_is_kept_empty(model, images,
                                                         tmp_path):
  out = tmp_path / "idx"
  manifest = build_lib.build(model, out, images=str(images), shard_size=1,
                             approx="none", progress_bar=False)
  assert manifest["shards"][0] == {"file": gallery.shard_name(0), "count": 0}
  assert manifest["count"] == 7 and len(manifest["skipped"]) == 1
  assert hysac_jax.index.open(out).labels == readable(images)


def test_a_corrupt_shard_is_named_in_one_line(capsys, built, images,
                                              tmp_path):
  broken = tmp_path / "idx"
  shutil.copytree(built, broken)
  shard = broken / gallery.shard_name(1)
  data = shard.read_bytes()
  for content in (data[:len(data) // 2], data[:-40] + b"\0" * 40,
                  b"garbage"):
    shard.write_bytes(content)
    code, lines, err = run_cli(capsys, "search", "--index", broken, "--text",
                               "a cat")
    assert code == 1
    (line,) = err
    assert line.startswith(SEARCH_PROG) and f"shard {shard}" in line
    assert lines[0]["index"] == str(broken)
  # A readable shard holding a NaN point fails closed, named too.
  good = gallery.read_shard(built / gallery.shard_name(1))
  good["points"][0, 0] = np.nan
  gallery.write_shard(broken, 1, *(good[k] for k in gallery.SHARD_KEYS))
  code, _, (line,) = run_cli(capsys, "search", "--index", broken, "--text",
                             "a cat")
  assert code == 1 and f"shard {shard}" in line and "non-finite" in line


def test_cli_errors_are_one_line(capsys, built, model_dir, images, tmp_path,
                                 tmp_path_factory):
  other = tiny_runs.save_converted(tmp_path_factory.mktemp("other"), seed=1,
                                   lora_b_scale=0.1, curv=CURV, alpha=0.3)
  (tmp_path / "empty").mkdir()
  (tmp_path / "blank.txt").write_text("\n \n")
  build = ["build", "--model", model_dir, "--quiet", "--out"]
  cases = [
      (["search", "--index", tmp_path / "nope", "--text", "a"], 1,
       "is missing"),
      (["search", "--index", built, "--model", other, "--text", "a"], 1,
       "was built with another model"),
      (["search", "--index", built, "--text", "a", "--top-k", "0"], 2,
       "--top-k must be at least 1"),
      (["search", "--text", "a"], 2, "--index"),
      ([*build, tmp_path / "i1", "--images", tmp_path / "empty"], 1,
       "holds no image file"),
      ([*build, tmp_path / "i2", "--captions", tmp_path / "blank.txt"], 1,
       "holds no caption"),
      ([*build, built, "--images", images], 1, "is not empty"),
      ([*build, tmp_path / "i3", "--images", images, "--shard-size", "0"], 2,
       "--shard-size"),
  ]
  for argv, want_code, message in cases:
    try:
      code, _, err = run_cli(capsys, *argv)
    except SystemExit as e:  # argparse's usage errors
      code, err = e.code, [l for l in capsys.readouterr().err.splitlines()
                           if "error" in l]
    assert code == want_code, argv
    (line,) = err
    assert ": error: " in line and message in line, (argv, line)


def test_a_partial_build_of_another_model_is_refused(
    capsys, model_dir, images, tmp_path, tmp_path_factory):
  out = tmp_path / "idx"
  other = tiny_runs.save_converted(tmp_path_factory.mktemp("other2"),
                                   seed=2, lora_b_scale=0.1, curv=CURV,
                                   alpha=0.3)
  gallery.begin(out, {"model": "0123", "threshold": None})
  code, _, (line,) = run_cli(capsys, "build", "--model", other, "--images",
                             images, "--out", out, "--quiet")
  assert code == cli.EXIT_ERROR
  assert "partial build" in line and "another model" in line
  # Without bounds the items have no flag, and --safe-only refuses.
  shutil.rmtree(gallery.building_dir(out))
  (tmp_path / "c.txt").write_text("a cat\n\na dog\n")
  code, _, _ = run_cli(capsys, "build", "--model", model_dir, "--captions",
                       tmp_path / "c.txt", "--out", out, "--quiet")
  assert code == 0
  code, lines, (line,) = run_cli(capsys, "search", "--index", out, "--text",
                                 "a cat", "--safe-only")
  assert code == 1 and "--safe-only needs unsafe flags" in line
  code, (rec,), _ = run_cli(capsys, "search", "--index", out, "--text",
                            "a cat")
  assert code == 0 and rec["top_k"][0]["label"] == "a cat"
  assert rec["top_k"][0]["unsafe"] is None
