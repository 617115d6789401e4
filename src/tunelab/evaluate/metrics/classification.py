"""Accuracy, per-label precision/recall/F1, macro F1 and a confusion matrix for label answers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tunelab.evaluate.metrics.normalize import normalize_text
from tunelab.evaluate.metrics.prf import precision_recall_f1


def classification_report(preds: Sequence[str], refs: Sequence[str]) -> dict[str, Any]:
    """Score predicted labels against reference labels.

    Both sides are normalised (:func:`normalize_text`: strip and collapse whitespace, casefold, full-width to
    half-width) before comparison; a label is reported with its first spelling among the references (or, for a
    label only ever predicted, among the predictions).

    The label set is the union of reference and predicted labels, as scikit-learn does by default, so a
    prediction outside the reference labels is a label of its own with support 0 and F1 0. ``macro_f1`` is the
    unweighted mean over that union: inventing labels lowers it. Labels are sorted by their normalised form.

    Keys: ``n``, ``accuracy``, ``macro_f1``, ``labels``, ``per_label`` ``{label: {precision, recall, f1,
    support}}`` and ``confusion`` ``{"labels": [...], "matrix": [[...]]}`` with one row per reference label and one
    column per predicted label, in ``labels`` order.
    """
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions for {len(refs)} references")
    pred_keys = [normalize_text(p) for p in preds]
    ref_keys = [normalize_text(r) for r in refs]
    spelling: dict[str, str] = {}
    for key, text in [*zip(ref_keys, refs, strict=True), *zip(pred_keys, preds, strict=True)]:
        spelling.setdefault(key, text.strip())
    keys = sorted(spelling)
    index = {key: i for i, key in enumerate(keys)}
    matrix = [[0] * len(keys) for _ in keys]
    for ref_key, pred_key in zip(ref_keys, pred_keys, strict=True):
        matrix[index[ref_key]][index[pred_key]] += 1

    per_label = {}
    for i, key in enumerate(keys):
        tp = matrix[i][i]
        support = sum(matrix[i])
        predicted = sum(row[i] for row in matrix)
        per_label[spelling[key]] = {**precision_recall_f1(tp, predicted - tp, support - tp), "support": support}
    labels = [spelling[key] for key in keys]
    correct = sum(matrix[i][i] for i in range(len(keys)))
    return {
        "n": len(refs),
        "accuracy": correct / len(refs) if refs else None,
        "macro_f1": sum(m["f1"] for m in per_label.values()) / len(per_label) if per_label else None,
        "labels": labels,
        "per_label": per_label,
        "confusion": {"labels": labels, "matrix": matrix},
    }
