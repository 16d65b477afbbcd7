"""Binary-classification metrics for unsafe detection from a scalar score.

The score is "higher = more unsafe" (the distance from the origin, see
`hysac_jax.safety.origin_distance`); label 1 = unsafe, 0 = safe. Everything is
O(n log n) NumPy over the whole split (one sort), no per-threshold loops.
"""

from __future__ import annotations

import numpy as np


def _scores_labels(scores, labels) -> tuple[np.ndarray, np.ndarray]:
  scores = np.asarray(scores, np.float64).reshape(-1)
  labels = np.asarray(labels).reshape(-1).astype(bool)
  if scores.shape != labels.shape:
    raise ValueError(f"scores and labels differ in length: {scores.shape} vs "
                     f"{labels.shape}")
  if labels.all() or not labels.any():
    raise ValueError("labels must contain both classes (safe=0 and unsafe=1)")
  return scores, labels


def auroc(scores, labels) -> float:
  """Area under the ROC curve (Mann–Whitney U, ties counted as one half).

  Args:
    scores: (n,) higher = more likely unsafe.
    labels: (n,) 1/True = unsafe, 0/False = safe; both classes present.

  Returns:
    AUROC in [0, 1]; equals sklearn's `roc_auc_score(labels, scores)`.
  """
  scores, labels = _scores_labels(scores, labels)
  order = np.argsort(scores, kind="stable")
  sorted_scores = scores[order]
  # Average 1-based ranks over groups of tied scores.
  _, first, counts = np.unique(sorted_scores, return_index=True,
                               return_counts=True)
  avg_rank = first + (counts + 1) / 2.0
  ranks = np.empty_like(scores)
  ranks[order] = np.repeat(avg_rank, counts)
  n_pos = labels.sum()
  n_neg = labels.size - n_pos
  u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
  return float(u / (n_pos * n_neg))


def roc_curve(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """ROC points for every distinct threshold ("unsafe iff score >= t").

  Args:
    scores: (n,) higher = more likely unsafe.
    labels: (n,) 1 = unsafe.

  Returns:
    fpr, tpr, thresholds: (t+1,) each, starting at (0, 0) with threshold +inf
    and ending at (1, 1), thresholds decreasing.
  """
  scores, labels = _scores_labels(scores, labels)
  order = np.argsort(-scores, kind="stable")
  s, y = scores[order], labels[order]
  # The last index of each group of tied scores is a curve vertex.
  last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]
  tps = np.cumsum(y)[last]
  fps = (last + 1) - tps
  tpr = np.r_[0.0, tps / labels.sum()]
  fpr = np.r_[0.0, fps / (~labels).sum()]
  return fpr, tpr, np.r_[np.inf, s[last]]


def accuracy_at(scores, labels, threshold: float) -> float:
  """Accuracy of "unsafe iff score > threshold".

  Args:
    scores: (n,); labels: (n,) 1 = unsafe; threshold: scalar.
  """
  scores, labels = _scores_labels(scores, labels)
  return float(np.mean((scores > threshold) == labels))


def best_threshold_accuracy(scores, labels) -> tuple[float, float]:
  """The best accuracy of "unsafe iff score > t" over all thresholds t.

  Candidate thresholds are −inf and every distinct score (every distinct
  partition of the sorted scores); the returned t is the smallest best one.

  Args:
    scores: (n,); labels: (n,) 1 = unsafe.

  Returns:
    (accuracy, threshold).
  """
  scores, labels = _scores_labels(scores, labels)
  order = np.argsort(scores, kind="stable")
  s, y = scores[order], labels[order]
  # Threshold at the last element of each tie group: everything up to it is
  # called safe, everything after it unsafe.
  last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]
  safe_below = np.cumsum(~y)[last]          # true negatives
  unsafe_below = np.cumsum(y)[last]         # false negatives
  correct = safe_below + (labels.sum() - unsafe_below)
  correct = np.r_[labels.sum(), correct]    # t = -inf: all called unsafe
  thresholds = np.r_[-np.inf, s[last]]
  best = int(np.argmax(correct))
  return float(correct[best] / s.size), float(thresholds[best])
