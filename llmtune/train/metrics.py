"""Prediction metrics: BLEU-4 and ROUGE-1/2/L of generated replies against their labels, as LLaMA-Factory's
``predict_results.json`` reports them (``predict_bleu-4``, ``predict_rouge-1``, ``predict_rouge-2``,
``predict_rouge-l``, each the mean over rows of a per-row score in percent, 0-100).

Per row, following LLaMA-Factory (``src/llamafactory/train/sft/metric.py``, ``ComputeSimilarity``):

* BLEU-4 over **characters**: NLTK's ``sentence_bleu([list(label)], list(predict))`` with uniform weights
  (1/4 each for 1- to 4-grams) and ``SmoothingFunction().method3`` (Chen & Cherry 2014, "A Systematic
  Comparison of Smoothing Techniques for Sentence-Level BLEU", method 3: NIST geometric smoothing), times 100.
* ROUGE-1, ROUGE-2, ROUGE-L F-measures (Lin 2004, "ROUGE: A Package for Automatic Evaluation of Summaries")
  over **words**, computed with Google's ``rouge-score`` package, times 100. A row whose prediction or
  label has no words scores 0.

Differences from LLaMA-Factory, stated so numbers are compared knowingly: LLaMA-Factory segments text with
jieba and scores with ``rouge_chinese``; here a word is a run of letters/digits (case kept), each other
non-space character (punctuation, and each CJK character) is a word of its own. For English this is the
segmentation jieba gives; for Chinese it is character-level rather than dictionary words, so Chinese ROUGE
is not comparable between the two. ROUGE-L is rouge-score's F1 of the longest common subsequence.

The libraries are the optional extra ``metrics`` (``pip install 'llmtune[metrics]'``: nltk, rouge-score),
imported only when metrics are computed.
"""

from __future__ import annotations

import re
from typing import Iterable

from llmtune.errors import LLMTuneError

__all__ = ["split_words", "row_scores", "similarity_metrics", "write_predict_results"]

_WORD = re.compile(r"[^\W_]+|[^\s]", re.UNICODE)
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]")


def split_words(text: str) -> list[str]:
    """Words of ``text`` (str) for ROUGE: runs of letters/digits, each CJK character alone, each other
    non-space character alone. ``"Paris, 2024."`` -> ``["Paris", ",", "2024", "."]``."""
    out: list[str] = []
    for tok in _WORD.findall(text):
        if _CJK.search(tok):
            out.extend(tok)  # CJK characters one by one (no dictionary segmentation)
        else:
            out.append(tok)
    return out


def _libraries():
    try:
        from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
        from rouge_score import rouge_scorer
    except ImportError:
        raise LLMTuneError("predict_with_generate metrics need nltk and rouge-score; run "
                           "`pip install 'llmtune[metrics]'` (or pip install nltk rouge-score)") from None
    return sentence_bleu, SmoothingFunction, rouge_scorer


class _Words:
    """rouge-score tokenizer interface: ``tokenize(text) -> list[str]``."""

    def tokenize(self, text: str) -> list[str]:
        return split_words(text)


def row_scores(predict: str, label: str, _libs=None) -> dict[str, float]:
    """Scores of one prediction against its label, in percent rounded to 4 decimals.

    Args:
        predict: the generated reply (str); label: the reference reply (str).

    Returns:
        ``{"bleu-4", "rouge-1", "rouge-2", "rouge-l"}`` floats in [0, 100] (see the module doc).

    Raises:
        LLMTuneError: nltk or rouge-score is not installed.
    """
    sentence_bleu, smoothing, rouge_scorer = _libs or _libraries()
    if predict and label:
        bleu = sentence_bleu([list(label)], list(predict), smoothing_function=smoothing().method3)
    else:
        bleu = 0.0
    if split_words(predict) and split_words(label):
        s = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=_Words()).score(label, predict)
        r1, r2, rl = s["rouge1"].fmeasure, s["rouge2"].fmeasure, s["rougeL"].fmeasure
    else:
        r1 = r2 = rl = 0.0
    return {"bleu-4": round(bleu * 100, 4), "rouge-1": round(r1 * 100, 4), "rouge-2": round(r2 * 100, 4),
            "rouge-l": round(rl * 100, 4)}


def similarity_metrics(pairs: Iterable[tuple[str, str]], prefix: str = "predict_") -> dict[str, float]:
    """Mean :func:`row_scores` over ``(predict, label)`` pairs, keys prefixed (``predict_bleu-4``...).

    Returns an empty dict for no pairs.

    Raises:
        LLMTuneError: nltk or rouge-score is not installed.
    """
    libs = _libraries()
    rows = [row_scores(p, l, libs) for p, l in pairs]
    if not rows:
        return {}
    return {prefix + k: round(sum(r[k] for r in rows) / len(rows), 4) for k in ("bleu-4", "rouge-1", "rouge-2",
                                                                                 "rouge-l")}


def write_predict_results(output_dir, predictions_file: str = "generated_predictions.jsonl") -> dict[str, float]:
    """Score ``output_dir/generated_predictions.jsonl`` (``{"predict", "label"}`` lines) and write the means
    to ``output_dir/predict_results.json`` (LLaMA-Factory's file name and keys); returns them.

    Without nltk/rouge-score installed it writes nothing and gives one notice saying how to install them
    (the predictions themselves are kept), so a finished training run is never lost to a missing extra.
    """
    import json
    from pathlib import Path

    from llmtune.errors import notice

    out = Path(output_dir)
    try:
        _libraries()
    except LLMTuneError as e:
        notice(f"predict_results.json not written: {e}")
        return {}
    pairs = []
    with (out / predictions_file).open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                pairs.append((str(rec.get("predict", "")), str(rec.get("label", ""))))
    res = similarity_metrics(pairs)
    (out / "predict_results.json").write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    return res
