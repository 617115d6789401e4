"""Precision, recall and F1 from true-positive, false-positive and false-negative counts."""

from __future__ import annotations


def precision_recall_f1(tp: int, fp: int, fn: int) -> dict[str, float]:
    """``{"precision", "recall", "f1"}`` from counts.

    Nothing expected and nothing predicted (all counts zero) is a perfect score, 1.0 for all three: an answer that
    correctly has no fields must not drag an average down. Otherwise a zero denominator gives 0.0 (scikit-learn's
    ``zero_division=0``), and F1 is ``2tp / (2tp + fp + fn)``, which equals the harmonic mean of precision and recall
    whenever both are defined.
    """
    if tp + fp + fn == 0:
        return {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    return {
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / (tp + fn) if tp + fn else 0.0,
        "f1": 2 * tp / (2 * tp + fp + fn),
    }
