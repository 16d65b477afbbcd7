"""The predict CLI (hysac_jax/predict.py) on valid and invalid inputs."""

import json
import math
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from hysac_jax import cli
from hysac_jax import export
from hysac_jax import predict
from hysac_jax import safety
from hysac_jax import serving
from hysac_jax.data import preprocess
from hysac_jax.evaluation import embed as embed_lib
import tiny_runs

CURV = 0.7
CAPTIONS = ["a red square on grass", "two blue circles", "a green triangle",
            "a yellow star at night", "a black cat", "an empty street"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  """A converted tiny HySAC (LoRA with non-zero B, curv 0.7), no bounds."""
  return tiny_runs.save_converted(tmp_path_factory.mktemp("model"), seed=0,
                                  lora_b_scale=0.1, curv=CURV, alpha=0.3)


@pytest.fixture(scope="module")
def live(model_dir):
  """The LoRA (unmerged) model of `model_dir`."""
  return serving.load_model(model_dir, merge_lora=False)


def png_header_only(path, width, height):
  """A PNG whose header claims width x height (8-bit RGB) and no pixels:
  enough for PIL's decompression-bomb check, which runs on open."""
  def chunk(kind, data):
    return (struct.pack(">I", len(data)) + kind + data +
            struct.pack(">I", zlib.crc32(kind + data)))
  ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
  path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) +
                   chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """Two readable images (RGB, grayscale), a corrupt and a truncated one,
  and a 14000 x 14000 one beyond PIL's decompression-bomb limit."""
  d = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (40, 50, 3), np.uint8)).save(
      d / "rgb.png")
  Image.fromarray(rng.integers(0, 256, (60, 45), np.uint8)).save(
      d / "gray.jpg")
  (d / "corrupt.png").write_bytes(b"this is not an image")
  (d / "truncated.png").write_bytes((d / "rgb.png").read_bytes()[:60])
  png_header_only(d / "bomb.png", 14000, 14000)
  (d / "captions.txt").write_text("\n".join(CAPTIONS[:3]) + "\n\n" +
                                  "\n".join(CAPTIONS[3:]) + "\n")
  return d


def dist0_f64(x, c):
  """SPEC §1 distance from the origin, float64."""
  x = np.asarray(x, np.float64)
  return np.arcsinh(math.sqrt(c) * np.linalg.norm(x, axis=-1)) / math.sqrt(c)


def pairwise_dist_f64(x, y, c):
  """SPEC §1 Lorentz distance of all pairs, float64."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  xt = np.sqrt(1 / c + np.sum(x * x, -1))[:, None]
  yt = np.sqrt(1 / c + np.sum(y * y, -1))[None, :]
  return np.arccosh(np.maximum(c * (xt * yt - x @ y.T), 1.0)) / math.sqrt(c)


def threshold_f64(b, c):
  return b + math.tanh((b - 0.8) / c) + 1


def run(capsys, *argv):
  code = predict.main([str(a) for a in argv])
  out = capsys.readouterr().out
  return code, [json.loads(line) for line in out.splitlines()]


@pytest.fixture(scope="module")
def bounds_file(live, files, tmp_path_factory):
  """Bounds whose text and image thresholds both fall between the inputs'
  distances, so that both verdicts occur."""
  img = live.encode_image(np.stack([preprocess.clip_preprocess(
      (files / n).read_bytes(), 32) for n in ("rgb.png", "gray.jpg")]))
  txt = live.encode_text(CAPTIONS)
  d = np.sort(dist0_f64(np.concatenate([img, txt]), CURV))
  mid = (d[len(d) // 2 - 1] + d[len(d) // 2]) / 2
  lo, hi = -50.0, 50.0
  for _ in range(200):  # b' is increasing in b
    b = (lo + hi) / 2
    lo, hi = (b, hi) if threshold_f64(b, CURV) < mid else (lo, b)
  stats = {"avg": lo - 0.3, "low_05": lo - 0.6, "up_95": lo}
  path = tmp_path_factory.mktemp("bounds") / "bounds.json"
  safety.save_bounds({g: dict(stats) for g in safety.GROUPS}, path)
  return path


def test_mixed_valid_and_invalid_inputs_answer_each_item_in_order(
    capsys, model_dir, live, files, bounds_file):
  """Answers in command-line order (the flags interleaved and repeated);
  a bad item, even an image PIL refuses as a decompression bomb, is
  answered with an error and the batch goes on: exit 3, partial."""
  given = [("image", files / "rgb.png"), ("image", files / "missing.png"),
           ("text", CAPTIONS[0]), ("text", ""),
           ("image", files / "corrupt.png"), ("image", files / "bomb.png"),
           ("image", files / "gray.jpg"), ("image", files / "truncated.png"),
           ("image", files), ("text", "   "), ("text", CAPTIONS[4])]
  argv = []
  for i, (kind, value) in enumerate(given):
    if i == 0 or given[i - 1][0] != kind:
      argv.append(f"--{kind}")
    argv.append(value)
  code, lines = run(capsys, "--model", model_dir, "--bounds", bounds_file,
                    *argv)
  assert code == 3
  assert [(r["type"], r["input"]) for r in lines] == [
      (k, str(v)) for k, v in given]
  errors = {r["input"]: r["error"] for r in lines if "error" in r}
  assert errors[str(files / "missing.png")] == (
      f"image file not found: {files / 'missing.png'}")
  assert errors[str(files / "corrupt.png")].startswith(
      f"unreadable image {files / 'corrupt.png'}")
  assert errors[str(files / "truncated.png")].startswith(
      f"unreadable image {files / 'truncated.png'}")
  assert "is a directory" in errors[str(files)]
  assert errors[str(files / "bomb.png")].startswith(
      f"unreadable image {files / 'bomb.png'}: DecompressionBombError")
  assert errors[""] == errors["   "] == "empty text"
  assert len(errors) == 7

  bounds = safety.load_bounds(bounds_file)
  b_text = threshold_f64(bounds["S"]["up_95"], CURV)
  b_image = threshold_f64(bounds["V"]["up_95"], CURV)
  good = [r for r in lines if "error" not in r]
  assert [r["input"] for r in good] == [str(files / "rgb.png"), CAPTIONS[0],
                                        str(files / "gray.jpg"), CAPTIONS[4]]
  pixels = np.stack([preprocess.clip_preprocess(
      (files / n).read_bytes(), 32) for n in ("rgb.png", "gray.jpg")])
  image, text = live.encode_image(pixels), live.encode_text(
      [CAPTIONS[0], CAPTIONS[4]])
  emb = np.stack([image[0], text[0], image[1], text[1]])
  dist = dist0_f64(emb, CURV)
  for rec, d, b in zip(good, dist, [b_image, b_text] * 2):
    assert math.isclose(rec["distance_from_origin"], d, rel_tol=1e-5)
    assert rec["unsafe"] == (d > b)
    assert math.isclose(rec["threshold"], b, rel_tol=1e-6)
    assert math.isclose(rec["unsafe_score"], d - b, abs_tol=1e-5)
    assert "embedding" not in rec and "top_k" not in rec


def test_a_fifo_named_as_an_image_gets_an_error_and_the_next_image_is_answered(
    model_dir, files, tmp_path):
  """`python -m hysac_jax.predict --image FIFO ok.png` (nobody writes to
  the FIFO): no hang, an error record naming the FIFO, ok.png answered,
  exit 3 (partial)."""
  fifo = tmp_path / "fifo.png"
  os.mkfifo(fifo)
  ok = files / "rgb.png"
  out = subprocess.run(
      [sys.executable, "-m", "hysac_jax.predict", "--model", str(model_dir),
       "--image", str(fifo), str(ok)],
      cwd=tiny_runs.ROOT, env=tiny_runs.run_env(), capture_output=True,
      text=True, timeout=240)
  assert out.returncode == cli.EXIT_PARTIAL == 3, out.stderr[-2000:]
  assert "Traceback" not in out.stderr
  lines = [json.loads(line) for line in out.stdout.splitlines()]
  assert [(r["type"], r["input"]) for r in lines] == [
      ("image", str(fifo)), ("image", str(ok))]
  assert str(fifo) in lines[0]["error"] and "FIFO" in lines[0]["error"]
  assert "unsafe" not in lines[0]
  assert "error" not in lines[1]
  assert math.isfinite(lines[1]["distance_from_origin"])


def test_without_bounds_unsafe_is_null_and_a_note_says_why(capsys, model_dir,
                                                           live):
  code, lines = run(capsys, "--model", model_dir, "--text", CAPTIONS[1],
                    "--embedding")
  assert code == 0
  (rec,) = lines
  assert rec["unsafe"] is None and "no bounds" in rec["note"]
  np.testing.assert_allclose(rec["embedding"],
                             live.encode_text([CAPTIONS[1]])[0], atol=1e-5,
                             rtol=1e-5)


def test_pool_retrievals_with_and_without_traversal(capsys, model_dir, live,
                                                    files, bounds_file,
                                                    tmp_path):
  saved = tmp_path / "pool.npz"
  queries = CAPTIONS  # the bounds put b' between them: some are moved
  code, lines = run(capsys, "--model", model_dir, "--bounds", bounds_file,
                    "--pool", files / "captions.txt", "--save-pool", saved,
                    "--top-k", 4, "--redirect", "--embedding",
                    "--text", *queries)
  assert code == 0
  pool = live.encode_text(CAPTIONS)
  q = live.encode_text(queries)
  bound = safety.load_bounds(bounds_file)["S"]["up_95"]
  b = threshold_f64(bound, CURV)
  moved = np.asarray(safety.traverse_to_safe(q, CURV, bound))
  for rec, query, query_moved in zip(lines, q, moved):
    for key, point in (("top_k", query), ("top_k_traversed", query_moved)):
      d = pairwise_dist_f64(point[None], pool, CURV)[0]
      order = np.argsort(d, kind="stable")[:4]
      assert [h["index"] for h in rec[key]] == order.tolist(), key
      assert [h["label"] for h in rec[key]] == [CAPTIONS[i] for i in order]
      np.testing.assert_allclose([h["distance"] for h in rec[key]], d[order],
                                 atol=2e-3)
    # --redirect reports the traversed point: moved iff farther than b'.
    d0 = dist0_f64(query[None], CURV)[0]
    assert rec["redirected"]["moved"] == (d0 > b)
    assert math.isclose(rec["redirected"]["distance_from_origin"],
                        min(d0, b), rel_tol=1e-4)
    np.testing.assert_allclose(rec["embedding"], query_moved, atol=1e-5,
                               rtol=1e-5)
  assert [r["top_k"][0]["label"] for r in lines] == CAPTIONS  # itself first
  assert {r["redirected"]["moved"] for r in lines} == {True, False}

  # The saved pool gives the same answers without re-embedding.
  code, again = run(capsys, "--model", model_dir, "--bounds", bounds_file,
                    "--pool", saved, "--top-k", 4, "--redirect",
                    "--embedding", "--text", *queries)
  assert code == 0 and again == lines


def test_image_query_against_caption_pool_on_an_exported_model(
    capsys, model_dir, files, bounds_file, tmp_path):
  """An orbax export answers like the directory it was exported from."""
  src = export.load_source(model_dir, bounds_file)
  export.export(src, tmp_path, ("orbax",))
  argv = ["--image", files / "rgb.png", "--text", CAPTIONS[3], "--pool",
          files / "captions.txt", "--top-k", 2]
  code, direct = run(capsys, "--model", model_dir, "--bounds", bounds_file,
                     *argv)
  assert code == 0
  code, served = run(capsys, "--model", tmp_path / "orbax", *argv)
  assert code == 0
  for a, b in zip(direct, served):
    assert a.keys() == b.keys() and a["unsafe"] == b["unsafe"]
    assert math.isclose(a["distance_from_origin"], b["distance_from_origin"],
                        rel_tol=1e-5)
    assert [h["index"] for h in a["top_k"]] == [h["index"] for h in b["top_k"]]
    assert [h["index"] for h in a["top_k_traversed"]] == [
        h["index"] for h in b["top_k_traversed"]]


def run_failing(capsys, *argv):
  """(exit code, stdout JSON records, stderr lines) of a failing call."""
  code = predict.main([str(a) for a in argv])
  captured = capsys.readouterr()
  return (code, [json.loads(line) for line in captured.out.splitlines()],
          captured.err.splitlines())


def test_model_dir_of_the_wrong_kind_gives_an_error_line(capsys, files,
                                                        tmp_path):
  (tmp_path / "config.json").write_text('{"model_type": "clip"}')
  for path, message in ((files / "rgb.png", "is a file"),
                        (tmp_path, "plain Hugging Face CLIP directory"),
                        (tmp_path / "nope", "is missing")):
    code, lines, err = run_failing(capsys, "--model", path, "--text", "a cat")
    assert code == 1
    (rec,) = lines
    assert rec["model"] == str(path) and message in rec["error"]
    (line,) = err
    assert line.startswith("python -m hysac_jax.predict: error: ")
    assert message in line


def test_pool_from_another_model_is_refused(capsys, model_dir, tmp_path):
  bad = tmp_path / "other.npz"
  predict.save_pool(predict.Pool(np.zeros((2, 64), np.float32), ["a", "b"],
                                 "text", 2.5), bad)
  code, lines, err = run_failing(capsys, "--model", model_dir, "--pool", bad,
                                 "--text", "a cat")
  assert code == 1 and "embedded by another model" in lines[0]["error"]
  assert lines[0]["pool"] == str(bad) and len(err) == 1


def test_corrupt_or_truncated_npz_pool_gives_one_error_line(capsys, model_dir,
                                                            tmp_path):
  good = tmp_path / "good.npz"
  predict.save_pool(predict.Pool(np.zeros((2, 64), np.float32), ["a", "b"],
                                 "text", CURV), good)
  data = good.read_bytes()
  for name, content in (("truncated.npz", data[:len(data) // 2]),
                        ("garbage.npz", b"not a zip archive at all")):
    bad = tmp_path / name
    bad.write_bytes(content)
    code, lines, err = run_failing(capsys, "--model", model_dir, "--pool",
                                   bad, "--text", "a cat")
    assert code == 1, name
    (rec,) = lines
    assert rec["pool"] == str(bad)
    assert rec["error"].startswith(f"pool {bad} is not a readable .npz")
    (line,) = err
    assert line.startswith("python -m hysac_jax.predict: error: pool ")
  code, (rec,), _ = run_failing(capsys, "--model", model_dir, "--pool",
                                tmp_path, "--text", "a cat")
  assert code == 1 and rec["error"].startswith(f"pool {tmp_path} is a "
                                               "directory: expected a caption")


def test_encode_batched_pads_to_few_shapes_and_keeps_order():
  seen = []

  def encode(x):
    seen.append(len(x))
    return x[:, :2] * 2

  x = np.arange(70 * 3, dtype=np.float32).reshape(70, 3)
  out = embed_lib.encode_batched(encode, x, batch=32)
  np.testing.assert_array_equal(out, x[:, :2] * 2)
  assert seen == [32, 32, 8]
