"""Evaluate one model on a test set: predictions.jsonl (resumable) and metrics.json in an eval folder.

The folder layout is the contract :mod:`tunelab.evaluate.compare` reads.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tunelab.config.schema import DatasetSpec
from tunelab.data.readers import load_records
from tunelab.data.record import Record
from tunelab.errors import DataError
from tunelab.evaluate.generate import GenerationSettings, LoadedModel, generate_answers, mean_loss, reference_losses
from tunelab.evaluate.metrics.score import score_samples, summarize
from tunelab.evaluate.metrics.select import infer_label_set


def read_test_records(path: str, limit: int | None = None) -> list[Record]:
    records = [r for r in load_records(DatasetSpec(path=path), "error").records if r.answer is not None]
    if not records:
        raise DataError(path, None, "no records with a reference answer to evaluate against")
    return records[:limit] if limit else records


def evaluate_model(
    loaded: LoadedModel, records: Sequence[Record], out_dir: Path, settings: GenerationSettings, *,
    cutoff_len: int = 2048, label_set: set[str] | None = None,
) -> dict[str, Any]:
    """Generate (continuing from any predictions already written), then score and write metrics.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pred_path = out_dir / "predictions.jsonl"
    rows = _read_done(pred_path, records)
    if len(rows) < len(records):
        with pred_path.open("a", encoding="utf-8") as handle:
            todo = records[len(rows) :]
            for offset, answer in generate_answers(loaded, todo, settings, desc=f"eval {loaded.label}"):
                row = _row(len(rows), todo[offset], answer)
                rows.append(row)
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
                handle.flush()
    refs = [row["reference"] for row in rows]
    preds = [row["prediction"] for row in rows]
    if label_set is None:
        label_set = infer_label_set(refs)
    samples = score_samples(preds, refs, label_set=label_set)
    losses = reference_losses(loaded, records, cutoff_len, settings.batch_size)
    for row, sample, loss in zip(rows, samples, losses, strict=True):
        row["kind"] = sample.kind
        row["scores"] = sample.scores
        row["ref_loss"] = loss
    pred_path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
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
        "generation": {"max_new_tokens": settings.max_new_tokens, "do_sample": settings.do_sample,
                       "batch_size": settings.batch_size},
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, ensure_ascii=False, indent=2), "utf-8")
    return metrics


def _row(index: int, record: Record, answer: str) -> dict[str, Any]:
    prompt = record.prompt_turns[-1].content if record.prompt_turns else ""
    return {"index": index, "source": record.source, "prompt": prompt, "reference": record.answer,
            "prediction": answer}


def _read_done(path: Path, records: Sequence[Record]) -> list[dict[str, Any]]:
    """Predictions already written for the same records in the same order (a resumed evaluation)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text("utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break  # a line cut off by the interruption: regenerate from here
        index = len(rows)
        if index >= len(records) or row.get("source") != records[index].source:
            raise DataError(str(path), None, "holds predictions for other test data; remove it or use another -o")
        rows.append({k: row[k] for k in ("index", "source", "prompt", "reference", "prediction")})
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return rows
