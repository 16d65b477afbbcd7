"""Unsafe classification with text prompts, beside the distance-based one.

Prompt-based (the way CLIP-style NSFW classifiers work, and the HySAC paper's
NSFW table): two prompt sets, safe and unsafe, are embedded; an embedding is
unsafe when its nearest prompt is unsafe. Its score is

    hyp:  min_{p safe} d(x, p) − min_{q unsafe} d(x, q)   (Lorentz distance)
    euc:  max_{q unsafe} cos(x, q) − max_{p safe} cos(x, p)

so "nearest prompt unsafe" is `score > 0`, the margin rule is
`score > margin`, and AUROC ranks by the score. Distance-based (HySAC's own,
SPEC §4): the score is the distance from the origin (the feature norm in euc
mode, where it carries no safety meaning), thresholded at b' when bounds are
known. Both methods get AUROC and accuracy, side by side.

The default prompt sets are `hysac_jax/data/assets/zeroshot/{safe,unsafe}
_prompts.txt` (one prompt per line, `#` comments).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from hysac_jax import finite
from hysac_jax import input_file
from hysac_jax import lorentz
from hysac_jax import safety
from hysac_jax.evaluation import classification
from hysac_jax.evaluation import report as report_lib
from hysac_jax.models import hysac as hysac_lib

DEFAULT_PROMPT_FILES = {"safe": "safe_prompts.txt",
                        "unsafe": "unsafe_prompts.txt"}


def read_lines(path, what="prompt") -> list[str]:
  """Lines of a text file, one prompt (or template) a line; blank and `#`
  lines skipped.

  Raises:
    ValueError: a file without any, one that is no regular file or over
      `input_file.MAX_TEXT_BYTES` (naming it and `what`).
  """
  try:
    text = input_file.read_text(path, input_file.MAX_TEXT_BYTES,
                                f"{what} file")
  except (input_file.NotRegularFileError, input_file.FileTooLargeError,
          IsADirectoryError) as e:
    raise ValueError(str(e)) from None
  lines = [line.strip() for line in text.splitlines()]
  lines = [t for t in lines if t and not t.startswith("#")]
  if not lines:
    raise ValueError(f"{what} file {path} holds no {what}")
  return lines


def read_prompts(path) -> list[str]:
  """Prompts from a text file: one a line; blank and `#` lines skipped."""
  return read_lines(path, "prompt")


def default_prompts() -> dict[str, list[str]]:
  """{"safe": [...], "unsafe": [...]}: the shipped prompt sets."""
  import importlib_resources  # Only when the shipped prompts are read.
  root = importlib_resources.files("hysac_jax.data.assets") / "zeroshot"
  out = {}
  for side, name in DEFAULT_PROMPT_FILES.items():
    with importlib_resources.as_file(root / name) as path:
      out[side] = read_prompts(path)
  return out


@functools.partial(jax.jit, static_argnames=("mode",))
def _scores(emb, safe_prompts, unsafe_prompts, curv, mode):
  if mode == "euc":
    x = hysac_lib.l2_normalize(emb)
    return (jnp.max(x @ hysac_lib.l2_normalize(unsafe_prompts).T, axis=1)
            - jnp.max(x @ hysac_lib.l2_normalize(safe_prompts).T, axis=1))
  return (jnp.min(lorentz.pairwise_dist(emb, safe_prompts, curv), axis=1)
          - jnp.min(lorentz.pairwise_dist(emb, unsafe_prompts, curv), axis=1))


def prompt_scores(emb, safe_prompts, unsafe_prompts, curv, mode="hyp"):
  """Unsafe score of each embedding from its nearest safe / unsafe prompt.

  Args:
    emb: (N, D) embeddings (images or texts).
    safe_prompts: (P, D) embeddings of the safe prompts.
    unsafe_prompts: (Q, D) embeddings of the unsafe prompts.
    curv: curvature magnitude (ignored in euc mode).
    mode: "hyp" or "euc" (module docstring).

  Returns:
    (N,) NumPy scores; > 0 iff the nearest prompt is unsafe.
  """
  hysac_lib.check_mode(mode)
  emb, sp, up = lorentz.at_least_float32(emb), lorentz.at_least_float32(safe_prompts), lorentz.at_least_float32(unsafe_prompts)
  if len(sp) == 0 or len(up) == 0:
    raise ValueError("both prompt sets need at least one prompt")
  return np.asarray(_scores(emb, sp, up, jnp.asarray(
      1.0 if curv is None else curv, emb.dtype), mode))


def origin_scores(emb, curv, mode="hyp"):
  """Distance-based unsafe score: distance from the origin (hyp) or the
  feature norm (euc)."""
  return np.asarray(safety.origin_distance(emb, curv, mode))


ALL_UNSAFE_NOTE = ("no finite threshold does better than calling every item "
                   "unsafe (the scores do not separate the two sets)")


def _method_row(scores, labels, rule_threshold):
  best_acc, best_t = classification.best_threshold_accuracy(scores, labels)
  row = {"auroc": classification.auroc(scores, labels),
         "best_accuracy": best_acc, "best_threshold": best_t}
  if not np.isfinite(best_t):
    # The best rule is "everything unsafe" (t = -inf): said so, since
    # -Infinity is no JSON value.
    row["best_threshold"] = None
    row["best_threshold_note"] = ALL_UNSAFE_NOTE
  if rule_threshold is not None:
    row["rule_threshold"] = float(rule_threshold)
    row["accuracy"] = classification.accuracy_at(scores, labels,
                                                 rule_threshold)
  return row


def compare(safe_emb, unsafe_emb, safe_prompts, unsafe_prompts, curv,
            mode="hyp", margin=0.0, threshold=None) -> dict:
  """Prompt-based and distance-based unsafe classification of one modality.

  Args:
    safe_emb: (n_s, D) embeddings of safe items (label 0).
    unsafe_emb: (n_u, D) embeddings of unsafe items (label 1).
    safe_prompts, unsafe_prompts: (P, D), (Q, D) prompt embeddings.
    curv: curvature magnitude (ignored in euc mode).
    mode: "hyp" or "euc".
    margin: the prompt rule's margin (unsafe iff score > margin; 0 is
      "nearest prompt unsafe"); a finite number (`finite.NonFiniteError`
      otherwise).
    threshold: the distance rule's threshold b' (hyp, with bounds), or None.

  Returns:
    {"n_safe", "n_unsafe", "prompt": {"auroc", "accuracy", "rule_threshold",
    "best_accuracy", "best_threshold"}, "distance": {the same; "accuracy"
    only with a threshold}}. "best_threshold" is None, with a
    "best_threshold_note", when no finite threshold beats calling every
    item unsafe (identical scores, e.g. identical prompt sets).
  """
  # A NaN margin makes "score > margin" False for all: everything "safe".
  margin = finite.check_number(margin, "prompt_safety", "margin")
  emb = np.concatenate([np.asarray(safe_emb), np.asarray(unsafe_emb)])
  labels = np.r_[np.zeros(len(safe_emb), bool), np.ones(len(unsafe_emb), bool)]
  prompt = prompt_scores(emb, safe_prompts, unsafe_prompts, curv, mode)
  dist = origin_scores(emb, curv, mode)
  return {"n_safe": int(len(safe_emb)), "n_unsafe": int(len(unsafe_emb)),
          "prompt": _method_row(prompt, labels, margin),
          "distance": _method_row(
              dist, labels, threshold if mode == "hyp" else None)}


def evaluate(groups: Mapping, safe_prompts, unsafe_prompts, curv, mode="hyp",
             margin=0.0, bounds=None, alpha=safety.DEFAULT_ALPHA,
             prompts: Mapping | None = None) -> dict:
  """The report over one or both modalities.

  Args:
    groups: {"image": (safe (n, D), unsafe (m, D)), ["text": (...)]}.
    safe_prompts, unsafe_prompts: prompt embeddings.
    bounds: release-shaped bounds (hyp) for the distance rule at b', or None.
    alpha: alpha of b'.
    prompts: {"safe": [...], "unsafe": [...]} texts, recorded in the report.

  Returns:
    {"task": "unsafe_prompts", "mode", "curv", "margin", "alpha",
     "modalities": {modality: `compare(...)`}, "prompts"}.
  """
  margin = finite.check_number(margin, "prompt_safety", "margin")
  out = {"task": "unsafe_prompts", "mode": mode,
         "curv": float(curv) if mode == "hyp" else None,
         "margin": float(margin), "alpha": float(alpha),
         "bounds_source": None, "modalities": {}}
  for modality, (safe_emb, unsafe_emb) in groups.items():
    threshold = None
    if bounds is not None and mode == "hyp":
      threshold = safety.modality_threshold(curv, bounds, modality, alpha)
    out["modalities"][modality] = compare(
        safe_emb, unsafe_emb, safe_prompts, unsafe_prompts, curv, mode,
        margin, threshold)
  if prompts is not None:
    out["prompts"] = {k: list(v) for k, v in prompts.items()}
  return out


def _pct(x):
  return "-" if x is None else f"{100 * x:.2f}"


def _rows(report: Mapping):
  header = ["modality", "method", "rule", "AUROC (%)", "accuracy (%)",
            "best acc (%)", "n safe", "n unsafe"]
  rows = []
  for modality, r in report["modalities"].items():
    for method, rule in (("prompt", f"score > {report['margin']:g}"),
                         ("distance", "dist0 > b'")):
      m = r[method]
      rows.append([modality, method,
                   rule if "accuracy" in m else "(no bounds)",
                   _pct(m["auroc"]), _pct(m.get("accuracy")),
                   _pct(m["best_accuracy"]), str(r["n_safe"]),
                   str(r["n_unsafe"])])
  return header, rows


def format_console(report: Mapping) -> str:
  header, rows = _rows(report)
  title = (f"Unsafe classification: prompts vs distance from the origin "
           f"(mode={report['mode']}, dataset={report.get('dataset', '-')})")
  return "\n".join([title] + report_lib.table_lines(header, rows))


def format_markdown(report: Mapping) -> str:
  header, rows = _rows(report)
  lines = ["# Unsafe classification: prompts vs distance", "",
           f"mode `{report['mode']}`, dataset `{report.get('dataset', '-')}`"
           f", margin {report['margin']:g}", ""]
  lines += report_lib.table_lines(header, rows, True)
  for side in ("safe", "unsafe"):
    if report.get("prompts"):
      lines += ["", f"## {side} prompts", ""]
      lines += [f"- {p}" for p in report["prompts"][side]]
  return "\n".join(lines) + "\n"


def write_report(report: Mapping, out_dir) -> dict:
  """Writes report.json and report.md."""
  return report_lib.write_files(report, out_dir, format_markdown(report))
