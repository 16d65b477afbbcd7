"""Zero-shot classification (hysac_jax/evaluation/zeroshot.py) against a
float64 NumPy brute force written from the formulas of SPEC.md §1."""

import jax
import numpy as np
import pytest

from hysac_jax.evaluation import zeroshot

CURV = 0.8


# --- float64 references, from the formulas (no hysac_jax geometry) --------


def ref_exp0(v, c):
  n = np.linalg.norm(v, axis=-1, keepdims=True)
  r = np.sqrt(c) * n
  return np.where(n > 0, np.sinh(r) / np.where(r > 0, r, 1), 1.0) * v


def ref_log0(x, c):
  n = np.linalg.norm(x, axis=-1, keepdims=True)
  r = np.sqrt(c) * n
  return np.where(n > 0, np.arcsinh(r) / np.where(r > 0, r, 1), 1.0) * x


def ref_dist(x, y, c):
  """acosh(-c <x,y>_L) / sqrt(c), one pair, with <x,y>_L = x.y - x_t y_t."""
  xt = np.sqrt(1 / c + x @ x)
  yt = np.sqrt(1 / c + y @ y)
  return np.arccosh(max(-c * (x @ y - xt * yt), 1.0)) / np.sqrt(c)


def ref_scores(images, classes, c, mode):
  s = np.empty((len(images), len(classes)))
  for i, x in enumerate(images):
    for j, y in enumerate(classes):
      if mode == "hyp":
        s[i, j] = -ref_dist(x, y, c)
      else:
        s[i, j] = x @ y / (np.linalg.norm(x) * np.linalg.norm(y))
  return s


def ref_class_embedding(prompts, c, mode):
  if mode == "hyp":
    return ref_exp0(ref_log0(prompts, c).mean(axis=0), c)
  u = prompts / np.linalg.norm(prompts, axis=-1, keepdims=True)
  m = u.mean(axis=0)
  return m / np.linalg.norm(m)


def ref_metrics(scores, labels, num_classes):
  """Ranks by a loop: classes scored higher, or equal with a lower index."""
  n = len(labels)
  ranks = np.empty(n, int)
  preds = np.empty(n, int)
  for i in range(n):
    t = labels[i]
    ranks[i] = sum(1 for j in range(num_classes)
                   if scores[i, j] > scores[i, t]
                   or (scores[i, j] == scores[i, t] and j < t))
    best = 0
    for j in range(num_classes):
      if scores[i, j] > scores[i, best]:
        best = j
    preds[i] = best
  recalls = []
  for k in range(num_classes):
    members = [i for i in range(n) if labels[i] == k]
    if members:
      recalls.append(np.mean([preds[i] == k for i in members]))
  return {"top1": np.mean(ranks < 1), "top5": np.mean(ranks < 5),
          "mean_per_class_recall": np.mean(recalls), "preds": preds}


def assert_report_matches(got, want, labels, num_classes):
  """A zero-shot report against `ref_metrics`: metrics and confusion."""
  for key in ("top1", "top5", "mean_per_class_recall"):
    assert got[key] == pytest.approx(want[key], abs=1e-12), key
  confusion = np.zeros((num_classes, num_classes), int)
  for t, p in zip(labels, want["preds"]):
    confusion[t, p] += 1
  np.testing.assert_array_equal(got["confusion"], confusion)


def points(rng, n, d, scale=0.6):
  return ref_exp0(scale * rng.normal(size=(n, d)), CURV)


def min_gap(scores):
  """Smallest gap between two scores of one row, relative to the scale."""
  s = np.sort(scores, axis=1)
  return np.min(np.diff(s, axis=1)) / np.max(np.abs(scores))


# --- class embeddings ---------------------------------------------------


@pytest.mark.parametrize("mode", ["hyp", "euc"])
@pytest.mark.parametrize("counts", [(1, 3, 7), (4, 4, 4)])  # loop, batched
def test_class_embedding_matches_float64_formula(mode, counts):
  rng = np.random.default_rng(0)
  prompts = [points(rng, p, 5) for p in counts]
  with jax.enable_x64(True):
    got = np.asarray(zeroshot.class_embeddings(prompts, CURV, mode))
    assert got.dtype == np.float64
  want = np.stack([ref_class_embedding(p, CURV, mode) for p in prompts])
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


def test_class_embedding_of_one_prompt_is_the_prompt_and_float32_is_kept():
  rng = np.random.default_rng(1)
  x = points(rng, 1, 6).astype(np.float32)
  got = np.asarray(zeroshot.class_embedding(x, CURV, "hyp"))
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, x[0], rtol=1e-5)


def test_hyperbolic_mean_differs_from_the_euclidean_mean_of_points():
  """The tangent-space average is not the plain average of the points."""
  rng = np.random.default_rng(2)
  p = points(rng, 4, 3, scale=2.0)
  with jax.enable_x64(True):
    got = np.asarray(zeroshot.class_embedding(p, CURV, "hyp"))
  assert np.linalg.norm(got - p.mean(axis=0)) > 1e-2


# --- metrics --------------------------------------------------------------


@pytest.mark.parametrize("mode", ["hyp", "euc"])
def test_topk_and_mean_per_class_recall_match_bruteforce(mode):
  rng = np.random.default_rng(3)
  n, c, d = 90, 9, 6
  classes = points(rng, c, d)
  labels = rng.integers(0, c, n)
  # Images near their class, with noise, so top-1 is neither 0 nor 1.
  images = ref_exp0(ref_log0(classes, CURV)[labels]
                    + 0.8 * rng.normal(size=(n, d)), CURV)
  names = [f"class{i}" for i in range(c)]
  scores = ref_scores(images, classes, CURV, mode)
  want = ref_metrics(scores, labels, c)
  assert 0.1 < want["top1"] < 0.95  # the fixture discriminates

  with jax.enable_x64(True):
    got = zeroshot.evaluate(images, labels, classes, names, CURV, mode,
                            chunk_size=16)
  assert_report_matches(got, want, labels, c)
  assert got["chance_top1"] == pytest.approx(1 / c)

  # float32, what users run: same ranks when no two scores are near-ties.
  assert min_gap(scores) > 1e-5
  got32 = zeroshot.evaluate(images.astype(np.float32), labels,
                            classes.astype(np.float32), names, CURV, mode)
  for key in ("top1", "top5", "mean_per_class_recall"):
    assert got32[key] == pytest.approx(want[key], abs=1e-12), key


def test_ties_rank_the_lower_class_index_first():
  rng = np.random.default_rng(4)
  cls = points(rng, 1, 4)
  classes = np.concatenate([cls, cls, points(rng, 1, 4)])  # 0 and 1 tie
  images = np.repeat(cls, 2, axis=0)
  ranks, preds = zeroshot.true_class_ranks(images, classes, [0, 1], CURV)
  np.testing.assert_array_equal(ranks, [0, 1])
  np.testing.assert_array_equal(preds, [0, 0])


def test_chunk_size_and_padding_do_not_change_the_ranks():
  rng = np.random.default_rng(5)
  images, classes = points(rng, 23, 5), points(rng, 6, 5)
  labels = rng.integers(0, 6, 23)
  a = zeroshot.true_class_ranks(images, classes, labels, CURV, chunk_size=4)
  b = zeroshot.true_class_ranks(images, classes, labels, CURV,
                                chunk_size=1000)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])


def test_classes_without_images_are_left_out_of_mean_per_class_recall():
  m = zeroshot.metrics_from_ranks([0, 1, 0], [0, 0, 2], [0, 1, 2], 4)
  assert m["mean_per_class_recall"] == pytest.approx((1 + 0 + 1) / 3)
  assert m["per_class_recall"][3] is None
  assert m["top5"] == 1.0


def test_labels_out_of_range_are_refused():
  with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
    zeroshot.true_class_ranks(np.zeros((2, 3)), np.zeros((2, 3)), [0, 2],
                              CURV)


def test_report_files_and_confusion_plot(tmp_path):
  rng = np.random.default_rng(6)
  classes = points(rng, 3, 4)
  report = zeroshot.evaluate(points(rng, 12, 4), rng.integers(0, 3, 12),
                             classes, ["a", "b", "c"], CURV)
  paths = zeroshot.write_report(report, tmp_path)
  assert set(paths) == {"json", "md", "confusion"}
  assert "| a |" in (tmp_path / "report.md").read_text()
  assert (tmp_path / "confusion_matrix.png").stat().st_size > 0


def test_class_embeddings_take_one_call_per_prompt_count(monkeypatch):
  # Linear time without timing: C classes cost one batched call per
  # distinct prompt count (here 2), however large C is.
  calls = []
  real = zeroshot._mean_prompt
  monkeypatch.setattr(zeroshot, "_mean_prompt",
                      lambda x, c, m: calls.append(x.shape) or real(x, c, m))
  rng = np.random.default_rng(0)
  text = points(rng, 3 * 500, 8)
  groups = [text[3 * i:3 * i + (3 if i % 2 else 2)] for i in range(500)]
  out = zeroshot.class_embeddings(groups, 1.0, "hyp", progress=False)
  assert out.shape == (500, 8)
  assert sorted(calls) == [(250, 2, 8), (250, 3, 8)]
  np.testing.assert_allclose(
      np.asarray(out[7]),
      np.asarray(zeroshot.class_embedding(groups[7], 1.0, "hyp")), atol=1e-6)


def test_markdown_class_names_keep_one_row_each():
  report = {"k": [1], "dataset": "d", "mode": "hyp", "n": 2,
            "num_classes": 2, "top1": 0.5, "mean_per_class_recall": 0.5,
            "chance_top1": 0.5,
            "per_class": {"a\nb": {"n": 1, "recall": 1.0},
                          "c|d": {"n": 1, "recall": 0.0}}}
  md = zeroshot.format_markdown(report)
  assert "| a b | 1 | 100.00 |" in md
  assert "| c\\|d | 1 | 0.00 |" in md
  rows = [line for line in md.splitlines() if line.startswith("|")]
  assert len(rows) == 3 + 4  # summary: header, rule, row; classes: 2 rows


# --- nearest-prompt pooling -----------------------------------------------


def ref_nearest_scores(images, prompt_groups, c, mode):
  """(N, C): each class's best prompt score, by a loop over prompts."""
  return np.stack([ref_scores(images, g, c, mode).max(axis=1)
                   for g in prompt_groups], axis=1)


@pytest.mark.parametrize("mode", ["hyp", "euc"])
def test_nearest_pooling_matches_float64_bruteforce(mode):
  rng = np.random.default_rng(7)
  c, d = 5, 6
  # Classes of 1-4 prompts scattered widely: the nearest prompt, not the
  # mean, decides.
  groups = [points(rng, p, d, scale=1.2) for p in (1, 3, 4, 2, 3)]
  labels = rng.integers(0, c, 70)
  picks = [groups[t][rng.integers(len(groups[t]))] for t in labels]
  images = ref_exp0(ref_log0(np.stack(picks), CURV)
                    + 0.7 * rng.normal(size=(70, d)), CURV)
  names = [f"class{i}" for i in range(c)]
  scores = ref_nearest_scores(images, groups, CURV, mode)
  want = ref_metrics(scores, labels, c)
  assert 0.1 < want["top1"] < 0.95  # the fixture discriminates
  with jax.enable_x64(True):
    got = zeroshot.evaluate_prompts(images, labels, groups, names, CURV,
                                    mode, pooling="nearest", chunk_size=16)
  assert got["pooling"] == "nearest"
  assert_report_matches(got, want, labels, c)
  # float32: the same ranks when no two class scores are near-ties.
  assert min_gap(scores) > 1e-5
  got32 = zeroshot.evaluate_prompts(
      images.astype(np.float32), labels,
      [g.astype(np.float32) for g in groups], names, CURV, mode,
      pooling="nearest")
  for key in ("top1", "top5", "mean_per_class_recall"):
    assert got32[key] == pytest.approx(want[key], abs=1e-12), key


def test_nearest_pooling_finds_a_sub_concept_the_mean_blurs():
  """Class 0 is two far-apart prompts, -2 and 2, whose mean is the origin;
  class 1 is one prompt at 1.2. Images at 2 and 1.8 lie nearer 1.2 than the
  origin, but nearer class 0's prompt 2 than 1.2 (1-D, where the Lorentz
  distance is |asinh(sqrt(c) a) - asinh(sqrt(c) b)| / sqrt(c), monotone)."""
  groups = [np.array([[-2.0], [2.0]]), np.array([[1.2]])]
  images = np.array([[2.0], [1.8]])
  labels = [0, 0]
  with jax.enable_x64(True):
    mean = zeroshot.evaluate_prompts(images, labels, groups, ["a", "b"],
                                     CURV, "hyp", pooling="mean")
    nearest = zeroshot.evaluate_prompts(images, labels, groups, ["a", "b"],
                                        CURV, "hyp", pooling="nearest")
  assert mean["top1"] == 0.0 and mean["pooling"] == "mean"
  assert nearest["top1"] == 1.0


def test_nearest_pooling_ties_chunks_and_bad_input():
  rng = np.random.default_rng(8)
  p = points(rng, 2, 4)
  # Class 1's best prompt is class 0's: a tie, ranked to the lower index.
  groups = [p, np.concatenate([p[:1], points(rng, 1, 4)])]
  ranks, preds = zeroshot.nearest_prompt_ranks(p[:1].repeat(2, 0), groups,
                                               [0, 1], CURV)
  np.testing.assert_array_equal(ranks, [0, 1])
  np.testing.assert_array_equal(preds, [0, 0])

  images, labels = points(rng, 23, 4), rng.integers(0, 2, 23)
  a = zeroshot.nearest_prompt_ranks(images, groups, labels, CURV,
                                    chunk_size=4)
  b = zeroshot.nearest_prompt_ranks(images, groups, labels, CURV,
                                    chunk_size=1000)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])

  with pytest.raises(ValueError, match="class 1: prompt embeddings"):
    zeroshot.nearest_prompt_ranks(images, [p, p[:0]], labels, CURV)
  with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
    zeroshot.nearest_prompt_ranks(images, groups, labels + 1, CURV)
  with pytest.raises(ValueError, match="different widths"):
    zeroshot.nearest_prompt_ranks(images, [p, p[:, :3]], labels, CURV)
  with pytest.raises(ValueError, match="unknown prompt pooling 'max'"):
    zeroshot.evaluate_prompts(images, labels, groups, ["a", "b"], CURV,
                              pooling="max")
