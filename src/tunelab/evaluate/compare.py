"""Side by side comparison of several evaluations of the same test set.

The input is the folders ``tunelab eval`` writes (``metrics.json`` + ``predictions.jsonl``), or run folders holding
them under ``eval/``. The first folder is the baseline: every other column gets a delta against it, with a paired
bootstrap interval, and the list of samples it got right that the baseline got wrong (and the reverse).

Writes ``comparison.json`` (the dict returned by :func:`compare_evals`), ``comparison.md`` and a self-contained
``comparison.html``. Rendering lives in :mod:`tunelab.report`; this module only reads and computes.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import DataError, RunError
from tunelab.evaluate.metrics.bootstrap import bootstrap_ci

__all__ = ["EvalRun", "compare_evals", "load_eval_dir", "resolve_eval_dirs", "run_compare"]

CONFIDENCE = 0.95
"""Level of every interval in the comparison (the default of :func:`bootstrap_ci`)."""

LOWER_IS_BETTER = frozenset({"ref_loss", "perplexity", "loss"})
"""Metrics where a fall is an improvement; every other metric is read as higher-is-better."""

FLIP_SCORES = ("exact_match", "correct")
"""Per-sample scores that decide right/wrong for flips, in order of preference (labels may only have ``correct``)."""

FLIP_RIGHT_AT = 0.5
"""A flip score at or above this counts as right; the scores are 0/1, this only guards against float noise."""

# A drop equal to the threshold is not "past" it; 0.80 - 0.75 is 0.05000000000000004 in floats, hence the slack.
_THRESHOLD_SLACK = 1e-9

FORGETTING_ADVICE = (
    "Mix general-domain data into training with dataset weights in the config, e.g. "
    "`data.datasets: [{path: task.jsonl, weight: 1.0}, {path: general.jsonl, weight: 0.3}]`, "
    "or train for fewer steps / with a lower learning rate."
)

_EVAL_SUBDIR = "eval"
_BASELINE_NAME = "base"


@dataclass(frozen=True)
class EvalRun:
    """One eval folder as read from disk: ``metrics.json`` fields plus the predictions in file order."""

    path: Path
    label: str
    model: str | None
    adapter: str | None
    overall: dict[str, Any]
    groups: dict[str, dict[str, Any]]
    ref_loss: float | None
    perplexity: float | None
    predictions: list[dict[str, Any]]


# ----------------------------------------------------------------------------------------------------- reading


def resolve_eval_dirs(paths: Sequence[str | Path]) -> list[Path]:
    """Turn eval folders and run folders into eval folders, keeping the given order.

    An eval folder (it holds ``metrics.json``) stands for itself. A run folder stands for the eval folders under its
    ``eval/`` subfolder: ``base`` first (it is the baseline), then the others by name.
    """
    resolved: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if (path / "metrics.json").is_file():
            resolved.append(path)
            continue
        evals = path / _EVAL_SUBDIR
        found = sorted(d for d in evals.iterdir() if (d / "metrics.json").is_file()) if evals.is_dir() else []
        if not found:
            raise DataError(
                str(path), None, "not an eval folder (no metrics.json) and no eval/ subfolder holding eval folders"
            )
        resolved.extend(sorted(found, key=lambda d: d.name != _BASELINE_NAME))  # stable: keeps name order otherwise
    return resolved


def load_eval_dir(path: Path) -> EvalRun:
    """Read ``metrics.json`` and ``predictions.jsonl`` of one eval folder; malformed input is a :class:`DataError`."""
    metrics_path = path / "metrics.json"
    if not metrics_path.is_file():
        raise DataError(str(metrics_path), None, "file not found (is this an eval folder written by `tunelab eval`?)")
    try:
        metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{metrics_path}:{err.lineno}", None, f"invalid JSON: {err.msg}") from None
    if not isinstance(metrics, dict):
        raise DataError(str(metrics_path), None, "expected a JSON object")
    for field, kind in (("label", str), ("overall", dict)):
        if not isinstance(metrics.get(field), kind):
            raise DataError(str(metrics_path), field, f"missing or not a {kind.__name__}")
    groups = metrics.get("groups") or {}
    if not isinstance(groups, dict):
        raise DataError(str(metrics_path), "groups", "not an object")
    return EvalRun(
        path=path,
        label=metrics["label"],
        model=metrics.get("model"),
        adapter=metrics.get("adapter"),
        overall=metrics["overall"],
        groups=groups,
        ref_loss=_number_or_none(metrics.get("ref_loss")),
        perplexity=_number_or_none(metrics.get("perplexity")),
        predictions=_read_predictions(path / "predictions.jsonl"),
    )


def _read_predictions(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DataError(str(path), None, "file not found")
    samples = []
    with path.open(encoding="utf-8") as lines:
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                sample = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(where, None, f"invalid JSON: {err.msg}") from None
            if not isinstance(sample, dict):
                raise DataError(where, None, "expected a JSON object")
            for field, kind in (("index", int), ("prediction", str), ("kind", str), ("scores", dict)):
                if not isinstance(sample.get(field), kind):
                    raise DataError(where, field, f"missing or not a {kind.__name__}")
            samples.append(sample)
    return samples


def _check_aligned(runs: Sequence[EvalRun]) -> None:
    """Paired statistics need the same samples in the same order in every folder."""
    first = runs[0]
    for run in runs[1:]:
        where = str(run.path / "predictions.jsonl")
        if len(run.predictions) != len(first.predictions):
            raise DataError(
                where,
                None,
                f"{len(run.predictions)} predictions but {first.path} has {len(first.predictions)}: "
                "compare evaluations of the same test set",
            )
        for position, (a, b) in enumerate(zip(first.predictions, run.predictions, strict=True)):
            # the question and reference too: the same count and order of another test set would pair unrelated
            # samples (a few-shot column keeps the question; its examples are earlier turns). Not the source: the
            # runs of a sweep each read their own copy of one test split.
            for field in ("index", "prompt", "reference"):
                if a.get(field) != b.get(field):
                    raise DataError(
                        where,
                        field,
                        f"sample {position + 1} has {field} {b.get(field)!r} but {first.path} has "
                        f"{a.get(field)!r}: compare evaluations of the same test set, in the same order",
                    )


def _unique_labels(runs: Sequence[EvalRun]) -> list[str]:
    """Labels key the columns, so two runs both called ``finetuned`` become ``finetuned`` and ``finetuned #2``."""
    labels: list[str] = []
    for run in runs:
        label, copy = run.label, 1
        while label in labels:
            copy += 1
            label = f"{run.label} #{copy}"
        labels.append(label)
    return labels


# ----------------------------------------------------------------------------------------------------- numbers


def _number_or_none(value: Any) -> float | None:
    """A finite number as float, else None (JSON has no NaN, and a bool is not a score)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _sample_score(sample: dict[str, Any], metric: str) -> float | None:
    if metric in sample["scores"]:
        return _number_or_none(sample["scores"][metric])
    if metric == "ref_loss":  # the per-sample loss sits beside the scores, not inside them
        return _number_or_none(sample.get("ref_loss"))
    return None


def _interval(values: Sequence[float], *, seed: int, n_resamples: int) -> list[float] | None:
    if not values:
        return None
    low, high = bootstrap_ci(values, seed=seed, n_resamples=n_resamples, confidence=CONFIDENCE)
    return [low, high]


def _metric_names(tables: Sequence[dict[str, Any]]) -> list[str]:
    """Numeric entries of the tables, in first-seen order; ``n`` and nested dicts (confusion, per_field) are not."""
    names: list[str] = []
    for table in tables:
        for key, value in table.items():
            if key != "n" and key not in names and _number_or_none(value) is not None:
                names.append(key)
    return names


def _metric_row(
    metric: str,
    labels: Sequence[str],
    values: Sequence[float | None],
    samples: Sequence[Sequence[dict[str, Any]]],
    *,
    seed: int,
    n_resamples: int,
) -> dict[str, Any]:
    """One metric across the columns: value, CI of the per-sample mean, delta vs column 0 and its paired CI."""
    scores = [[_sample_score(s, metric) for s in column] for column in samples]
    cells: dict[str, dict[str, Any]] = {}
    for position, (label, value, column) in enumerate(zip(labels, values, scores, strict=True)):
        scored = [x for x in column if x is not None]
        cell: dict[str, Any] = {
            "value": value,
            "n_scored": len(scored),
            "score_mean": statistics.fmean(scored) if scored else None,
            "ci": _interval(scored, seed=seed, n_resamples=n_resamples),
        }
        if position > 0:
            base = values[0]
            # Resampling the differences resamples the same sample indices for both columns: a paired bootstrap.
            diffs = [x - b for b, x in zip(scores[0], column, strict=True) if b is not None and x is not None]
            delta_ci = _interval(diffs, seed=seed, n_resamples=n_resamples)
            cell["delta"] = value - base if value is not None and base is not None else None
            cell["delta_ci"] = delta_ci
            cell["significant"] = delta_ci is not None and (delta_ci[0] > 0 or delta_ci[1] < 0)
        cells[label] = cell
    return {"higher_is_better": metric not in LOWER_IS_BETTER, "columns": cells}


def _overall_table(run: EvalRun) -> dict[str, Any]:
    table = dict(run.overall)
    for name, value in (("ref_loss", run.ref_loss), ("perplexity", run.perplexity)):
        if value is not None:
            table.setdefault(name, value)
    return table


def _metric_table(
    labels: Sequence[str],
    tables: Sequence[dict[str, Any]],
    samples: Sequence[Sequence[dict[str, Any]]],
    *,
    seed: int,
    n_resamples: int,
) -> dict[str, Any]:
    return {
        metric: _metric_row(
            metric,
            labels,
            [_number_or_none(table.get(metric)) for table in tables],
            samples,
            seed=seed,
            n_resamples=n_resamples,
        )
        for metric in _metric_names(tables)
    }


def _group_tables(runs: Sequence[EvalRun], labels: Sequence[str], *, seed: int, n_resamples: int) -> dict[str, Any]:
    kinds = list(dict.fromkeys(kind for run in runs for kind in run.groups))
    groups = {}
    for kind in kinds:
        tables = [run.groups.get(kind) or {} for run in runs]
        positions = [i for i, s in enumerate(runs[0].predictions) if s["kind"] == kind]
        samples = [[run.predictions[i] for i in positions] for run in runs]
        groups[kind] = {
            "n": {label: table.get("n") for label, table in zip(labels, tables, strict=True)},
            "metrics": _metric_table(labels, tables, samples, seed=seed, n_resamples=n_resamples),
        }
    return groups


# ----------------------------------------------------------------------------------------------------- flips


def _is_right(sample: dict[str, Any], metric: str) -> bool:
    return (_sample_score(sample, metric) or 0.0) >= FLIP_RIGHT_AT


def _flip_metric(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    for metric in FLIP_SCORES:
        if _sample_score(a, metric) is not None and _sample_score(b, metric) is not None:
            return metric
    return None


def _flips(baseline: EvalRun, other: EvalRun) -> dict[str, Any]:
    lists: dict[str, list[dict[str, Any]]] = {"wrong_to_right": [], "right_to_wrong": []}
    compared = 0
    for base, sample in zip(baseline.predictions, other.predictions, strict=True):
        metric = _flip_metric(base, sample)
        if metric is None:
            continue
        compared += 1
        before, after = _is_right(base, metric), _is_right(sample, metric)
        if before == after:
            continue
        lists["right_to_wrong" if before else "wrong_to_right"].append(
            {
                "index": base["index"],
                "prompt": base.get("prompt", ""),
                "reference": base.get("reference", ""),
                "baseline_prediction": base["prediction"],
                "prediction": sample["prediction"],
            }
        )
    counts = {direction: len(items) for direction, items in lists.items()}
    counts["unchanged"] = compared - counts["wrong_to_right"] - counts["right_to_wrong"]
    counts["compared"] = compared
    return {"counts": counts, **lists}


# ----------------------------------------------------------------------------------------------------- forgetting


def _forgetting(probe_dirs: Sequence[Path], *, threshold: float, seed: int, n_resamples: int) -> dict[str, Any]:
    """Change of general-ability probe exact_match from the first probe folder (the baseline) to each other one."""
    probes = [load_eval_dir(p) for p in probe_dirs]
    if len(probes) < 2:
        raise RunError(f"forgetting needs a baseline probe and at least one more, got {len(probes)} probe folder(s)")
    _check_aligned(probes)
    for probe in probes:
        if _number_or_none(probe.overall.get("exact_match")) is None:
            raise DataError(str(probe.path / "metrics.json"), "overall.exact_match", "missing; the probe needs it")
    labels = _unique_labels(probes)
    row = _metric_row(
        "exact_match",
        labels,
        [float(p.overall["exact_match"]) for p in probes],
        [p.predictions for p in probes],
        seed=seed,
        n_resamples=n_resamples,
    )
    base_value = row["columns"][labels[0]]["value"]
    columns = []
    for label, probe in zip(labels[1:], probes[1:], strict=True):
        cell = row["columns"][label]
        drop = -cell["delta"]
        columns.append(
            {
                "label": label,
                "path": str(probe.path),
                "baseline_value": base_value,
                "value": cell["value"],
                "delta": cell["delta"],
                "delta_ci": cell["delta_ci"],
                "drop": drop,
                "warning": drop > threshold + _THRESHOLD_SLACK,
            }
        )
    return {
        "metric": "exact_match",
        "threshold": threshold,
        "baseline": labels[0],
        "baseline_path": str(probes[0].path),
        "columns": columns,
        "warning": any(c["warning"] for c in columns),
        "advice": FORGETTING_ADVICE,
    }


# ----------------------------------------------------------------------------------------------------- entry points


def _column_info(label: str, run: EvalRun) -> dict[str, Any]:
    lengths = [len(s["prediction"]) for s in run.predictions]
    return {
        "label": label,
        "path": str(run.path),
        "model": run.model,
        "adapter": run.adapter,
        "n": len(run.predictions),
        "prediction_chars": {
            "mean": statistics.fmean(lengths) if lengths else None,
            "median": statistics.median(lengths) if lengths else None,
        },
    }


def compare_evals(
    eval_dirs: Sequence[Path],
    out_dir: Path,
    *,
    seed: int = 0,
    n_resamples: int = 1000,
    probe_dirs: Sequence[Path] | None = None,
    forgetting_threshold: float = 0.05,
) -> dict[str, Any]:
    """Compare eval folders (the first is the baseline); write ``comparison.{json,md,html}`` into ``out_dir``.

    Run folders are accepted too (see :func:`resolve_eval_dirs`), for ``eval_dirs`` and ``probe_dirs`` alike.
    Returns the dict written to ``comparison.json``. Intervals are deterministic for a given ``seed``.
    """
    # Imported here so that reading and computing do not pull in matplotlib.
    from tunelab.report.html import render_comparison_html
    from tunelab.report.markdown import render_comparison_markdown

    runs = [load_eval_dir(p) for p in resolve_eval_dirs(eval_dirs)]
    if len(runs) < 2:
        raise RunError(f"compare needs at least two eval folders (the first is the baseline), got {len(runs)}")
    _check_aligned(runs)
    labels = _unique_labels(runs)
    comparison: dict[str, Any] = {
        "baseline": labels[0],
        "columns": [_column_info(label, run) for label, run in zip(labels, runs, strict=True)],
        "ci_method": f"percentile bootstrap of the per-sample mean, {n_resamples} resamples",
        "delta_ci_method": (
            f"paired percentile bootstrap of the per-sample difference to the baseline "
            f"(the same sample indices for both columns), {n_resamples} resamples"
        ),
        "confidence": CONFIDENCE,
        "seed": seed,
        "n_resamples": n_resamples,
        "flip_criterion": (
            f"per-sample {FLIP_SCORES[0]} ({FLIP_SCORES[1]} where {FLIP_SCORES[0]} is missing); "
            f"right means a score >= {FLIP_RIGHT_AT}"
        ),
        "metrics": _metric_table(
            labels, [_overall_table(r) for r in runs], [r.predictions for r in runs], seed=seed, n_resamples=n_resamples
        ),
        "groups": _group_tables(runs, labels, seed=seed, n_resamples=n_resamples),
        "flips": {label: _flips(runs[0], run) for label, run in zip(labels[1:], runs[1:], strict=True)},
        "forgetting": None,
    }
    if probe_dirs is not None:
        comparison["forgetting"] = _forgetting(
            resolve_eval_dirs(probe_dirs), threshold=forgetting_threshold, seed=seed, n_resamples=n_resamples
        )

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "comparison.json").write_text(
        json.dumps(comparison, ensure_ascii=False, indent=2, allow_nan=False) + "\n", encoding="utf-8"
    )
    (out_dir / "comparison.md").write_text(render_comparison_markdown(comparison), encoding="utf-8")
    lengths = {label: [len(s["prediction"]) for s in run.predictions] for label, run in zip(labels, runs, strict=True)}
    (out_dir / "comparison.html").write_text(render_comparison_html(comparison, lengths), encoding="utf-8")
    return comparison


def run_compare(
    paths: list[str],
    out: str,
    seed: int = 0,
    *,
    probes: list[str] | None = None,
    forgetting_threshold: float = 0.05,
) -> Path:
    """What ``tunelab compare`` runs: resolve the folders, compare them, return the path of ``comparison.md``."""
    out_dir = Path(out)
    compare_evals(
        resolve_eval_dirs(paths),
        out_dir,
        seed=seed,
        probe_dirs=resolve_eval_dirs(probes) if probes is not None else None,
        forgetting_threshold=forgetting_threshold,
    )
    return out_dir / "comparison.md"
