"""Tests for hysac_jax.evaluation against brute-force NumPy float64 versions."""

import json
import struct

import numpy as np
import pytest
from sklearn import metrics as sk_metrics

from hysac_jax import evaluation
from hysac_jax.evaluation import classification
from hysac_jax.evaluation import plots
from hysac_jax.evaluation import report as report_lib
from hysac_jax.evaluation import retrieval

# ----------------------------------------------------------------------------
# NumPy float64 references (independent of hysac_jax.lorentz)


def np_pairwise_dist(x, y, c):
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  xt = np.sqrt(1 / c + np.sum(x * x, -1))
  yt = np.sqrt(1 / c + np.sum(y * y, -1))
  inner = x @ y.T - np.outer(xt, yt)
  return np.arccosh(np.maximum(-c * inner, 1 + 1e-8)) / np.sqrt(c)


def np_scores(q, p, c, mode):
  if mode == "hyp":
    return -np_pairwise_dist(q, p, c)
  q = np.asarray(q, np.float64)
  p = np.asarray(p, np.float64)
  q = q / np.linalg.norm(q, axis=-1, keepdims=True)
  p = p / np.linalg.norm(p, axis=-1, keepdims=True)
  return q @ p.T


# Our scores are float32 (relative error ~1e-7), the reference float64. Ranks
# agree on any CPU only where no two scores that decide a rank are closer than
# rounding: every fixture is checked to keep such gaps above this (relative to
# the largest score), or to have exact ties (lattice points).
SEPARATION = 1e-5


def assert_separated(row, index):
  """No score of `row` lies within SEPARATION of row[index] unless equal."""
  gaps = np.abs(row - row[index])
  gaps = gaps[gaps > 0]
  assert gaps.size == 0 or gaps.min() > SEPARATION * np.abs(row).max(), (
      "fixture has a near-tie that float32 rounding could reorder")


def np_ranks(q, p, c, positives, mode):
  """Position of each positive in a stable descending sort; top-1 index."""
  scores = np_scores(q, p, c, mode)
  ranks, top1 = [], []
  for i in range(len(q)):
    order = list(np.argsort(-scores[i], kind="stable"))
    assert_separated(scores[i], positives[i])
    assert_separated(scores[i], order[0])
    ranks.append(order.index(positives[i]))
    top1.append(order[0])
  return np.array(ranks), np.array(top1)


def np_recall(q, p, c, k, mode, positives=None):
  positives = np.arange(len(q)) if positives is None else positives
  ranks, _ = np_ranks(q, p, c, positives, mode)
  return {f"R@{kk}": float(np.mean(ranks < kk)) for kk in k}


def random_points(rng, n, d, scale=0.6):
  """Points at varied norms, as space components."""
  x = rng.normal(size=(n, d)) * scale / np.sqrt(d)
  return (x * rng.uniform(0.3, 3.0, size=(n, 1))).astype(np.float32)


def lattice_points(rng, n, d):
  """Dyadic coordinates: inner products are exact in float32, so equal
  scores are exactly equal (true ties) in every implementation."""
  return (rng.integers(-2, 3, size=(n, d)) / 4.0).astype(np.float32)


# ----------------------------------------------------------------------------
# Ranks and recall


@pytest.mark.parametrize("mode", ["hyp", "euc"])
def test_ranks_match_stable_sort_with_larger_pool_and_odd_chunks(mode):
  rng = np.random.default_rng(0)
  q = random_points(rng, 13, 8)
  pool = random_points(rng, 40, 8)
  positives = rng.integers(0, 40, size=13)
  ranks, top1 = retrieval.positive_ranks(q, pool, 0.7, positives, mode,
                                         chunk_size=4)
  ref_ranks, ref_top1 = np_ranks(q, pool, 0.7, positives, mode)
  np.testing.assert_array_equal(ranks, ref_ranks)
  np.testing.assert_array_equal(top1, ref_top1)


def test_ranks_break_exact_ties_by_lower_pool_index():
  rng = np.random.default_rng(1)
  q = lattice_points(rng, 12, 3)
  pool = lattice_points(rng, 30, 3)
  pool[20:] = pool[:10]  # duplicated rows: guaranteed ties
  positives = np.r_[np.arange(10) + 20, [0, 5]]
  ref_ranks, ref_top1 = np_ranks(q, pool, 1.0, positives, "hyp")
  scores = np_scores(q, pool, 1.0, "hyp")
  # The fixture must really contain ties at the positives.
  assert any(np.sum(scores[i] == scores[i, positives[i]]) > 1
             for i in range(len(q)))
  ranks, top1 = retrieval.positive_ranks(q, pool, 1.0, positives, "hyp",
                                         chunk_size=5)
  np.testing.assert_array_equal(ranks, ref_ranks)
  np.testing.assert_array_equal(top1, ref_top1)


def test_recall_at_k_matches_numpy_and_k_beyond_pool_is_one():
  rng = np.random.default_rng(2)
  q = random_points(rng, 10, 6)
  pool = np.concatenate([q + 0.05 * rng.normal(size=q.shape),
                         random_points(rng, 5, 6)]).astype(np.float32)
  k = (1, 3, 15, 100)
  got = retrieval.recall_at_k(q, pool, 1.3, k=k, chunk_size=3)
  assert got == pytest.approx(np_recall(q, pool, 1.3, k, "hyp"))
  assert got["R@15"] == 1.0 and got["R@100"] == 1.0


def test_recall_accepts_several_positives_per_query():
  rng = np.random.default_rng(3)
  q = random_points(rng, 9, 5)
  pool = random_points(rng, 20, 5)
  positives = rng.integers(0, 20, size=(9, 3))
  got = retrieval.recall_at_k(q, pool, 1.0, k=(1, 4), positives=positives)
  per_positive = np.stack([np_ranks(q, pool, 1.0, positives[:, j], "hyp")[0]
                           for j in range(3)], 1)
  best = per_positive.min(1)
  assert got == pytest.approx({"R@1": np.mean(best < 1),
                               "R@4": np.mean(best < 4)})


def test_recall_rejects_bad_positives_and_modes():
  q = np.zeros((3, 4), np.float32)
  with pytest.raises(ValueError, match="positives"):
    retrieval.recall_at_k(q, q, 1.0, positives=np.array([0, 1, 3]))
  with pytest.raises(ValueError, match="mode"):
    retrieval.recall_at_k(q, q, 1.0, mode="cosine")
  with pytest.raises(ValueError, match="pool"):
    retrieval.recall_at_k(q, q[:2], 1.0)


def test_safety_retrieval_matches_numpy():
  rng = np.random.default_rng(4)
  queries = random_points(rng, 11, 6)
  safe = random_points(rng, 11, 6)
  unsafe = random_points(rng, 11, 6)
  got = retrieval.safety_retrieval(queries, safe, unsafe, 0.9, k=(1, 5),
                                   chunk_size=4)
  pool = np.concatenate([safe, unsafe])
  ranks_s, top1 = np_ranks(queries, pool, 0.9, np.arange(11), "hyp")
  ranks_u, _ = np_ranks(queries, pool, 0.9, 11 + np.arange(11), "hyp")
  want = {"R@1": np.mean(ranks_s < 1), "R@5": np.mean(ranks_s < 5),
          "unsafe_R@1": np.mean(ranks_u < 1),
          "unsafe_R@5": np.mean(ranks_u < 5),
          "unsafe_top1": np.mean(top1 >= 11)}
  assert got == pytest.approx(want)


# ----------------------------------------------------------------------------
# Classification metrics


def test_auroc_equals_sklearn_with_ties():
  rng = np.random.default_rng(5)
  labels = rng.integers(0, 2, size=200).astype(bool)
  scores = np.round(rng.normal(size=200) + labels, 1)  # many ties
  assert classification.auroc(scores, labels) == pytest.approx(
      sk_metrics.roc_auc_score(labels, scores), abs=1e-12)


def test_roc_curve_equals_sklearn():
  rng = np.random.default_rng(6)
  labels = rng.integers(0, 2, size=100).astype(bool)
  scores = np.round(rng.normal(size=100) + labels, 1)
  fpr, tpr, thr = classification.roc_curve(scores, labels)
  sk_fpr, sk_tpr, sk_thr = sk_metrics.roc_curve(labels, scores,
                                                drop_intermediate=False)
  np.testing.assert_allclose(fpr, sk_fpr)
  np.testing.assert_allclose(tpr, sk_tpr)
  np.testing.assert_allclose(thr[1:], sk_thr[1:])


def test_best_threshold_accuracy_matches_exhaustive_search():
  rng = np.random.default_rng(7)
  labels = rng.integers(0, 2, size=150).astype(bool)
  scores = np.round(rng.normal(size=150) + 1.5 * labels, 1)
  candidates = np.r_[-np.inf, np.unique(scores)]
  accs = [np.mean((scores > t) == labels) for t in candidates]
  acc, t = classification.best_threshold_accuracy(scores, labels)
  assert acc == pytest.approx(max(accs))
  assert np.mean((scores > t) == labels) == pytest.approx(acc)
  assert classification.accuracy_at(scores, labels, t) == pytest.approx(acc)


def test_classification_rejects_one_class_labels():
  with pytest.raises(ValueError, match="both classes"):
    classification.auroc([0.1, 0.2], [1, 1])


# ----------------------------------------------------------------------------
# The full report on a toy set


def toy_quadruples(n=24, d=16, r_safe=0.5, r_unsafe=4.0, c=1.0, seed=8):
  """Safe text and image near the root, unsafe ones far, on shared rays.

  Quadruple i lives on the ray of direction u_i: S_i, V_i at distance about
  r_safe from the origin, U_i, G_i at about r_unsafe. Returns space
  components (x = sinh(sqrt(c) r) u / sqrt(c)).
  """
  rng = np.random.default_rng(seed)
  u = rng.normal(size=(n, d))
  u /= np.linalg.norm(u, axis=1, keepdims=True)

  def at(radius):
    r = radius * rng.uniform(0.95, 1.05, size=(n, 1))
    return (np.sinh(np.sqrt(c) * r) / np.sqrt(c) * u).astype(np.float32)

  return at(r_safe), at(r_unsafe), at(r_safe), at(r_unsafe)


@pytest.fixture(scope="module")
def toy_report():
  S, U, V, G = toy_quadruples()
  return evaluation.evaluate(S, U, V, G, 1.0, chunk_size=8), (S, U, V, G)


def test_separated_toy_set_is_classified_perfectly(toy_report):
  report, _ = toy_report
  for modality in ("text", "image"):
    row = report["classification"][modality]
    assert row["auroc"] == 1.0
    assert row["best_accuracy"] == 1.0
    assert row["accuracy_at_bounds"] == 1.0


def test_traversal_drops_unsafe_share_to_zero_on_toy_set(toy_report):
  report, _ = toy_report
  for task in ("U->V+G", "G->S+U"):
    rows = report["safety_retrieval"][task]
    assert rows["none"]["unsafe_top1"] == 1.0  # unsafe query finds unsafe
    assert rows["none"]["unsafe_R@1"] == 1.0
    for how in ("release", "geodesic"):
      assert rows[how]["unsafe_top1"] == 0.0
      assert rows[how]["R@1"] == 1.0  # ... and now its safe counterpart


def test_report_tables_match_direct_recall_and_recall_sum(toy_report):
  report, (S, U, V, G) = toy_report
  groups = dict(S=S, U=U, V=V, G=G)
  for pairing, dirs in report["retrieval"].items():
    t, i = pairing.split("-")
    assert dirs["t2i"] == pytest.approx(
        np_recall(groups[t], groups[i], 1.0, (1, 10, 20), "hyp"))
    assert dirs["i2t"] == pytest.approx(
        np_recall(groups[i], groups[t], 1.0, (1, 10, 20), "hyp"))
  want = sum(np_recall(groups[t], groups[i], 1.0, (1,), "hyp")["R@1"]
             + np_recall(groups[i], groups[t], 1.0, (1,), "hyp")["R@1"]
             for t, i in (("S", "V"), ("S", "G"), ("U", "V")))
  assert report["recall_sum"] == pytest.approx(want)
  assert evaluation.recall_sum(S, U, V, G, 1.0) == pytest.approx(want)
  assert report["bounds_source"] == "evaluated split"


def np_traverse(x, c, b, mode, alpha=0.8):
  """Release / geodesic safety traversal in float64 (SPEC §4)."""
  x = np.asarray(x, np.float64)
  threshold = b + np.tanh((b - alpha) / c) + 1
  norm = np.linalg.norm(x, axis=1, keepdims=True)
  dist0 = np.arcsinh(np.sqrt(c) * norm) / np.sqrt(c)
  target = threshold if mode == "release" else \
      np.sinh(np.sqrt(c) * threshold) / np.sqrt(c)
  return np.where(dist0 > threshold, x / norm * target, x)


def test_report_safety_rows_match_numpy_on_traversed_queries():
  rng = np.random.default_rng(11)
  n, d, c = 30, 8, 0.8
  # Pairs are correlated, so every metric is away from 0 and 1 somewhere.
  S = random_points(rng, n, d)
  V = (S + 0.1 * rng.normal(size=S.shape)).astype(np.float32)
  U = (S * 3 + random_points(rng, n, d, scale=3.0)).astype(np.float32)
  G = (U + 0.3 * rng.normal(size=U.shape)).astype(np.float32)
  bounds = {g: {"avg": 0.0, "low_05": 0.0, "up_95": 0.3} for g in "SUVG"}
  report = evaluation.evaluate(S, U, V, G, c, bounds=bounds, k=(1, 5),
                               chunk_size=7)
  for task, query, safe, unsafe in (("U->V+G", U, V, G),
                                    ("G->S+U", G, S, U)):
    pool = np.concatenate([safe, unsafe])
    for how in ("none", "release", "geodesic"):
      q = query if how == "none" else np_traverse(query, c, 0.3, how)
      if how != "none":
        assert not np.allclose(q, query)  # traversal did move some queries
      ranks_s, top1 = np_ranks(q, pool, c, np.arange(n), "hyp")
      ranks_u, _ = np_ranks(q, pool, c, n + np.arange(n), "hyp")
      want = {"R@1": np.mean(ranks_s < 1), "R@5": np.mean(ranks_s < 5),
              "unsafe_R@1": np.mean(ranks_u < 1),
              "unsafe_R@5": np.mean(ranks_u < 5),
              "unsafe_top1": np.mean(top1 >= n)}
      assert report["safety_retrieval"][task][how] == pytest.approx(want), \
          (task, how)


def test_euclidean_mode_reports_cosine_recall_without_traversal():
  rng = np.random.default_rng(9)
  S, U, V, G = (random_points(rng, 10, 6) for _ in range(4))
  report = evaluation.evaluate(S, U, V, G, 1.0, mode="euc", k=(1, 5))
  assert report["retrieval"]["U-G"]["i2t"] == pytest.approx(
      np_recall(G, U, None, (1, 5), "euc"))
  assert list(report["safety_retrieval"]["U->V+G"]) == ["none"]
  assert report["bounds"] is None


def test_evaluate_rejects_misaligned_groups():
  x = np.zeros((4, 3), np.float32)
  with pytest.raises(ValueError, match="aligned"):
    evaluation.evaluate(x, x, x, x[:3], 1.0)


def png_size(path):
  with open(path, "rb") as f:
    head = f.read(24)
  assert head[:8] == b"\x89PNG\r\n\x1a\n"
  return struct.unpack(">II", head[16:24])


def test_write_report_writes_json_markdown_and_png_plots(toy_report,
                                                         tmp_path):
  report, (S, U, V, G) = toy_report
  paths = evaluation.write_report(report, tmp_path,
                                  embeddings=dict(S=S, U=U, V=V, G=G))
  assert json.loads((tmp_path / "report.json").read_text()) == report
  md = (tmp_path / "report.md").read_text()
  assert "| U->V+G | geodesic |" in md and "AUROC" in md
  console = evaluation.format_console(report)
  assert "Safety retrieval" in console and "recall_sum" in console
  for name in ("distance_histograms", "poincare_disk", "roc_curves"):
    assert png_size(paths[name]) == plots.PIXELS
    assert (tmp_path / f"{name}.png").stat().st_size > 5000


def test_poincare_projection_keeps_the_poincare_radius():
  rng = np.random.default_rng(10)
  x = random_points(rng, 50, 7, scale=2.0)
  c = 0.5
  xy = plots.poincare_projection(x, c)
  norm = np.linalg.norm(x.astype(np.float64), axis=1)
  # sqrt(c)·||x|| / (1 + x_t sqrt(c)), the unit-disk radius of the point.
  want = np.sqrt(c) * norm / (1 + np.sqrt(1 + c * norm**2))
  assert xy.shape == (50, 2)
  np.testing.assert_allclose(np.linalg.norm(xy, axis=1), want, rtol=1e-5)
  assert np.all(np.linalg.norm(xy, axis=1) < 1)


def test_report_module_exposes_the_spec_pairings():
  assert report_lib.PAIRINGS == (("S", "V"), ("S", "G"), ("U", "V"),
                                 ("U", "G"))


def test_report_keeps_float64_under_x64():
  """As `lorentz` and `safety` do: a float64 caller gets float64 distances
  (checked to 1e-12 against NumPy, far below float32's ~1e-7)."""
  import jax  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(11)
  S, U, V, G = (random_points(rng, 12, 5).astype(np.float64)
                for _ in range(4))
  curv = 0.7
  with jax.enable_x64(True):
    report = evaluation.evaluate(S, U, V, G, curv)
    ranks, _ = retrieval.positive_ranks(S, V, curv)
  want = np.arccosh(np.sqrt(1 + curv * (U ** 2).sum(-1))) / np.sqrt(curv)
  assert report["distances"]["U"]["mean"] == pytest.approx(want.mean(),
                                                           rel=1e-12)
  assert report["distances"]["U"]["max"] == pytest.approx(want.max(),
                                                          rel=1e-12)
  assert ranks.shape == (12,)
