"""PNG plots of an evaluation (matplotlib, Agg backend, no display needed).

- `distance_histograms.png`: distance from the origin of S, U, V, G — the
  picture of the hierarchy (safe near the root, unsafe further out).
- `poincare_disk.png`: a sample of the four groups in the Poincaré disk.
  Points are mapped with `lorentz.to_poincare` (ball of radius 1/sqrt(c)) and
  scaled by sqrt(c) to the unit ball. The 2-D view keeps each point's
  Poincaré radius exactly and takes its *direction* from an uncentred PCA
  (the top two right singular vectors of the sample): the projected vector is
  rescaled to the point's radius. Distances to the origin are thus faithful;
  angles between points are only a 2-D summary.
- `roc_curves.png`: ROC curves of unsafe classification by distance, text
  (S vs U) and images (V vs G).

Every figure is FIGSIZE inches at DPI dots per inch, i.e. PIXELS exactly.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from hysac_jax import lorentz  # noqa: E402
from hysac_jax import safety  # noqa: E402
from hysac_jax.evaluation import classification  # noqa: E402

FIGSIZE = (8.0, 6.0)
DPI = 100
PIXELS = (800, 600)  # (width, height)
COLORS = {"S": "tab:blue", "U": "tab:red", "V": "tab:green",
          "G": "tab:orange"}
LABELS = {"S": "S safe text", "U": "U unsafe text", "V": "V safe image",
          "G": "G unsafe image"}


def _save(fig, path):
  fig.savefig(path, dpi=DPI)
  plt.close(fig)
  return path


def plot_distance_histograms(groups: Mapping, curv, path, mode: str = "hyp"):
  """Overlaid histograms of the distance from the origin of each group.

  Args:
    groups: {"S", "U", "V", "G": (n, d)}.
    curv: curvature magnitude; path: PNG file.
  """
  dists = {g: np.asarray(safety.origin_distance(e, curv, mode))
           for g, e in groups.items()}
  lo = min(d.min() for d in dists.values())
  hi = max(d.max() for d in dists.values())
  bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 60)
  fig, ax = plt.subplots(figsize=FIGSIZE)
  for g, d in dists.items():
    ax.hist(d, bins=bins, histtype="step", linewidth=1.5, color=COLORS.get(g),
            label=f"{LABELS.get(g, g)} (mean {d.mean():.3f})")
  ax.set_xlabel("distance from the origin" if mode == "hyp" else "norm")
  ax.set_ylabel("count")
  ax.set_title("Distance from the root per group")
  ax.legend()
  return _save(fig, path)


def poincare_projection(emb, curv) -> np.ndarray:
  """2-D unit-disk coordinates that keep each point's Poincaré radius.

  Args:
    emb: (n, d) space components on the hyperboloid.
    curv: curvature magnitude c.

  Returns:
    (n, 2) points with norm = sqrt(c) · ||to_poincare(emb)|| < 1, direction
    from the uncentred top-2 PCA of the Poincaré points.
  """
  ball = np.asarray(lorentz.to_poincare(np.asarray(emb, np.float32), curv),
                    np.float64) * np.sqrt(curv)
  radius = np.linalg.norm(ball, axis=-1, keepdims=True)
  # Uncentred, so the origin (the root) stays at the centre of the disk.
  _, _, vt = np.linalg.svd(ball, full_matrices=False)
  flat = ball @ vt[:2].T
  if flat.shape[1] < 2:
    flat = np.pad(flat, ((0, 0), (0, 2 - flat.shape[1])))
  norm = np.linalg.norm(flat, axis=-1, keepdims=True)
  direction = np.where(norm > 0, flat / np.where(norm > 0, norm, 1.0), 0.0)
  return direction * radius


def plot_poincare_disk(groups: Mapping, curv, path, sample: int = 500,
                       seed: int = 0):
  """A random sample of each group in the Poincaré disk (see module doc).

  Args:
    groups: {"S", "U", "V", "G": (n, d)}; sample: points drawn per group.
  """
  rng = np.random.default_rng(seed)
  names, points = [], []
  for g, e in groups.items():
    e = np.asarray(e, np.float32)
    idx = rng.choice(len(e), size=min(sample, len(e)), replace=False)
    names += [g] * len(idx)
    points.append(e[idx])
  xy = poincare_projection(np.concatenate(points), curv)
  names = np.array(names)
  fig, ax = plt.subplots(figsize=FIGSIZE)
  ax.add_patch(plt.Circle((0, 0), 1.0, fill=False, color="black",
                          linewidth=1))
  for g in groups:
    sel = names == g
    ax.scatter(xy[sel, 0], xy[sel, 1], s=6, alpha=0.6, color=COLORS.get(g),
               label=LABELS.get(g, g))
  ax.scatter([0], [0], marker="*", s=120, color="black", label="root")
  ax.set_xlim(-1.05, 1.05)
  ax.set_ylim(-1.05, 1.05)
  ax.set_aspect("equal")
  ax.set_title("Poincaré disk (radius exact, direction from PCA)")
  ax.legend(loc="upper right", fontsize="small")
  return _save(fig, path)


def plot_roc_curves(groups: Mapping, curv, path, mode: str = "hyp"):
  """ROC of "unsafe iff distance >= t": text S vs U and images V vs G."""
  fig, ax = plt.subplots(figsize=FIGSIZE)
  for modality, safe, unsafe in (("text", "S", "U"), ("image", "V", "G")):
    scores = np.concatenate(
        [np.asarray(safety.origin_distance(groups[g], curv, mode))
         for g in (safe, unsafe)])
    labels = np.r_[np.zeros(len(groups[safe]), bool),
                   np.ones(len(groups[unsafe]), bool)]
    fpr, tpr, _ = classification.roc_curve(scores, labels)
    auc = classification.auroc(scores, labels)
    ax.plot(fpr, tpr, label=f"{modality} ({safe} vs {unsafe}), AUROC "
            f"{auc:.4f}")
  ax.plot([0, 1], [0, 1], linestyle="--", color="gray", linewidth=1)
  ax.set_xlabel("false positive rate (safe called unsafe)")
  ax.set_ylabel("true positive rate (unsafe caught)")
  ax.set_title("Unsafe classification by distance from the origin")
  ax.legend(loc="lower right")
  return _save(fig, path)


def write_plots(groups: Mapping, curv, out_dir, mode: str = "hyp",
                sample: int = 500) -> dict[str, str]:
  """Writes the three PNGs into out_dir; returns {name: path}.

  The Poincaré view is hyperbolic only and is skipped for mode "euc".
  """
  os.makedirs(out_dir, exist_ok=True)
  paths = {
      "distance_histograms": plot_distance_histograms(
          groups, curv, os.path.join(out_dir, "distance_histograms.png"),
          mode),
      "roc_curves": plot_roc_curves(
          groups, curv, os.path.join(out_dir, "roc_curves.png"), mode),
  }
  if mode == "hyp":
    paths["poincare_disk"] = plot_poincare_disk(
        groups, curv, os.path.join(out_dir, "poincare_disk.png"), sample)
  return paths


def confusion_matrix(confusion, class_names, path, title=None):
  """`confusion_matrix.png`: row-normalised zero-shot confusion matrix.

  Args:
    confusion: (C, C) counts, rows true class, columns predicted.
    class_names: C names (tick labels; omitted beyond 30 classes).
    path: PNG file.
  """
  confusion = np.asarray(confusion, np.float64)
  rows = confusion.sum(axis=1, keepdims=True)
  share = confusion / np.where(rows > 0, rows, 1)
  fig, ax = plt.subplots(figsize=FIGSIZE)
  im = ax.imshow(share, cmap="viridis", vmin=0.0, vmax=1.0)
  fig.colorbar(im, ax=ax, label="share of the true class")
  if len(class_names) <= 30:
    ticks = np.arange(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=90, fontsize=7)
    ax.set_yticks(ticks, class_names, fontsize=7)
  ax.set_xlabel("predicted class")
  ax.set_ylabel("true class")
  if title:
    ax.set_title(title)
  fig.tight_layout()
  return _save(fig, path)
