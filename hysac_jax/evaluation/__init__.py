"""Evaluation suite (SPEC §4): recall tables, safety retrieval, reports, plots.

Entry points for eval.py and train.py:

  evaluate(S, U, V, G, curv, bounds=None, mode="hyp") -> report dict
  recall_sum(S, U, V, G, curv, mode="hyp") -> float  (checkpoint selection)
  write_report(report, out_dir, embeddings=None)     (json, md, PNGs)
  format_console(report) -> str
"""

from hysac_jax.evaluation.report import evaluate
from hysac_jax.evaluation.report import format_console
from hysac_jax.evaluation.report import format_markdown
from hysac_jax.evaluation.report import recall_sum
from hysac_jax.evaluation.report import write_report
from hysac_jax.evaluation.retrieval import recall_at_k

__all__ = ["evaluate", "format_console", "format_markdown", "recall_at_k",
           "recall_sum", "write_report"]
