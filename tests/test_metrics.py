"""Prediction metrics (llmtune/train/metrics.py) against hand-computed BLEU-4 and ROUGE values."""

from __future__ import annotations

import json
import math

import pytest

from test_train_run import base_cfg, data_dir, tiny_folder  # noqa: F401  (fixtures)

pytest.importorskip("nltk", reason="the metrics extra (nltk) is not installed")
pytest.importorskip("rouge_score", reason="the metrics extra (rouge-score) is not installed")

from llmtune.train.metrics import row_scores, similarity_metrics, split_words  # noqa: E402


def test_words():
    assert split_words("Paris, 2024.") == ["Paris", ",", "2024", "."]
    assert split_words("猫在 mat") == ["猫", "在", "mat"]


def test_prefix_prediction_by_hand():
    # predict "the cat sat", label "the cat sat on the mat"
    # ROUGE-1: 3 of 3 predicted words match, 3 of 6 label words: P=1, R=1/2, F1=2/3
    # ROUGE-2: 2 of 2 predicted bigrams, 2 of 5 label bigrams: P=1, R=2/5, F1=2*0.4/1.4=4/7
    # ROUGE-L: LCS 3: P=1, R=1/2, F1=2/3
    # BLEU-4 over characters: the prediction is a prefix of the label, so every clipped n-gram precision is 1
    # (no smoothing needed); brevity penalty exp(1 - r/c) with r=22, c=11 characters: exp(-1)
    s = row_scores("the cat sat", "the cat sat on the mat")
    assert s["rouge-1"] == pytest.approx(200 / 3, abs=1e-4)
    assert s["rouge-2"] == pytest.approx(400 / 7, abs=1e-4)
    assert s["rouge-l"] == pytest.approx(200 / 3, abs=1e-4)
    assert s["bleu-4"] == pytest.approx(100 * math.exp(-1), abs=1e-4)


def test_means_over_rows_by_hand():
    pairs = [("the cat sat", "the cat sat on the mat"), ("Paris.", "Paris."), ("", "anything")]
    m = similarity_metrics(pairs)
    # exact match: 100 everywhere; empty prediction: 0 everywhere
    assert m["predict_bleu-4"] == pytest.approx((100 * math.exp(-1) + 100 + 0) / 3, abs=1e-3)
    assert m["predict_rouge-1"] == pytest.approx((200 / 3 + 100) / 3, abs=1e-3)
    assert m["predict_rouge-2"] == pytest.approx((400 / 7 + 100) / 3, abs=1e-3)
    assert m["predict_rouge-l"] == pytest.approx((200 / 3 + 100) / 3, abs=1e-3)
    assert set(m) == {"predict_bleu-4", "predict_rouge-1", "predict_rouge-2", "predict_rouge-l"}


def test_word_order_changes_rouge2_and_l_only():
    # "b a" vs "a b": unigrams all match (F1=1), no bigram matches (0), LCS 1 of 2 (F1=1/2)
    s = row_scores("b a", "a b")
    assert (s["rouge-1"], s["rouge-2"], s["rouge-l"]) == (100.0, 0.0, 50.0)


def test_a_prediction_run_writes_predict_results(tiny_folder, data_dir, tmp_path):  # noqa: F811
    import llmtune

    out = tmp_path / "pred"
    res = llmtune.train(base_cfg(tiny_folder, data_dir, out, val_size=0.25, do_predict=True,
                                 predict_with_generate=True, max_new_tokens=4, do_sample=False))
    written = json.loads((out / "predict_results.json").read_text())
    rows = [json.loads(line) for line in (out / "generated_predictions.jsonl").read_text().splitlines()]
    expected = similarity_metrics((r["predict"], r["label"]) for r in rows)
    assert written == expected and {k: res[k] for k in written} == written
