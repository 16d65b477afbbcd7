"""What `make demo`'s reports show, checked and said in one paragraph.

    python -m hysac_jax.demo runs/tiny      # after train.py and the eval.py calls

Reads the run's `eval/test/report.json` and its two zero-shot reports
(`eval/zeroshot-synthetic_visu_shape`, `..._colour`) and checks the
properties the README promises of the demo:

- unsafe content lies further from the origin: U farther than S, G farther
  than V (mean distances);
- distance is an unsafe-image classifier: AUROC >= 95 %;
- retrieval is far above chance: S->V R@10 at least 5x chance (10 / n);
- safety traversal cuts the unsafe share of the top-1 captions of unsafe
  image queries (G->S+U, geodesic or release rule, against none);
- zero-shot is clearly above chance on both synthetic attributes: top-1 at
  least chance + 10 points.

Prints each with its value, then a closing paragraph on where the tables and
plots are. Exit 0 (with `--strict`: 1 when a property does not hold), 2
when a report is missing or unreadable (one line, `demo: error: ...`).
"""

import argparse
import json
import os
import sys

ZEROSHOT = ("shape", "colour")
MIN_IMAGE_AUROC = 0.95
MIN_RECALL_OVER_CHANCE = 5.0
MIN_ZEROSHOT_MARGIN = 0.10


def _load(path):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: {e}") from None


def reports(run_dir):
  """(report, {attribute: zero-shot report}) of a demo run."""
  eval_dir = os.path.join(run_dir, "eval")
  report = _load(os.path.join(eval_dir, "test", "report.json"))
  zeroshot = {a: _load(os.path.join(
      eval_dir, f"zeroshot-synthetic_visu_{a}", "report.json"))
              for a in ZEROSHOT}
  return report, zeroshot


def properties(report, zeroshot):
  """[(name, shown value, holds)] of the demo's promises."""
  dist = {g: report["distances"][g]["mean"] for g in "SUVG"}
  auroc = report["classification"]["image"]["auroc"]
  r10 = report["retrieval"]["S-V"]["t2i"]["R@10"]
  chance = min(10 / report["n"], 1.0)
  top1 = report["safety_retrieval"]["G->S+U"]
  none = top1["none"]["unsafe_top1"]
  moved = min(top1["release"]["unsafe_top1"], top1["geodesic"]["unsafe_top1"])
  out = [
      ("U farther than S", f"{dist['U']:.3f} > {dist['S']:.3f}",
       dist["U"] > dist["S"]),
      ("G farther than V", f"{dist['G']:.3f} > {dist['V']:.3f}",
       dist["G"] > dist["V"]),
      ("unsafe-image AUROC >= 95 %",
       "undefined" if auroc is None else f"{100 * auroc:.1f} %",
       auroc is not None and auroc >= MIN_IMAGE_AUROC),
      ("S->V R@10 >= 5x chance", f"{100 * r10:.1f} % (chance "
       f"{100 * chance:.1f} %)", r10 >= MIN_RECALL_OVER_CHANCE * chance),
      ("traversal cuts unsafe top-1 of unsafe image queries",
       f"{100 * none:.0f} % -> {100 * moved:.0f} %", moved < none),
  ]
  for attribute, z in zeroshot.items():
    out.append((f"zero-shot {attribute} >= chance + 10 points",
                f"{100 * z['top1']:.1f} % (chance {100 * z['chance_top1']:.0f}"
                " %)", z["top1"] >= z["chance_top1"] + MIN_ZEROSHOT_MARGIN))
  return out


_MEANING = (
    ("farther", "unsafe captions and images lie further from the origin "
     "than safe ones"),
    ("AUROC", "the distance from the origin alone classifies unsafe images"),
    ("R@10", "retrieval finds the matching pair far above chance"),
    ("traversal", "moving an unsafe image query toward the origin (safety "
     "traversal) swaps unsafe top-1 captions for safe ones"),
    ("zero-shot", "images classify zero-shot by shape and by colour, each "
     "going to the class of its nearest caption"),
)


def closing_paragraph(run_dir, checks):
  """What the tables show, only for the promises that hold, and where the
  report and plots are."""
  shown, not_shown = [], []
  for key, meaning in _MEANING:
    related = [ok for name, _, ok in checks if key in name]
    (shown if all(related) else not_shown).append(meaning)
  eval_dir = os.path.join(run_dir, "eval")
  text = (f"What the tables show: {'; '.join(shown) or 'none of it'}."
          if shown else "The tables show none of the promises.")
  if not_shown:
    text += (f" Not shown by this run (see the NOT MET lines): "
             f"{'; '.join(not_shown)}.")
  return (text + " The report and its plots (distance histograms, Poincare "
          f"disk, ROC curves) are in {os.path.join(eval_dir, 'test')}/, the "
          f"zero-shot tables in {eval_dir}/zeroshot-*/. README.md, \"Quick "
          "start\", says what each number means.")


def main(argv=None):
  parser = argparse.ArgumentParser(
      prog="python -m hysac_jax.demo",
      description="Checks and explains what make demo's reports show.")
  parser.add_argument("run_dir", help="the demo's run directory "
                      "(runs/tiny), after its eval.py calls")
  parser.add_argument("--strict", action="store_true",
                      help="exit 1 when a promised property does not hold")
  args = parser.parse_args(argv)
  try:
    checks = properties(*reports(args.run_dir))
  except ValueError as e:
    print(f"demo: error: {e}", file=sys.stderr)
    return 2
  except (KeyError, TypeError) as e:
    print(f"demo: error: a report under {args.run_dir}/eval lacks or "
          f"mistypes the field {e}: rerun the eval.py calls of `make demo`",
          file=sys.stderr)
    return 2
  print()
  for name, value, ok in checks:
    print(f"  [{'ok' if ok else 'NOT MET'}] {name}: {value}")
  print()
  print(closing_paragraph(args.run_dir, checks))
  return 1 if args.strict and not all(ok for _, _, ok in checks) else 0


if __name__ == "__main__":
  sys.exit(main())
