"""Field-by-field comparison of two JSON objects, as used to score tool-call parameters and extracted fields.

Nested objects are flattened to dotted keys (``{"address": {"city": ...}}`` -> ``address.city``) so that a wrong
city costs one field, not the whole address. Keys are compared exactly (they are a schema, not free text); values
are compared after :func:`canonical_value`.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Iterable
from decimal import Decimal, InvalidOperation
from typing import Any

from tunelab.evaluate.metrics.normalize import normalize_text

CORRECT, WRONG, MISSING, EXTRA = "correct", "wrong", "missing", "extra"

# How each field status counts towards parameter precision and recall, as (tp, fp, fn). A wrong value is both a
# false positive (the predicted value is not in the reference) and a false negative (the reference value was not
# produced): the usual convention for slot filling, so that a wrong value costs more than leaving the field out.
STATUS_COUNTS: dict[str, tuple[int, int, int]] = {
    CORRECT: (1, 0, 0),
    WRONG: (0, 1, 1),
    MISSING: (0, 0, 1),
    EXTRA: (0, 1, 0),
}

# Matched against the normalised (casefolded) string, hence the lowercase ``e``.
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?")


def flatten_fields(obj: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested objects to dotted keys; lists, scalars and empty objects are leaves."""
    flat: dict[str, Any] = {}
    for key, value in obj.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten_fields(value, f"{path}."))
        else:
            flat[path] = value
    return flat


def canonical_value(value: Any) -> Hashable:
    """A hashable form of a JSON value under which equivalent answers are equal.

    Numbers and numeric strings compare by value (``"3" == 3 == "3.0"``; also ``"007" == 7``), strings after
    :func:`normalize_text` (whitespace, case, full-width), booleans and null by their JSON spelling (so ``"True"``
    equals ``true``), lists as multisets (order ignored, duplicates counted) and objects by key.
    """
    if isinstance(value, bool):  # before int: bool is a subclass of int
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return _canonical_number(repr(value))
    if isinstance(value, str):
        text = normalize_text(value)
        return _canonical_number(text) if _NUMBER.fullmatch(text) else text
    if isinstance(value, list):
        return ("list", tuple(sorted((canonical_value(item) for item in value), key=repr)))
    if isinstance(value, dict):
        return ("object", tuple(sorted((str(key), canonical_value(item)) for key, item in value.items())))
    return repr(value)


def _canonical_number(text: str) -> str:
    # Decimal rather than float: ids and amounts beyond 2**53 must not compare equal to their neighbours.
    try:
        number = Decimal(text)
    except InvalidOperation:
        return text
    return "0" if number == 0 else str(number.normalize())


def count_statuses(statuses: Iterable[str]) -> tuple[int, int, int]:
    """``(tp, fp, fn)`` summed over field statuses, per :data:`STATUS_COUNTS`."""
    tp = fp = fn = 0
    for status in statuses:
        status_tp, status_fp, status_fn = STATUS_COUNTS[status]
        tp, fp, fn = tp + status_tp, fp + status_fp, fn + status_fn
    return tp, fp, fn


def compare_fields(pred: dict[str, Any], ref: dict[str, Any]) -> dict[str, str]:
    """Status of every field of ``ref`` and ``pred`` (both already flat): correct, wrong, missing or extra."""
    statuses: dict[str, str] = {}
    for field, ref_value in ref.items():
        if field not in pred:
            statuses[field] = MISSING
        else:
            same = canonical_value(pred[field]) == canonical_value(ref_value)
            statuses[field] = CORRECT if same else WRONG
    for field in pred:
        if field not in ref:
            statuses[field] = EXTRA
    return statuses
