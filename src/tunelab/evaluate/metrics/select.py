"""Which metrics suit a sample: decided from its reference answer, never from the prediction.

``json`` when the reference is a JSON object or array (tool calls, structured extraction); ``label`` when it is one
of a small set of short answers that repeat across the test set (classification); ``text`` otherwise.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from typing import Literal

from tunelab.evaluate.metrics.normalize import normalize_text
from tunelab.evaluate.metrics.structured import parse_json_answer

AnswerKind = Literal["json", "label", "text"]

MAX_LABEL_CHARS = 32
"""A reference longer than this (after normalisation) is never a label."""


def infer_label_set(
    refs: Iterable[str], max_labels: int = 20, min_repeats: int = 2, min_share: float = 0.01
) -> set[str]:
    """The labels of a classification test set, normalised; empty when the references do not look like one.

    Candidates are references of at most :data:`MAX_LABEL_CHARS` characters, on one line, that are not JSON. A
    candidate is a label when at least ``min_repeats`` references, and at least ``min_share`` of all of them, have
    it: in a large mixed set a short number can repeat by chance, a class label repeats often. If more than
    ``max_labels`` candidates qualify, the answers are short free text (names, numbers, dates), not classes, and
    the set is empty.
    """
    refs = list(refs)
    threshold = max(min_repeats, math.ceil(min_share * len(refs)))
    counts = Counter(
        normalize_text(ref)
        for ref in refs
        if "\n" not in ref.strip()
        and len(normalize_text(ref)) <= MAX_LABEL_CHARS
        and parse_json_answer(ref, lenient=False) is None
    )
    labels = {label for label, count in counts.items() if count >= threshold and label}
    return labels if len(labels) <= max_labels else set()


def answer_kind(ref: str, label_set: set[str] | None) -> AnswerKind:
    """``"json"``, ``"label"`` or ``"text"`` for a reference answer; ``label_set`` ``None`` means no labels."""
    if parse_json_answer(ref, lenient=False) is not None:
        return "json"
    if label_set and normalize_text(ref) in {normalize_text(label) for label in label_set}:
        return "label"
    return "text"
