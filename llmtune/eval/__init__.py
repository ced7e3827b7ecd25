"""Evaluation with lm-evaluation-harness: :mod:`llmtune.eval.lm` (the harness's ``LM`` over an llmtune model)
and :mod:`llmtune.eval.run` (``llmtune eval``). The harness is the optional ``eval`` extra
(``pip install 'llmtune[eval]'``), imported only when used.
"""

from llmtune.eval.lm import generate_texts, import_lm_eval, lm_class, score_continuations

__all__ = ["generate_texts", "import_lm_eval", "lm_class", "score_continuations"]
