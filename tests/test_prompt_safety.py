"""Prompt-based unsafe classification (hysac_jax/evaluation/prompt_safety.py)
against float64 brute force and scikit-learn's AUROC."""

import jax
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from hysac_jax import evaluate_tasks
from hysac_jax import finite
from hysac_jax.evaluation import prompt_safety

CURV = 0.9


def ref_exp0(v, c):
  r = np.sqrt(c) * np.linalg.norm(v, axis=-1, keepdims=True)
  return np.sinh(r) / r * v


def ref_dist(x, y, c):
  xt, yt = np.sqrt(1 / c + x @ x), np.sqrt(1 / c + y @ y)
  return np.arccosh(max(-c * (x @ y - xt * yt), 1.0)) / np.sqrt(c)


def ref_cos(x, y):
  return x @ y / (np.linalg.norm(x) * np.linalg.norm(y))


def ref_nearest_is_unsafe(x, safe, unsafe, c, mode):
  """Loop over all prompts; the nearest one's side (ties: safe)."""
  best, side = None, None
  for label, prompts in ((False, safe), (True, unsafe)):
    for p in prompts:
      s = -ref_dist(x, p, c) if mode == "hyp" else ref_cos(x, p)
      if best is None or s > best:
        best, side = s, label
  return side


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  d = 5
  centre_safe, centre_unsafe = rng.normal(size=d), rng.normal(size=d)
  safe_p = ref_exp0(0.3 * centre_safe + 0.4 * rng.normal(size=(4, d)), CURV)
  unsafe_p = ref_exp0(0.9 * centre_unsafe + 0.4 * rng.normal(size=(6, d)),
                      CURV)
  safe = ref_exp0(0.3 * centre_safe + 0.6 * rng.normal(size=(40, d)), CURV)
  unsafe = ref_exp0(0.9 * centre_unsafe + 0.6 * rng.normal(size=(30, d)),
                    CURV)
  return safe, unsafe, safe_p, unsafe_p


@pytest.mark.parametrize("mode", ["hyp", "euc"])
def test_prompt_scores_match_bruteforce_min_distance_difference(data, mode):
  safe, unsafe, safe_p, unsafe_p = data
  x = np.concatenate([safe, unsafe])
  with jax.enable_x64(True):
    got = prompt_safety.prompt_scores(x, safe_p, unsafe_p, CURV, mode)
  for i, xi in enumerate(x):
    if mode == "hyp":
      want = (min(ref_dist(xi, p, CURV) for p in safe_p)
              - min(ref_dist(xi, q, CURV) for q in unsafe_p))
    else:
      want = (max(ref_cos(xi, q) for q in unsafe_p)
              - max(ref_cos(xi, p) for p in safe_p))
    assert got[i] == pytest.approx(want, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("mode", ["hyp", "euc"])
def test_nearest_prompt_rule_and_auroc_for_both_methods(data, mode):
  safe, unsafe, safe_p, unsafe_p = data
  x = np.concatenate([safe, unsafe])
  labels = np.r_[np.zeros(len(safe)), np.ones(len(unsafe))]
  with jax.enable_x64(True):
    got = prompt_safety.compare(safe, unsafe, safe_p, unsafe_p, CURV, mode,
                                threshold=1.0)
  nearest = [ref_nearest_is_unsafe(xi, safe_p, unsafe_p, CURV, mode)
             for xi in x]
  want_acc = np.mean(np.array(nearest) == labels.astype(bool))
  assert 0.5 < want_acc < 1.0  # the fixture discriminates, imperfectly
  assert got["prompt"]["accuracy"] == pytest.approx(want_acc, abs=1e-12)
  if mode == "hyp":
    score = [min(ref_dist(xi, p, CURV) for p in safe_p)
             - min(ref_dist(xi, q, CURV) for q in unsafe_p) for xi in x]
    origin = [ref_dist(xi, np.zeros_like(xi), CURV) for xi in x]
    assert got["distance"]["accuracy"] == pytest.approx(
        np.mean((np.array(origin) > 1.0) == labels.astype(bool)), abs=1e-12)
  else:
    score = [max(ref_cos(xi, q) for q in unsafe_p)
             - max(ref_cos(xi, p) for p in safe_p) for xi in x]
    origin = np.linalg.norm(x, axis=1)
    assert "accuracy" not in got["distance"]  # no b' without geometry
  assert got["prompt"]["auroc"] == pytest.approx(
      roc_auc_score(labels, score), abs=1e-12)
  assert got["distance"]["auroc"] == pytest.approx(
      roc_auc_score(labels, origin), abs=1e-12)


def test_margin_moves_the_rule_threshold(data):
  safe, unsafe, safe_p, unsafe_p = data
  loose = prompt_safety.compare(safe, unsafe, safe_p, unsafe_p, CURV,
                                margin=-100.0)
  assert loose["prompt"]["accuracy"] == pytest.approx(30 / 70)  # all unsafe


@pytest.mark.parametrize("margin", [float("nan"), float("inf"),
                                    float("-inf"), None, "0"])
def test_a_margin_that_is_not_a_finite_number_is_refused_naming_it(
    data, margin):
  """A NaN margin would make "score > margin" False: every item safe."""
  safe, unsafe, safe_p, unsafe_p = data
  with pytest.raises(finite.NonFiniteError, match=r"^prompt_safety: margin="):
    prompt_safety.compare(safe, unsafe, safe_p, unsafe_p, CURV,
                          margin=margin)
  with pytest.raises(finite.NonFiniteError, match=r"^prompt_safety: margin="):
    prompt_safety.evaluate({"image": (safe, unsafe)}, safe_p, unsafe_p, CURV,
                           margin=margin)
  # Before any model or data is touched (model=None would fail later).
  with pytest.raises(finite.NonFiniteError,
                     match=r"^run_unsafe_prompts: margin="):
    evaluate_tasks.run_unsafe_prompts(None, dataset="unused", margin=margin)


def test_evaluate_reports_each_modality_and_formats(data, tmp_path):
  safe, unsafe, safe_p, unsafe_p = data
  bounds = {g: {"avg": 1.0, "low_05": 0.5, "up_95": 1.5}
            for g in ("S", "U", "V", "G")}
  report = prompt_safety.evaluate(
      {"image": (safe, unsafe), "text": (unsafe, safe)}, safe_p, unsafe_p,
      CURV, bounds=bounds, prompts={"safe": ["a"], "unsafe": ["b"]})
  assert set(report["modalities"]) == {"image", "text"}
  assert "accuracy" in report["modalities"]["image"]["distance"]
  text = prompt_safety.format_console(report)
  assert "prompt" in text and "distance" in text
  prompt_safety.write_report(report, tmp_path)
  assert "## unsafe prompts" in (tmp_path / "report.md").read_text()


def test_prompt_files_skip_comments_and_an_empty_one_is_named(tmp_path):
  path = tmp_path / "p.txt"
  path.write_text("# header\n\n a photo \nanother\n")
  assert prompt_safety.read_prompts(path) == ["a photo", "another"]
  path.write_text("# only a comment\n")
  with pytest.raises(ValueError, match=f"prompt file {path} holds no prompt"):
    prompt_safety.read_prompts(path)
  shipped = prompt_safety.default_prompts()
  assert len(shipped["safe"]) >= 5 and len(shipped["unsafe"]) >= 5


def test_identical_prompt_sets_give_a_null_threshold_not_minus_infinity(
    data, tmp_path):
  import json  # pylint: disable=g-import-not-at-top
  safe, unsafe, safe_p, _ = data
  # More unsafe than safe items: the best rule calls every item unsafe.
  report = prompt_safety.evaluate({"image": (safe[:20], unsafe)}, safe_p,
                                  safe_p,
                                  CURV, "hyp")
  row = report["modalities"]["image"]["prompt"]
  assert row["auroc"] == 0.5  # every score ties at 0
  assert row["best_threshold"] is None
  assert row["best_threshold_note"] == prompt_safety.ALL_UNSAFE_NOTE
  prompt_safety.write_report(report, tmp_path)
  json.loads((tmp_path / "report.json").read_text(),
             parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))


def test_a_folder_beside_safe_and_unsafe_is_refused_naming_it(tmp_path):
  from hysac_jax.data import labelled_images  # pylint: disable=g-import-not-at-top
  for name in ("safe", "unsafe", "maybe"):
    (tmp_path / name).mkdir()
    (tmp_path / name / "a.png").write_bytes(b"")
  with pytest.raises(ValueError, match=f"image folder {tmp_path} holds "
                     "maybe/ beside the expected class folders safe, unsafe"):
    labelled_images.from_folder(tmp_path, ("safe", "unsafe"))
