"""Per-sample scores and their summary: the entry point of the evaluation runner.

Each sample gets ``exact_match`` plus the metrics of its kind (:func:`~select.answer_kind`):

- ``json``: ``json_valid``, ``intent_correct`` (only when the reference has an intent), ``param_f1``
- ``label``: ``correct``
- ``text``: ``rouge1``, ``rouge2``, ``rougeL`` (F1 of each), ``bleu``, and ``embedding_cosine`` with an embedder
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from tunelab.evaluate.metrics.bootstrap import bootstrap_ci
from tunelab.evaluate.metrics.classification import classification_report
from tunelab.evaluate.metrics.embedding import EmbeddingScorer
from tunelab.evaluate.metrics.exact import exact_match
from tunelab.evaluate.metrics.normalize import normalize_text
from tunelab.evaluate.metrics.select import AnswerKind, answer_kind, infer_label_set
from tunelab.evaluate.metrics.structured import aggregate_tool_calls, score_tool_call
from tunelab.evaluate.metrics.text import bleu, corpus_bleu, rouge_l, rouge_n


@dataclass(frozen=True)
class SampleScores:
    """The kind of one sample's reference and its metric values, each in 0..1 (cosine in -1..1)."""

    kind: AnswerKind
    scores: dict[str, float]


def _json_scores(pred: str, ref: str) -> dict[str, float]:
    call = score_tool_call(pred, ref)
    scores = {"json_valid": float(call.json_valid)}
    if call.intent_correct is not None:
        scores["intent_correct"] = float(call.intent_correct)
    scores["param_f1"] = call.param_f1
    return scores


def _label_scores(pred: str, ref: str) -> dict[str, float]:
    # Always normalised, whatever the exact-match options: classification_report compares labels this way too.
    return {"correct": float(normalize_text(pred) == normalize_text(ref))}


def _text_scores(pred: str, ref: str) -> dict[str, float]:
    return {
        "rouge1": rouge_n(pred, ref, 1)["f"],
        "rouge2": rouge_n(pred, ref, 2)["f"],
        "rougeL": rouge_l(pred, ref)["f"],
        "bleu": bleu(pred, ref),
    }


KIND_SCORERS: dict[AnswerKind, Callable[[str, str], dict[str, float]]] = {
    "json": _json_scores,
    "label": _label_scores,
    "text": _text_scores,
}


@dataclass(frozen=True)
class ScoringOptions:
    """How answers are scored: the kind (``auto`` decides per sample) and exact match's normalisation."""

    kind: Literal["auto", "json", "label", "text"] = "auto"
    whitespace: bool = True
    case: bool = True
    width: bool = True


def scoring_options(kind: str = "auto", exact_match: str = "normalized") -> ScoringOptions:
    """Options from the config's ``eval.answer_kind`` and ``eval.exact_match`` (or the matching CLI flags)."""
    normalized = exact_match == "normalized"
    return ScoringOptions(kind=kind, whitespace=normalized, case=normalized, width=normalized)  # type: ignore[arg-type]


def score_samples(
    preds: Sequence[str],
    refs: Sequence[str],
    *,
    label_set: set[str] | None = None,
    embedder: EmbeddingScorer | None = None,
    whitespace: bool = True,
    case: bool = True,
    width: bool = True,
    kind: Literal["auto", "json", "label", "text"] = "auto",
) -> list[SampleScores]:
    """Score every prediction against its reference.

    ``label_set``: ``None`` infers it from ``refs`` (:func:`~select.infer_label_set`); pass ``set()`` to treat no
    answer as a label. ``whitespace``, ``case``, ``width``: the :func:`normalize_text` options of ``exact_match``.
    ``embedder``: adds ``embedding_cosine`` to text samples, encoded in one batch. ``kind``: score every sample as
    that kind instead of deciding per sample (for a data set whose answer type the user knows).
    """
    _check_lengths(preds, refs)
    if kind == "auto":
        labels = infer_label_set(refs) if label_set is None else label_set
        kinds = [answer_kind(ref, labels) for ref in refs]
    else:
        kinds = [kind] * len(refs)
    all_scores = [
        {"exact_match": exact_match(pred, ref, whitespace=whitespace, case=case, width=width)}
        | KIND_SCORERS[kind](pred, ref)
        for pred, ref, kind in zip(preds, refs, kinds, strict=True)
    ]
    if embedder is not None:
        text_rows = [i for i, kind in enumerate(kinds) if kind == "text"]
        cosines = embedder.similarity([preds[i] for i in text_rows], [refs[i] for i in text_rows])
        for i, cosine in zip(text_rows, cosines, strict=True):
            all_scores[i]["embedding_cosine"] = cosine
    return [SampleScores(kind, scores) for kind, scores in zip(kinds, all_scores, strict=True)]


def summarize(samples: Sequence[SampleScores], preds: Sequence[str], refs: Sequence[str]) -> dict[str, Any]:
    """Means over all samples and per kind, with corpus-level metrics per kind; JSON-serialisable.

    ``{"overall": M, "groups": {kind: M + extras}}`` for the kinds present, where ``M`` is ``{"n": count,
    metric: mean over the samples that have the metric, ..., "ci95": {metric: [low, high]}}`` (percentile
    bootstrap of the mean, seed 0). Extras: ``json`` adds ``"tool_calls"`` (:func:`aggregate_tool_calls`), ``label``
    adds ``"classification"`` (:func:`classification_report`), ``text`` adds ``"corpus_bleu"``.
    """
    _check_lengths(preds, refs)
    if len(samples) != len(refs):
        raise ValueError(f"{len(samples)} scored samples for {len(refs)} references")
    groups: dict[str, dict[str, Any]] = {}
    for kind in KIND_SCORERS:
        rows = [i for i, sample in enumerate(samples) if sample.kind == kind]
        if rows:
            groups[kind] = _means([samples[i] for i in rows])
            groups[kind].update(_corpus_metrics(kind, [preds[i] for i in rows], [refs[i] for i in rows]))
    return {"overall": _means(samples), "groups": groups}


def _corpus_metrics(kind: str, preds: list[str], refs: list[str]) -> dict[str, Any]:
    if kind == "json":
        calls = [score_tool_call(pred, ref) for pred, ref in zip(preds, refs, strict=True)]
        return {"tool_calls": aggregate_tool_calls(calls)}
    if kind == "label":
        return {"classification": classification_report(preds, refs)}
    return {"corpus_bleu": corpus_bleu(preds, refs)}


def _means(samples: Sequence[SampleScores]) -> dict[str, Any]:
    values: dict[str, list[float]] = {}
    for sample in samples:
        for metric, value in sample.scores.items():
            values.setdefault(metric, []).append(value)
    summary: dict[str, Any] = {"n": len(samples)}
    summary.update({metric: sum(v) / len(v) for metric, v in values.items()})
    summary["ci95"] = {metric: list(bootstrap_ci(v)) for metric, v in values.items()}
    return summary


def _check_lengths(preds: Sequence[str], refs: Sequence[str]) -> None:
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions for {len(refs)} references")
