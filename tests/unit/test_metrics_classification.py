"""classification_report against a confusion matrix worked out by hand."""

import json

import pytest

from tunelab.evaluate.metrics import classification_report

REFS = ["正面", "正面", "负面", "中性", "负面", "正面"]
PREDS = ["正面", "负面", "负面", "正面", "负面", " 正面 "]


def test_confusion_matrix_and_scores_match_hand_computation():
    report = classification_report(PREDS, REFS)
    # Labels sort by code point: 中 U+4E2D < 正 U+6B63 < 负 U+8D1F. Rows are references, columns predictions.
    assert report["labels"] == ["中性", "正面", "负面"]
    assert report["confusion"] == {"labels": ["中性", "正面", "负面"], "matrix": [[0, 1, 0], [0, 2, 1], [0, 0, 2]]}
    assert report["n"] == 6
    assert report["accuracy"] == pytest.approx(4 / 6)
    per_label = report["per_label"]
    assert per_label["中性"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    # 正面: tp 2, fp 1 (the 中性 row), fn 1 (predicted 负面)
    assert per_label["正面"] == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3})
    # 负面: tp 2, fp 1, fn 0 -> F1 = 4 / 5
    assert per_label["负面"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    assert report["macro_f1"] == pytest.approx((0 + 2 / 3 + 0.8) / 3)
    json.dumps(report, allow_nan=False)


def test_case_width_and_whitespace_do_not_matter_and_reference_spelling_is_kept():
    report = classification_report(["positive", "ＮＥＧＡＴＩＶＥ ", "Positive"], ["Positive", "Negative", "Positive"])
    assert report["accuracy"] == 1.0
    assert report["labels"] == ["Negative", "Positive"]
    assert report["confusion"]["matrix"] == [[1, 0], [0, 2]]


def test_a_label_only_predicted_joins_the_union_with_zero_support():
    report = classification_report(["是", "不确定"], ["是", "否"])
    assert report["labels"] == ["不确定", "否", "是"]
    assert report["per_label"]["不确定"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert report["confusion"]["matrix"] == [[0, 0, 0], [1, 0, 0], [0, 0, 1]]
    assert report["macro_f1"] == pytest.approx(1 / 3)


def test_lengths_must_match():
    with pytest.raises(ValueError, match="1 predictions for 2 references"):
        classification_report(["是"], ["是", "否"])
