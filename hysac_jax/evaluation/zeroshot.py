"""Zero-shot classification on the hyperboloid: class embeddings, metrics.

A class is embedded from several prompts ("a photo of a {}.", ...). In `hyp`
mode the prompts are combined as MERU does: their tangent vectors at the
origin (`lorentz.log_map0`) are averaged and lifted back with
`lorentz.exp_map0`, so the class embedding is a point of the same
hyperboloid. An image is assigned the class at the smallest Lorentz distance.
In `euc` mode (plain CLIP) the prompts' L2-normalised embeddings are averaged
and renormalised, and images are scored by cosine, as CLIP does.

That mean (`pooling="mean"`, CLIP's prompt ensemble) suits templates of one
class name. When a class is a union of distinct sub-concepts, as the
synthetic set's classes are (every caption of a shape, over colours, counts,
sizes and backgrounds), the mean of far-apart prompts lands near the other
classes' means and blurs them together. `pooling="nearest"` scores a class
by its best prompt instead: an image goes to the class of its nearest prompt
(smallest Lorentz distance in hyp mode, largest cosine in euc mode).

Ranking follows the package convention (`retrieval`): classes are ordered by
descending score (−distance or cosine), ties to the lower class index, so the
true class is in the top K iff fewer than K classes come before it.

Metrics (those of LAION's CLIP_benchmark): top-1 and top-5 accuracy, and the
mean per-class recall (the mean, over classes with images, of the share of
their images predicted correctly at top-1).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import functools

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from hysac_jax import lorentz
from hysac_jax.evaluation import report as report_lib
from hysac_jax.evaluation import retrieval
from hysac_jax.models import hysac as hysac_lib

DEFAULT_K = (1, 5)
DEFAULT_CHUNK = 1024
POOLINGS = ("mean", "nearest")
# Nearest pooling scores a chunk of images against every prompt at once:
# the chunk shrinks so that this (chunk, prompts) matrix stays under 2^24
# floats (64 MB).
_NEAREST_SCORES = 1 << 24
# Confusion matrices (report and plot) are kept for up to this many classes.
MAX_CONFUSION_CLASSES = 100


def class_embedding(prompt_emb, curv, mode="hyp"):
  """One class embedding from the embeddings of its prompts.

  Args:
    prompt_emb: (P, D) prompt embeddings of one class (P >= 1): points on the
      hyperboloid (space components) in hyp mode, raw features in euc mode.
    curv: curvature magnitude (ignored in euc mode).
    mode: "hyp": `exp_map0(mean_p log_map0(x_p))`; "euc": the renormalised
      mean of the unit prompt vectors.

  Returns:
    (D,) class embedding, float32 (float64 for float64 inputs).
  """
  hysac_lib.check_mode(mode)
  x = lorentz.at_least_float32(prompt_emb)
  if x.ndim != 2 or x.shape[0] == 0:
    raise ValueError(f"prompt embeddings must be (P >= 1, D), got {x.shape}")
  return _mean_prompt(x, curv, mode)


def _mean_prompt(x, curv, mode):
  """(..., P, D) prompt embeddings -> (..., D), averaged over the prompts."""
  if mode == "euc":
    return hysac_lib.l2_normalize(jnp.mean(hysac_lib.l2_normalize(x), axis=-2))
  return lorentz.exp_map0(jnp.mean(lorentz.log_map0(x, curv), axis=-2), curv)


def _prompt_counts(prompt_embs):
  """The prompt count of each class; a class without a (P >= 1, D) array
  of prompts is refused by its index."""
  sizes = [np.shape(p)[0] if np.ndim(p) == 2 else -1 for p in prompt_embs]
  for c, size in enumerate(sizes):
    if size < 1:
      raise ValueError(f"class {c}: prompt embeddings must be (P >= 1, D), "
                       f"got {np.shape(prompt_embs[c])}")
  return sizes


def class_embeddings(prompt_embs: Sequence, curv, mode="hyp",
                     progress=True):
  """`class_embedding` of each class, in time linear in the classes.

  Classes with the same number of prompts are stacked on the host (NumPy,
  one copy each) and averaged in one call, so C classes cost one call per
  distinct prompt count, not C calls; stacking C device arrays one by one
  (`jnp.stack` of host slices) grew much faster than C.

  Args:
    prompt_embs: per class, a (P_c, D) array of its prompts' embeddings
      (classes may have different numbers of prompts).
    progress: show a progress bar over the classes.

  Returns:
    (C, D) class embeddings.
  """
  hysac_lib.check_mode(mode)
  sizes = _prompt_counts(prompt_embs)
  by_size = {}
  for c, size in enumerate(sizes):
    by_size.setdefault(size, []).append(c)
  out = [None] * len(sizes)
  with tqdm(total=len(sizes), desc="class embeddings", leave=False,
            disable=not progress) as bar:
    for members in by_size.values():
      x = lorentz.at_least_float32(
          np.stack([np.asarray(prompt_embs[c]) for c in members]))
      mean = np.asarray(_mean_prompt(x, curv, mode))  # (C_p, P, D) -> (C_p, D)
      for row, c in zip(mean, members):
        out[c] = row
      bar.update(len(members))
  return jnp.asarray(np.stack(out))


def true_class_ranks(image_emb, class_emb, labels, curv, mode="hyp",
                     chunk_size=DEFAULT_CHUNK):
  """0-based rank of each image's true class, and its top-1 class.

  Scores are −distance (hyp) or cosine (euc), one chunk of images at a
  time (`retrieval.positive_ranks`).

  Args:
    image_emb: (N, D) image embeddings.
    class_emb: (C, D) class embeddings (`class_embeddings`).
    labels: (N,) int true classes in [0, C).
    curv: curvature magnitude (ignored in euc mode).
    mode: "hyp" or "euc".
    chunk_size: images scored per step.

  Returns:
    ranks (N,) int32 and predictions (N,) int32 NumPy arrays.
  """
  hysac_lib.check_mode(mode)
  images, classes = lorentz.at_least_float32(image_emb), lorentz.at_least_float32(class_emb)
  labels = _check_scored(images, classes, labels, classes.shape[0])
  if not images.shape[0]:
    return np.zeros(0, np.int32), np.zeros(0, np.int32)
  # Each image's positive is its true class: the retrieval ranking (ties to
  # the lower index; the Lorentz inner product orders as −distance does).
  return retrieval.positive_ranks(images, classes, curv, labels, mode,
                                  chunk_size)


def metrics_from_ranks(ranks, predictions, labels, num_classes,
                       k: Sequence[int] = DEFAULT_K) -> dict:
  """Top-K accuracy, mean per-class recall and the confusion matrix.

  Args:
    ranks: (N,) 0-based rank of the true class.
    predictions: (N,) top-1 class.
    labels: (N,) true class.
    num_classes: C.
    k: cut-offs (a K >= C gives 1).

  Returns:
    {"top1", "top5", ... (fractions), "mean_per_class_recall",
     "per_class_recall": (C,) list (None for classes without images),
     "confusion": (C, C) int array, rows true, columns predicted}.
  """
  ranks, predictions = np.asarray(ranks), np.asarray(predictions)
  labels = np.asarray(labels).astype(np.int64)
  if ranks.size == 0:
    raise ValueError("no images to classify")
  out = {f"top{kk}": float(np.mean(ranks < kk)) for kk in k}
  confusion = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(confusion, (labels, np.asarray(predictions, np.int64)), 1)
  support = confusion.sum(axis=1)
  recall = np.where(support > 0, np.diag(confusion) / np.maximum(support, 1),
                    np.nan)
  out["mean_per_class_recall"] = float(np.nanmean(recall))
  out["per_class_recall"] = [None if np.isnan(r) else float(r)
                             for r in recall]
  out["confusion"] = confusion
  return out


def check_pooling(pooling):
  if pooling not in POOLINGS:
    raise ValueError(f"unknown prompt pooling {pooling!r}; expected one of "
                     f"{POOLINGS}")


@functools.partial(jax.jit, static_argnames=("mode", "chunk_size",
                                             "num_classes"))
def _nearest_kernel(images, prompts, prompt_class, labels, curv, mode,
                    chunk_size, num_classes):
  """Rank of the true class and top-1 class, each class scored by its best
  prompt; images (N, D) with N a multiple of chunk_size."""
  if mode == "euc":
    prompts = hysac_lib.l2_normalize(prompts)
  classes = jnp.arange(num_classes, dtype=jnp.int32)

  def one_chunk(args):
    q, label = args  # (C, D), (C,)
    if mode == "euc":
      scores = hysac_lib.l2_normalize(q) @ prompts.T
    else:  # orders as -distance does (module docstring of `retrieval`)
      scores = lorentz.pairwise_inner(q, prompts, curv)
    best = jax.ops.segment_max(scores.T, prompt_class, num_classes,
                               indices_are_sorted=True).T  # (C, classes)
    true = jnp.take_along_axis(best, label[:, None], axis=1)
    before = (best > true) | ((best == true) & (classes < label[:, None]))
    return (jnp.sum(before, axis=1, dtype=jnp.int32),
            jnp.argmax(best, axis=1).astype(jnp.int32))

  d = images.shape[-1]
  ranks, top1 = jax.lax.map(one_chunk, (images.reshape(-1, chunk_size, d),
                                        labels.reshape(-1, chunk_size)))
  return ranks.reshape(-1), top1.reshape(-1)


def nearest_prompt_ranks(image_emb, prompt_embs: Sequence, labels, curv,
                         mode="hyp", chunk_size=DEFAULT_CHUNK):
  """`true_class_ranks` with each class scored by its nearest prompt.

  Args:
    image_emb: (N, D) image embeddings.
    prompt_embs: per class, a (P_c, D) array of its prompts' embeddings.
    labels: (N,) int true classes in [0, C).
    curv: curvature magnitude (ignored in euc mode).
    mode: "hyp" (class score: -min_p distance) or "euc" (max_p cosine).
    chunk_size: most images scored per step (fewer when there are many
      prompts, so that a step's score matrix stays under 64 MB).

  Returns:
    ranks (N,) int32 and predictions (N,) int32 NumPy arrays, ties to the
    lower class index.
  """
  hysac_lib.check_mode(mode)
  sizes = _prompt_counts(prompt_embs)
  widths = {np.shape(p)[1] for p in prompt_embs}
  if len(widths) > 1:
    raise ValueError(f"prompt embeddings of different widths {sorted(widths)}")
  prompts = lorentz.at_least_float32(np.concatenate(
      [np.asarray(p) for p in prompt_embs]))
  images = lorentz.at_least_float32(image_emb)
  labels = _check_scored(images, prompts, labels, len(sizes))
  n = images.shape[0]
  if not n:
    return np.zeros(0, np.int32), np.zeros(0, np.int32)
  prompt_class = np.repeat(np.arange(len(sizes), dtype=np.int32), sizes)
  chunk = max(1, min(chunk_size, n, _NEAREST_SCORES // len(prompt_class)))
  pad = (-n) % chunk  # repeat the first image; its results are dropped
  images = jnp.concatenate([images, jnp.repeat(images[:1], pad, 0)])
  padded = np.concatenate([labels, np.repeat(labels[:1], pad)])
  curv = jnp.asarray(1.0 if curv is None else curv, images.dtype)
  ranks, top1 = _nearest_kernel(images, prompts, jnp.asarray(prompt_class),
                                jnp.asarray(padded), curv, mode, chunk,
                                len(sizes))
  return np.asarray(ranks)[:n], np.asarray(top1)[:n]


def _check_scored(images, classes, labels, num_classes):
  """(N, D) images, (M, D) classes or prompts, (N,) labels in [0, C);
  returns the labels as int32."""
  labels = np.asarray(labels).reshape(-1)
  if (images.ndim != 2 or classes.ndim != 2
      or images.shape[1] != classes.shape[1]):
    raise ValueError(f"images and classes must be (N, D) and (C, D), got "
                     f"{images.shape} and {classes.shape}")
  n = images.shape[0]
  if labels.shape != (n,):
    raise ValueError(f"labels must be ({n},), got {labels.shape}")
  if n and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"labels must lie in [0, {num_classes}), got range "
                     f"[{labels.min()}, {labels.max()}]")
  return labels.astype(np.int32)


def evaluate(image_emb, labels, class_emb, class_names: Sequence[str], curv,
             mode="hyp", k: Sequence[int] = DEFAULT_K,
             chunk_size=DEFAULT_CHUNK) -> dict:
  """The zero-shot report on embedded images and classes.

  Returns:
    JSON-ready {"task": "zeroshot", "mode", "curv", "n", "num_classes",
    "chance_top1", "k", "top1", "top5", "mean_per_class_recall",
    "per_class": {name: {"n", "recall"}}, ["confusion": C x C list when
    C <= MAX_CONFUSION_CLASSES]}.
  """
  class_names = list(class_names)
  if np.shape(class_emb)[0] != len(class_names):
    raise ValueError(f"{np.shape(class_emb)[0]} class embeddings for "
                     f"{len(class_names)} class names")
  ranks, preds = true_class_ranks(image_emb, class_emb, labels, curv, mode,
                                  chunk_size)
  return _report(ranks, preds, labels, class_names, curv, mode, k)


def evaluate_prompts(image_emb, labels, prompt_embs: Sequence,
                     class_names: Sequence[str], curv, mode="hyp",
                     pooling="mean", k: Sequence[int] = DEFAULT_K,
                     chunk_size=DEFAULT_CHUNK, progress=True) -> dict:
  """The zero-shot report from each class's prompt embeddings.

  `pooling` "mean" embeds each class as its prompts' mean
  (`class_embeddings`), then calls `evaluate`; "nearest" scores each class
  by its nearest prompt (`nearest_prompt_ranks`). The report is
  `evaluate`'s, with "pooling" added.
  """
  check_pooling(pooling)
  class_names = list(class_names)
  if len(prompt_embs) != len(class_names):
    raise ValueError(f"prompts of {len(prompt_embs)} classes for "
                     f"{len(class_names)} class names")
  if pooling == "mean":
    report = evaluate(image_emb, labels,
                      class_embeddings(prompt_embs, curv, mode, progress),
                      class_names, curv, mode, k, chunk_size)
  else:
    ranks, preds = nearest_prompt_ranks(image_emb, prompt_embs, labels, curv,
                                        mode, chunk_size)
    report = _report(ranks, preds, labels, class_names, curv, mode, k)
  report["pooling"] = pooling
  return report


def _report(ranks, preds, labels, class_names, curv, mode, k):
  c = len(class_names)
  m = metrics_from_ranks(ranks, preds, labels, c, k)
  support = m["confusion"].sum(axis=1)
  report = {"task": "zeroshot", "mode": mode,
            "curv": float(curv) if mode == "hyp" else None,
            "n": int(len(ranks)), "num_classes": c, "k": list(k),
            "chance_top1": 1.0 / c}
  report.update({key: m[key] for key in m if key.startswith("top")})
  report["mean_per_class_recall"] = m["mean_per_class_recall"]
  report["per_class"] = {
      name: {"n": int(support[i]), "recall": m["per_class_recall"][i]}
      for i, name in enumerate(class_names)}
  if c <= MAX_CONFUSION_CLASSES:
    report["class_names"] = class_names
    report["confusion"] = m["confusion"].tolist()
  return report


# --------------------------------------------------------------------------
# Writers


def _pct(x):
  return "-" if x is None else f"{100 * x:.2f}"


def summary_rows(report: Mapping) -> tuple[list[str], list[list[str]]]:
  """(header, rows) of the zero-shot table, values in %."""
  ks = [f"top{kk}" for kk in report["k"]]
  header = (["dataset", "mode", "pooling", "n", "classes"]
            + [f"{k} (%)" for k in ks]
            + ["mean per-class recall (%)", "chance top1 (%)"])
  row = ([str(report.get("dataset", "-")), report["mode"],
          report.get("pooling", "mean"), str(report["n"]),
          str(report["num_classes"])] + [_pct(report[k]) for k in ks]
         + [_pct(report["mean_per_class_recall"]),
            _pct(report["chance_top1"])])
  return header, [row]


def format_console(report: Mapping) -> str:
  """The zero-shot table as fixed-width text."""
  header, rows = summary_rows(report)
  return "\n".join(["Zero-shot classification"]
                   + report_lib.table_lines(header, rows))


def markdown_cell(text) -> str:
  """`text` as one Markdown table cell: a newline would end the row and a
  `|` split the cell, so line breaks become spaces and `|` is escaped."""
  return " ".join(str(text).splitlines()).replace("|", "\\|")


def format_markdown(report: Mapping) -> str:
  """The zero-shot table and per-class recall as Markdown."""
  header, rows = summary_rows(report)
  lines = (["# Zero-shot classification", ""]
           + report_lib.table_lines(header, rows, True))
  lines += ["", "## Per-class recall (top-1, %)", ""]
  rows = [[markdown_cell(name), str(r["n"]), _pct(r["recall"])]
          for name, r in report["per_class"].items()]
  lines += report_lib.table_lines(["class", "images", "recall"], rows, True)
  return "\n".join(lines) + "\n"


def write_report(report: Mapping, out_dir, plots=True) -> dict:
  """Writes report.json, report.md and (C <= 100) confusion_matrix.png."""
  paths = report_lib.write_files(report, out_dir, format_markdown(report))
  if plots and "confusion" in report:
    from hysac_jax.evaluation import plots as plots_lib  # matplotlib is slow
    paths["confusion"] = plots_lib.confusion_matrix(
        np.asarray(report["confusion"]), report["class_names"],
        f"{out_dir}/confusion_matrix.png",
        title=f"Zero-shot confusion ({report.get('dataset', '')}, "
              f"top-1 {100 * report['top1']:.1f}%)")
  return paths
