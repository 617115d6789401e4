"""Evaluate a model on a test set: predictions.jsonl (resumable) and metrics.json in an eval folder.

:func:`evaluate_model` evaluates one model; :func:`evaluate_columns` evaluates the base and several adapters of it,
loading the base once, into one eval folder each, and compares them. The folder layout is the contract
:mod:`tunelab.evaluate.compare` reads.

Resuming: predictions.jsonl grows one line per generated answer, so a rerun into the same folder continues after the
last complete line. Judge verdicts stored there are kept when they came from the same judge model, rubric and scale;
failed ones are asked again. Scores, reference losses and metrics.json are always recomputed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from tunelab.config.schema import DatasetSpec, Dtype
from tunelab.data.readers import load_records
from tunelab.data.record import Record
from tunelab.errors import DataError
from tunelab.evaluate.generate import (
    REPORT_FOLDER,
    EvalColumn,
    GenerationSettings,
    LoadedModel,
    SharedBase,
    generate_answers,
    mean_loss,
    reference_losses,
)
from tunelab.evaluate.judge import JudgeConfig, Judgement, JudgeResult, judge_samples, load_rubric
from tunelab.evaluate.metrics.embedding import EmbeddingScorer
from tunelab.evaluate.metrics.score import ScoringOptions, score_samples, summarize
from tunelab.evaluate.metrics.select import infer_label_set

ROW_FIELDS = ("index", "source", "prompt", "reference", "prediction")
"""What a prediction row holds before scoring; ``judge`` (a stored verdict) is kept too when present."""

JUDGE_CHUNK = 64
"""Verdicts are written to predictions.jsonl after every this many samples: an interruption loses at most one chunk."""


def read_test_records(path: str, limit: int | None = None) -> list[Record]:
    records = [r for r in load_records(DatasetSpec(path=path), "error").records if r.answer is not None]
    if not records:
        raise DataError(path, None, "no records with a reference answer to evaluate against")
    return records[:limit] if limit else records


def evaluate_model(
    loaded: LoadedModel, records: Sequence[Record], out_dir: Path, settings: GenerationSettings, *,
    cutoff_len: int = 2048, label_set: set[str] | None = None, embedder: EmbeddingScorer | None = None,
    judge: JudgeConfig | None = None, scoring: ScoringOptions | None = None,
) -> dict[str, Any]:
    """Generate (continuing from any predictions already written), judge, score, and write metrics.json.

    ``embedder`` adds ``embedding_cosine`` to text answers; ``judge`` adds ``scores["judge"]`` (0-1) to each sample
    the judge scored and a ``judge`` block (its summary) to the metrics.
    """
    scoring = scoring or ScoringOptions()
    if scoring.kind == "json":
        _check_json_references(records)  # before generating: scoring would fail only after it
    out_dir.mkdir(parents=True, exist_ok=True)
    pred_path = out_dir / "predictions.jsonl"
    _start_over_unless_same(out_dir, pred_path, evaluation_identity(loaded, settings))
    rows = _read_done(pred_path, records)
    if len(rows) < len(records):
        with pred_path.open("a", encoding="utf-8") as handle:
            todo = records[len(rows) :]
            answers = generate_answers(loaded, todo, settings, desc=f"eval {loaded.label}", first_index=len(rows))
            for offset, answer in answers:
                row = _row(len(rows), todo[offset], answer)
                rows.append(row)
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
                handle.flush()
    judge_summary = _judge_rows(rows, judge, pred_path) if judge is not None else None
    refs = [row["reference"] for row in rows]
    preds = [row["prediction"] for row in rows]
    if label_set is None:
        label_set = infer_label_set(refs)
    samples = score_samples(preds, refs, label_set=label_set, embedder=embedder, kind=scoring.kind,
                            whitespace=scoring.whitespace, case=scoring.case, width=scoring.width)
    if judge is not None:
        for row, sample in zip(rows, samples, strict=True):
            if row["judge"]["score"] is not None:
                sample.scores["judge"] = row["judge"]["score"] / judge.max_score
    losses = reference_losses(loaded, records, cutoff_len, settings.batch_size)
    for row, sample, loss in zip(rows, samples, losses, strict=True):
        row["kind"] = sample.kind
        row["scores"] = sample.scores
        row["ref_loss"] = loss
    _write_rows(pred_path, rows)
    ref_loss, perplexity = mean_loss(losses)
    metrics = {
        "label": loaded.label,
        "model": loaded.model_path,
        "adapter": loaded.adapter_path,
        "template": loaded.template.name,
        "n": len(rows),
        **summarize(samples, preds, refs),
        "ref_loss": ref_loss,
        "perplexity": perplexity,
        "generation": settings.describe(),
        "scoring": {"answer_kind": scoring.kind,
                    "exact_match": "normalized" if scoring.case else "strict"},
    }
    if judge_summary is not None:
        metrics["judge"] = judge_summary
    (out_dir / "metrics.json").write_text(json.dumps(metrics, ensure_ascii=False, indent=2), "utf-8")
    return metrics


def evaluate_columns(
    model_path: str, columns: Sequence[EvalColumn], records: Sequence[Record], out_dir: Path,
    settings: GenerationSettings, *, template: str | None = None, dtype: Dtype = "auto",
    trust_remote_code: bool = False, cutoff_len: int = 2048, embedder: EmbeddingScorer | None = None,
    judge: JudgeConfig | None = None, console: Console | None = None, scoring: ScoringOptions | None = None,
) -> tuple[list[dict[str, Any]], Path | None]:
    """Evaluate every column into ``out_dir/NAME`` with the base weights loaded once; with two or more columns,
    compare them into ``out_dir/report`` (the first column is the baseline).

    Returns each column's metrics and the path of ``comparison.md`` (``None`` for a single column).
    """
    shared = SharedBase(model_path, columns, template=template, dtype=dtype, trust_remote_code=trust_remote_code)
    templates = {name: loaded.template.name for name, loaded in shared.columns.items()}
    if console is not None and len(set(templates.values())) > 1:
        listed = ", ".join(f"{name}: {template}" for name, template in templates.items())
        console.print(f"[yellow]note[/]: the columns are prompted with different templates ({listed}), each the way "
                      "its run was trained; --template NAME asks them all the same way")
    results = []
    for column in columns:
        with shared.activate(column.name) as loaded:
            results.append(evaluate_model(loaded, records, out_dir / column.name, settings, cutoff_len=cutoff_len,
                                          embedder=embedder, judge=judge, scoring=scoring))
    if len(columns) < 2:
        return results, None
    from tunelab.evaluate.compare import compare_evals

    compare_evals([out_dir / column.name for column in columns], out_dir / REPORT_FOLDER)
    return results, out_dir / REPORT_FOLDER / "comparison.md"


# ---------------------------------------------------------------------------------------------------- judge


def _judge_rows(rows: list[dict[str, Any]], judge: JudgeConfig, pred_path: Path) -> dict[str, Any]:
    """Give every row a verdict in ``row["judge"]``, asking only for those without a usable stored one."""
    identity = {"model": judge.model, "max_score": judge.max_score,
                "rubric_sha256": hashlib.sha256(load_rubric(judge.rubric).encode("utf-8")).hexdigest()}
    todo = [i for i, row in enumerate(rows) if not _reusable_verdict(row, identity)]
    for start in range(0, len(todo), JUDGE_CHUNK):
        chunk = todo[start : start + JUDGE_CHUNK]
        samples = [{"question": rows[i]["prompt"], "reference": rows[i]["reference"],
                    "prediction": rows[i]["prediction"]} for i in chunk]
        result = judge_samples(samples, judge)
        for i, judgement in zip(chunk, result.judgements, strict=True):
            rows[i]["judge"] = {"status": judgement.status, "score": judgement.score, "reply": judgement.raw,
                                "error": judgement.error, "attempts": judgement.attempts, **identity}
        _write_rows(pred_path, rows)
    judgements = [Judgement(score=r["judge"]["score"], raw=r["judge"]["reply"], error=r["judge"]["error"],
                            attempts=r["judge"]["attempts"]) for r in rows]
    return {**JudgeResult(judgements, judge.max_score).summary(), "model": judge.model, "max_score": judge.max_score}


def _reusable_verdict(row: dict[str, Any], identity: dict[str, Any]) -> bool:
    """A stored verdict that came back from the same judge setup (a failed call is worth asking again)."""
    verdict = row.get("judge")
    if not isinstance(verdict, dict) or any(verdict.get(k) != v for k, v in identity.items()):
        return False
    return verdict.get("status") in ("scored", "unparsable") and {"score", "reply", "error", "attempts"} <= set(verdict)


# ---------------------------------------------------------------------------------------------------- files


def _row(index: int, record: Record, answer: str) -> dict[str, Any]:
    prompt = record.prompt_turns[-1].content if record.prompt_turns else ""
    return {"index": index, "source": record.source, "prompt": prompt, "reference": record.answer,
            "prediction": answer}


def _write_rows(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")


def _check_json_references(records: Sequence[Record]) -> None:
    from tunelab.evaluate.metrics.structured import parse_json_answer

    for record in records:
        if parse_json_answer(record.answer or "", lenient=False) is None:
            raise DataError(record.source, "reference", f"--answer-kind json: not a JSON object or array: "
                            f"{(record.answer or '')[:80]!r}; use --answer-kind auto to score such answers as text")


IDENTITY_FILE = "evaluation.json"


def evaluation_identity(loaded: LoadedModel, settings: GenerationSettings) -> dict[str, Any]:
    """What the predictions of an eval folder were made with: model and adapter (with their weight files' sizes and
    times, so a retrained adapter in the same folder counts as another model), template and generation settings."""
    return {"model": loaded.model_path, "adapter": loaded.adapter_path, "template": loaded.template.name,
            "weights": [_weight_files(p) for p in (loaded.model_path, loaded.adapter_path) if p],
            "generation": settings.describe()}


def _weight_files(path: str) -> list[list[Any]]:
    folder = Path(path)
    if not folder.is_dir():
        return []  # a hub id: its name is all there is to compare
    stats = [(f.name, f.stat()) for f in sorted(folder.glob("*.safetensors"))]
    return [[name, stat.st_size, stat.st_mtime_ns] for name, stat in stats]


def _start_over_unless_same(out_dir: Path, pred_path: Path, identity: dict[str, Any]) -> None:
    """A resumed evaluation continues only predictions made by the same model and settings; others are discarded
    (an eval folder reused for another model, or after-training predictions of a run that has since trained on)."""
    marker = out_dir / IDENTITY_FILE
    before = json.loads(marker.read_text("utf-8")) if marker.is_file() else None
    if pred_path.is_file() and before != identity:
        Console(stderr=True).print(f"{pred_path}: made by another model or settings than this evaluation's; "
                                   "starting over")
        pred_path.unlink()
    marker.write_text(json.dumps(identity, ensure_ascii=False, indent=2), "utf-8")


def _read_done(path: Path, records: Sequence[Record]) -> list[dict[str, Any]]:
    """Predictions already written for the same records in the same order (a resumed evaluation)."""
    if not path.is_file():
        return []
    rows: list[dict[str, Any]] = []
    for line in path.read_text("utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break  # a line cut off by the interruption: regenerate from here
        index = len(rows)
        if index >= len(records):
            break  # a rerun with fewer samples (--max-samples): the first ones still stand
        expected = _row(index, records[index], "")
        if any(row.get(field) != expected[field] for field in ("source", "prompt", "reference")):
            raise DataError(str(path), None, f"holds predictions for other test data (line {index + 1}: "
                            f"{row.get('source')}); remove it or use another -o")
        kept = {k: row[k] for k in ROW_FIELDS}
        if "judge" in row:
            kept["judge"] = row["judge"]
        rows.append(kept)
    _write_rows(path, rows)
    return rows
