"""The evaluation report of SPEC §4: one call from embeddings to tables.

`evaluate(S, U, V, G, curv, bounds)` returns a JSON-ready dict:

    {"mode", "curv", "n", "k", "alpha", "bounds", "bounds_source",
     "distances": {"S": {"mean", "std", "min", "max"}, ...},
     "retrieval": {"S-V": {"t2i": {"R@1", ...}, "i2t": {...}}, "S-G", "U-V", "U-G"},
     "safety_retrieval": {"U->V+G": {"none": {...}, "release": {...},
                                     "geodesic": {...}}, "G->S+U": {...}},
     "classification": {"text": {...}, "image": {...}},
     "recall_sum": float}

`write_report(report, out_dir, embeddings)` writes report.json, report.md and
the PNG plots; `format_console(report)` is the table printed by eval.py.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import numpy as np

from hysac_jax import finite
from hysac_jax import lorentz
from hysac_jax import safety
from hysac_jax.evaluation import classification
from hysac_jax.evaluation import retrieval
from hysac_jax.models import hysac as hysac_lib

PAIRINGS = (("S", "V"), ("S", "G"), ("U", "V"), ("U", "G"))
# The release selects checkpoints by t2i + i2t R@1 over these pairings (it
# leaves out U–G on purpose: "we do not care to evaluate on U_G_recall").
RECALL_SUM_PAIRINGS = (("S", "V"), ("S", "G"), ("U", "V"))
# Safety retrieval: (name, query group, safe pool, unsafe pool, modality of
# the pool — whose safe bound the query is traversed to, as in the release).
SAFETY_TASKS = (("U->V+G", "U", "V", "G", "image"),
                ("G->S+U", "G", "S", "U", "text"))
TRAVERSALS = ("none", "release", "geodesic")


def _as_groups(S, U, V, G) -> dict[str, np.ndarray]:
  groups = {}
  for name, emb in zip(safety.GROUPS, (S, U, V, G)):
    emb = np.asarray(lorentz.at_least_float32(emb))  # float64 stays
    if emb.ndim != 2:
      raise ValueError(f"embeddings {name} must be (n, d), got {emb.shape}")
    groups[name] = emb
  n = {name: len(emb) for name, emb in groups.items()}
  d = {name: emb.shape[1] for name, emb in groups.items()}
  if len(set(n.values())) != 1 or len(set(d.values())) != 1:
    raise ValueError(f"S, U, V, G must be aligned quadruples of equal shape; "
                     f"got sizes {n} and dims {d}")
  return groups


def recall_sum(S, U, V, G, curv, mode: str = "hyp",
               chunk_size: int = retrieval.DEFAULT_CHUNK) -> float:
  """Checkpoint-selection score: Σ R@1 (t2i + i2t) over S–V, S–G, U–V.

  As in the release's validation: six R@1 values (fractions) summed, in [0, 6].

  Args:
    S, U, V, G: (n, d) aligned quadruple embeddings.
    curv: curvature magnitude (ignored for euc).
    mode: "hyp" or "euc".
  """
  groups = _as_groups(S, U, V, G)
  total = 0.0
  for text, image in RECALL_SUM_PAIRINGS:
    r = retrieval.bidirectional_recall(groups[text], groups[image], curv, (1,),
                                       mode, chunk_size)
    total += r["t2i"]["R@1"] + r["i2t"]["R@1"]
  return float(total)


def _distance_stats(dist: np.ndarray) -> dict[str, float]:
  dist = np.asarray(dist, np.float64)
  return {"mean": float(dist.mean()), "std": float(dist.std()),
          "min": float(dist.min()), "max": float(dist.max())}


def _traversal_scales(emb, curv, bound, alpha) -> np.ndarray:
  """(n, 3) radial factors s with traverse_to_safe(x) = s·x: none, release,
  geodesic (both traversals keep the direction of x)."""
  norm = np.linalg.norm(np.asarray(emb, np.float64), axis=-1)
  cols = [np.ones_like(norm)]
  for how in TRAVERSALS[1:]:
    moved = np.asarray(safety.traverse_to_safe(emb, curv, bound, alpha, how),
                       np.float64)
    ratio = np.linalg.norm(moved, axis=-1) / np.where(norm > 0, norm, 1.0)
    cols.append(np.where(norm > 0, ratio, 1.0))
  return np.stack(cols, axis=-1)


def classification_table(S, U, V, G, curv, bounds: Mapping | None,
                         mode: str = "hyp",
                         alpha: float = safety.DEFAULT_ALPHA) -> dict:
  """Unsafe classification from the distance to the origin.

  Text: S (safe) vs U (unsafe); images: V vs G. With bounds (hyp only), the
  accuracy at the traversal threshold b' of the modality is reported too.

  Returns:
    {"text": {"auroc", "best_accuracy", "best_threshold", ["threshold",
    "accuracy_at_bounds"]}, "image": {...}}.
  """
  out = {}
  for modality, safe, unsafe in (("text", S, U), ("image", V, G)):
    scores = np.concatenate([np.asarray(safety.origin_distance(g, curv, mode))
                             for g in (safe, unsafe)])
    labels = np.r_[np.zeros(len(safe), bool), np.ones(len(unsafe), bool)]
    best_acc, best_t = classification.best_threshold_accuracy(scores, labels)
    row = {"auroc": classification.auroc(scores, labels),
           "best_accuracy": best_acc, "best_threshold": best_t}
    if bounds is not None and mode == "hyp":
      threshold = safety.modality_threshold(curv, bounds, modality, alpha)
      row["threshold"] = threshold
      row["accuracy_at_bounds"] = classification.accuracy_at(
          scores, labels, threshold)
    out[modality] = row
  return out


def _retrieval_tables(groups, curv, bounds, mode, k, alpha, chunk_size):
  """(retrieval, safety_retrieval) tables of the report.

  Four passes, one per query group against the other modality's [safe,
  unsafe] blocks, give all eight pairing directions and, through the
  radial-rescaling variants of U and G, the safety tables (see
  retrieval.block_ranks).
  """
  n = len(groups["S"])
  positives = np.stack([np.arange(n), n + np.arange(n)], axis=1)
  traversals = TRAVERSALS if mode == "hyp" else ("none",)
  other = {"S": ("V", "G"), "U": ("V", "G"), "V": ("S", "U"),
           "G": ("S", "U")}
  tasks = {query: (name, modality)
           for name, query, _, _, modality in SAFETY_TASKS}
  ranks = {}  # (query group, pool group) -> (n,) ranks
  safety_rows = {}
  for query, (safe_g, unsafe_g) in other.items():
    scales = None
    if query in tasks and mode == "hyp":
      bound = bounds[safety.SAFE_GROUP[tasks[query][1]]]["up_95"]
      scales = _traversal_scales(groups[query], curv, bound, alpha)
    counts, top1 = retrieval.block_ranks(
        groups[query], [groups[safe_g], groups[unsafe_g]], curv, positives,
        scales, mode, chunk_size)
    ranks[query, safe_g] = counts[:, 0, 0, 0]
    ranks[query, unsafe_g] = counts[:, 0, 1, 1]
    if query in tasks:
      safety_rows[tasks[query][0]] = {
          how: retrieval.safety_metrics(counts[:, t], top1[:, t], n, k)
          for t, how in enumerate(traversals)}
  table = {f"{t}-{i}": {"t2i": retrieval.recall_from_ranks(ranks[t, i], k),
                        "i2t": retrieval.recall_from_ranks(ranks[i, t], k)}
           for t, i in PAIRINGS}
  return table, {name: safety_rows[name] for name, *_ in SAFETY_TASKS}


def evaluate(S, U, V, G, curv, bounds: Mapping | None = None,
             mode: str = "hyp", k: Sequence[int] = retrieval.DEFAULT_K,
             alpha: float = safety.DEFAULT_ALPHA,
             chunk_size: int = retrieval.DEFAULT_CHUNK) -> dict:
  """The full SPEC §4 report on aligned quadruple embeddings.

  Args:
    S, U, V, G: (n, d) safe text, unsafe text, safe image, unsafe image
      embeddings (space components for hyp; raw features for euc), row i of
      each from quadruple i.
    curv: curvature magnitude c (ignored for euc).
    bounds: release-shaped bounds (from the validation split). None computes
      them from these embeddings (`bounds_source: "evaluated split"`), which is
      optimistic on a test split.
    mode: "hyp" (−distance, traversal) or "euc" (cosine; no traversal rows).
    k: recall cut-offs.
    alpha: α of the traversal threshold.
    chunk_size: queries scored per step in retrieval.

  Returns:
    The report dict described in the module docstring.
  """
  hysac_lib.check_mode(mode)
  groups = _as_groups(S, U, V, G)
  curv = float(curv) if mode == "hyp" else None
  bounds_source = "given"
  if mode == "hyp":
    if bounds is None:
      bounds = safety.compute_bounds(*groups.values(), curv)
      bounds_source = "evaluated split"
    else:
      bounds = safety.validate_bounds(bounds)
  else:
    bounds, bounds_source = None, None
  report = {"mode": mode, "curv": curv, "n": len(groups["S"]), "k": list(k),
            "alpha": alpha, "bounds": bounds, "bounds_source": bounds_source}
  report["distances"] = {
      name: _distance_stats(np.asarray(safety.origin_distance(emb, curv,
                                                              mode)))
      for name, emb in groups.items()}

  report["retrieval"], report["safety_retrieval"] = _retrieval_tables(
      groups, curv, bounds, mode, k, alpha, chunk_size)

  report["classification"] = classification_table(
      groups["S"], groups["U"], groups["V"], groups["G"], curv, bounds, mode,
      alpha)
  if 1 in k:  # reuse the R@1 just computed
    report["recall_sum"] = float(sum(
        report["retrieval"][f"{t}-{i}"][d]["R@1"]
        for t, i in RECALL_SUM_PAIRINGS for d in ("t2i", "i2t")))
  else:
    report["recall_sum"] = recall_sum(*groups.values(), curv, mode,
                                      chunk_size)
  return report


# --------------------------------------------------------------------------
# Writers


def _pct(x: float) -> str:
  return f"{100 * x:.2f}"


def _tables(report: Mapping) -> list[tuple[str, list[str], list[list[str]]]]:
  """(title, header, rows) for each table of the report; values in %."""
  ks = [f"R@{k}" for k in report["k"]]
  tables = []
  header = ["pairing", "direction"] + ks
  rows = []
  for pairing, dirs in report["retrieval"].items():
    for direction, recalls in dirs.items():
      rows.append([pairing, direction] + [_pct(recalls[k]) for k in ks])
  tables.append(("Retrieval recall (%)", header, rows))

  header = (["task", "traversal"] + [f"safe {k}" for k in ks]
            + [f"unsafe {k}" for k in ks] + ["unsafe top-1"])
  rows = []
  for task, by_traversal in report["safety_retrieval"].items():
    for how, r in by_traversal.items():
      rows.append([task, how] + [_pct(r[k]) for k in ks]
                  + [_pct(r[f"unsafe_{k}"]) for k in ks]
                  + [_pct(r["unsafe_top1"])])
  tables.append(("Safety retrieval (%): recall of the safe / unsafe "
                 "counterpart, share of unsafe top-1", header, rows))

  header = ["modality", "AUROC", "best acc", "best threshold",
            "acc at b'", "b'"]
  rows = []
  for modality, r in report["classification"].items():
    rows.append([modality, _pct(r["auroc"]), _pct(r["best_accuracy"]),
                 f"{r['best_threshold']:.4f}",
                 _pct(r["accuracy_at_bounds"]) if "accuracy_at_bounds" in r
                 else "-",
                 f"{r['threshold']:.4f}" if "threshold" in r else "-"])
  tables.append(("Unsafe classification (%) from the distance to the origin",
                 header, rows))

  header = ["group", "mean", "std", "min", "max"]
  rows = []
  for group, r in report["distances"].items():
    row = [group] + [f"{r[s]:.4f}" for s in ("mean", "std", "min", "max")]
    rows.append(row)
  tables.append(("Distance from the origin" if report["mode"] == "hyp"
                 else "Feature norm", header, rows))
  if report.get("bounds"):
    header = ["group", "avg", "low_05", "up_95"]
    rows = [[g] + [f"{b[s]:.4f}" for s in safety.STATS]
            for g, b in report["bounds"].items() if g in safety.GROUPS]
    tables.append((f"Bounds ({report['bounds_source']})", header, rows))
  return tables


def format_console(report: Mapping) -> str:
  """Plain-text tables (fixed-width columns) for a terminal."""
  lines = [f"HySAC evaluation: mode={report['mode']} n={report['n']} "
           f"curv={report['curv']} recall_sum={report['recall_sum']:.4f}"]
  for title, header, rows in _tables(report):
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    lines += ["", title, fmt.format(*header),
              "  ".join("-" * w for w in widths)]
    lines += [fmt.format(*row) for row in rows]
  return "\n".join(lines)


def format_markdown(report: Mapping) -> str:
  """The report as Markdown tables."""
  lines = ["# HySAC evaluation", "",
           f"mode `{report['mode']}`, n = {report['n']}, "
           f"curvature = {report['curv']}, recall sum = "
           f"{report['recall_sum']:.4f}"]
  for title, header, rows in _tables(report):
    lines += ["", f"## {title}", "", "| " + " | ".join(header) + " |",
              "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
  return "\n".join(lines) + "\n"


def table_lines(header: Sequence[str], rows: Sequence[Sequence[str]],
                markdown: bool = False) -> list[str]:
  """A table as Markdown lines, or as fixed-width text lines."""
  if markdown:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(r) + " |" for r in rows])
  widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
  fmt = "  ".join("{:<%d}" % w for w in widths)
  return ([fmt.format(*header), "  ".join("-" * w for w in widths)]
          + [fmt.format(*r) for r in rows])


def write_files(report: Mapping, out_dir: str | os.PathLike,
                markdown: str) -> dict[str, str]:
  """Writes `report` as out_dir/report.json and `markdown` as report.md."""
  os.makedirs(out_dir, exist_ok=True)
  paths = {"json": os.path.join(out_dir, "report.json"),
           "md": os.path.join(out_dir, "report.md")}
  undefined = finite.non_finite_paths(report)
  if undefined:  # say which nulls stand for an undefined value
    report = {**report, "null_note": "undefined (non-finite) values written "
              f"as null: {', '.join(undefined)}"}
  with open(paths["json"], "w") as f:
    # Strict JSON: an undefined value (one class's AUROC) is null.
    finite.dump(report, f, indent=2)
    f.write("\n")
  with open(paths["md"], "w") as f:
    f.write(markdown)
  return paths


def write_report(report: Mapping, out_dir: str | os.PathLike,
                 embeddings: Mapping | None = None,
                 plots: bool = True) -> dict[str, str]:
  """Writes report.json, report.md and (with embeddings) the PNG plots.

  Args:
    report: from `evaluate`.
    out_dir: created if missing.
    embeddings: {"S", "U", "V", "G": (n, d)} for the plots; without them only
      the two report files are written.
    plots: set False to skip the PNGs.

  Returns:
    {name: path} of the files written.
  """
  paths = write_files(report, out_dir, format_markdown(report))
  if plots and embeddings is not None:
    from hysac_jax.evaluation import plots as plots_lib  # matplotlib is slow
    missing = [g for g in safety.GROUPS if g not in embeddings]
    if missing:
      raise ValueError(f"write_report: embeddings lack groups {missing}")
    paths.update(plots_lib.write_plots(
        {g: embeddings[g] for g in safety.GROUPS}, report["curv"], out_dir,
        mode=report["mode"]))
  return paths
