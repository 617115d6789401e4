"""Exact match after normalisation."""

from __future__ import annotations

from tunelab.evaluate.metrics.normalize import normalize_text


def exact_match(pred: str, ref: str, *, whitespace: bool = True, case: bool = True, width: bool = True) -> float:
    """1.0 when ``pred`` equals ``ref`` after :func:`normalize_text` with the given options, else 0.0."""
    options = {"whitespace": whitespace, "case": case, "width": width}
    return float(normalize_text(pred, **options) == normalize_text(ref, **options))
