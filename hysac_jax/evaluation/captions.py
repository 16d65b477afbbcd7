"""Image–caption retrieval with several captions per image (COCO, Flickr30k).

Text→image: each caption queries the image pool; a hit at K when its own
image ranks in the top K. Image→text: each image queries the caption pool; a
hit at K when **any** of its captions ranks in the top K (the COCO/Flickr
protocol of CLIP and MERU). Ranking is `retrieval`'s: by −Lorentz distance
in hyp mode, by cosine in euc mode, ties to the lower pool index.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from hysac_jax.evaluation import report as report_lib
from hysac_jax.evaluation import retrieval

DEFAULT_K = (1, 5, 10)


def caption_groups(caption_image, num_images: int) -> np.ndarray:
  """(N, P) caption indices of each image, padded by repeating its first.

  Repeating a positive leaves the best (smallest) rank unchanged, so the
  any-caption hit is computed on a rectangular array.

  Raises:
    ValueError: an image index out of range, or an image without a caption.
  """
  caption_image = np.asarray(caption_image).astype(np.int64).reshape(-1)
  if caption_image.size and (caption_image.min() < 0
                             or caption_image.max() >= num_images):
    raise ValueError(f"caption image indices must lie in [0, {num_images})")
  counts = np.bincount(caption_image, minlength=num_images)
  if (counts == 0).any():
    raise ValueError(f"image {int(np.argmin(counts))} has no caption")
  groups = np.empty((num_images, counts.max()), np.int64)
  order = np.argsort(caption_image, kind="stable")
  starts = np.r_[0, np.cumsum(counts)[:-1]]
  for i in range(num_images):
    own = order[starts[i]:starts[i] + counts[i]]
    groups[i, :counts[i]] = own
    groups[i, counts[i]:] = own[0]
  return groups


def multi_caption_recall(image_emb, text_emb, caption_image, curv,
                         mode="hyp", k: Sequence[int] = DEFAULT_K,
                         chunk_size: int = retrieval.DEFAULT_CHUNK) -> dict:
  """R@K both ways for images with several captions each.

  Args:
    image_emb: (N, D) image embeddings.
    text_emb: (M, D) caption embeddings.
    caption_image: (M,) index of each caption's image.
    curv: curvature magnitude (ignored in euc mode).
    mode: "hyp" or "euc".
    k: cut-offs.

  Returns:
    {"t2i": {"R@1", ...}, "i2t": {"R@1", ...}} as fractions.
  """
  caption_image = np.asarray(caption_image).reshape(-1)
  if len(caption_image) != len(text_emb):
    raise ValueError(f"{len(caption_image)} caption image indices for "
                     f"{len(text_emb)} captions")
  groups = caption_groups(caption_image, len(image_emb))
  t2i, _ = retrieval.positive_ranks(text_emb, image_emb, curv, caption_image,
                                    mode, chunk_size)
  i2t, _ = retrieval.positive_ranks(image_emb, text_emb, curv, groups, mode,
                                    chunk_size)
  return {"t2i": retrieval.recall_from_ranks(t2i, k),
          "i2t": retrieval.recall_from_ranks(i2t, k)}


def evaluate(image_emb, text_emb, caption_image, curv, mode="hyp",
             k: Sequence[int] = DEFAULT_K) -> dict:
  """The retrieval report: {"task": "retrieval", "mode", "curv", "images",
  "captions", "k", "t2i", "i2t", "rsum"} (rsum: the sum of the six recalls,
  in %, as COCO papers report it)."""
  recalls = multi_caption_recall(image_emb, text_emb, caption_image, curv,
                                 mode, k)
  report = {"task": "retrieval", "mode": mode,
            "curv": float(curv) if mode == "hyp" else None,
            "images": int(len(image_emb)), "captions": int(len(text_emb)),
            "k": list(k), **recalls}
  report["rsum"] = float(100 * sum(sum(r.values()) for r in recalls.values()))
  return report


def _rows(report: Mapping):
  ks = [f"R@{kk}" for kk in report["k"]]
  header = ["dataset", "direction"] + [f"{k} (%)" for k in ks]
  rows = [[str(report.get("dataset", "-")), d]
          + [f"{100 * report[d][k]:.2f}" for k in ks] for d in ("t2i", "i2t")]
  return header, rows


def format_console(report: Mapping) -> str:
  """The recall table as fixed-width text."""
  header, rows = _rows(report)
  title = (f"Image-caption retrieval: {report['images']} images, "
           f"{report['captions']} captions, mode={report['mode']}, "
           f"rsum={report['rsum']:.2f}")
  return "\n".join([title] + report_lib.table_lines(header, rows))


def format_markdown(report: Mapping) -> str:
  """The recall table as Markdown."""
  header, rows = _rows(report)
  return "\n".join(
      ["# Image-caption retrieval", "",
       f"{report['images']} images, {report['captions']} captions, mode "
       f"`{report['mode']}`, rsum {report['rsum']:.2f}", ""]
      + report_lib.table_lines(header, rows, True)) + "\n"


def write_report(report: Mapping, out_dir) -> dict:
  """Writes report.json and report.md."""
  return report_lib.write_files(report, out_dir, format_markdown(report))
