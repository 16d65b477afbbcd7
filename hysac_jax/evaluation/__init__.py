"""Evaluation suite (SPEC §4): recall tables, safety retrieval, reports, plots.

Entry points for eval.py and train.py:

  evaluate(S, U, V, G, curv, bounds=None, mode="hyp") -> report dict
  recall_sum(S, U, V, G, curv, mode="hyp") -> float  (checkpoint selection)
  write_report(report, out_dir, embeddings=None)     (json, md, PNGs)
  format_console(report) -> str

The tasks of `eval.py --task` have their own modules: `zeroshot` (class
embeddings from prompts, top-K and mean per-class recall), `captions`
(multi-caption retrieval), `prompt_safety` (prompt-based vs distance-based
unsafe classification) and `embed` (batched, padded embedding with a
loaded model).
"""

from hysac_jax.evaluation.report import evaluate
from hysac_jax.evaluation.report import format_console
from hysac_jax.evaluation.report import format_markdown
from hysac_jax.evaluation.report import recall_sum
from hysac_jax.evaluation.report import write_report
from hysac_jax.evaluation.retrieval import recall_at_k

__all__ = ["evaluate", "format_console", "format_markdown", "recall_at_k",
           "recall_sum", "write_report"]
