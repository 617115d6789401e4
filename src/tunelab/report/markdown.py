"""The comparison as a Markdown report, plus the cell formatting the HTML report shares.

Input is the dict :func:`tunelab.evaluate.compare.compare_evals` returns (the ``comparison.json`` layout).
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

__all__ = [
    "FLIPS_SHOWN",
    "TEXT_LIMIT",
    "delta_verdict",
    "escape_cell",
    "forgetting_line",
    "format_chars",
    "format_delta",
    "format_estimate",
    "format_number",
    "format_signed",
    "render_comparison_markdown",
    "shorten",
]

FLIPS_SHOWN = 20
"""Flipped samples listed per direction and column; ``comparison.json`` holds them all."""

TEXT_LIMIT = 200
"""Characters of a prompt, reference or prediction shown in a table cell."""


def format_number(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.1f}" if abs(value) >= 100 else f"{value:.3f}"


def format_chars(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def format_signed(value: float) -> str:
    """``+0.250``; rounding first so float noise such as ``-1e-17`` reads ``+0.000``, not ``-0.000``."""
    return f"{round(value, 3) + 0.0:+.3f}"


def format_estimate(cell: dict[str, Any]) -> str:
    """``0.750 [0.500, 1.000]``: the value and the CI of the per-sample mean, when there are per-sample scores."""
    text = format_number(cell["value"])
    if cell["ci"] is not None and cell["value"] is not None:
        text += f" [{format_number(cell['ci'][0])}, {format_number(cell['ci'][1])}]"
    return text


def delta_verdict(cell: dict[str, Any], higher_is_better: bool) -> str | None:
    """``better``/``worse`` when the paired CI of the delta excludes zero, else None."""
    if not cell.get("significant") or cell.get("delta") is None:
        return None
    return "better" if (cell["delta"] > 0) == higher_is_better else "worse"


def format_delta(cell: dict[str, Any], higher_is_better: bool) -> str:
    """``+0.250 ↑ [+0.000, +0.500] *``: arrow for the direction, ``*`` when the paired CI excludes zero."""
    delta = cell.get("delta")
    if delta is None:
        return "–"
    shown = round(delta, 3)
    arrow = "↑" if shown > 0 else "↓" if shown < 0 else "="
    text = f"{format_signed(delta)} {arrow}"
    if cell.get("delta_ci") is not None:
        low, high = cell["delta_ci"]
        text += f" [{format_signed(low)}, {format_signed(high)}]"
    verdict = delta_verdict(cell, higher_is_better)
    if verdict is not None:
        text += f" * {verdict}"
    return text


def shorten(text: str, limit: int = TEXT_LIMIT) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def escape_cell(text: str, limit: int = TEXT_LIMIT) -> str:
    """Model text made safe for one Markdown table cell.

    ``<`` and ``&`` are escaped too: a renderer would otherwise swallow tags such as a reasoning model's ``<think>``.
    """
    text = html.escape(shorten(text, limit), quote=False).replace("|", "\\|")
    return text.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "<br>")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _metric_lines(metrics: dict[str, Any], labels: Sequence[str]) -> list[str]:
    if not metrics:
        return ["No numeric metrics."]
    header = ["metric", *(escape_cell(label) for label in labels)]
    header += [f"Δ {escape_cell(label)}" for label in labels[1:]]
    rows = []
    for name, row in metrics.items():
        cells = row["columns"]
        title = escape_cell(name) + ("" if row["higher_is_better"] else " (lower is better)")
        rows.append(
            [title, *(format_estimate(cells[label]) for label in labels)]
            + [format_delta(cells[label], row["higher_is_better"]) for label in labels[1:]]
        )
    return _table(header, rows)


def _columns_lines(comparison: dict[str, Any]) -> list[str]:
    rows = [
        [
            escape_cell(c["label"]) + (" (baseline)" if i == 0 else ""),
            escape_cell(c["model"] or "–"),
            escape_cell(str(c["adapter"] or "–")),
            f"`{escape_cell(c['path'])}`",
            str(c["n"]),
            format_chars(c["prediction_chars"]["mean"]),
        ]
        for i, c in enumerate(comparison["columns"])
    ]
    return _table(["column", "model", "adapter", "eval folder", "samples", "mean prediction chars"], rows)


def _flip_lines(label: str, flips: dict[str, Any], baseline: str) -> list[str]:
    counts = flips["counts"]
    lines = [
        f"### {escape_cell(label)} vs {escape_cell(baseline)}",
        "",
        f"{counts['wrong_to_right']} wrong → right, {counts['right_to_wrong']} right → wrong, "
        f"{counts['unchanged']} unchanged (of {counts['compared']} samples with a right/wrong score).",
    ]
    for direction, title in (("wrong_to_right", "Wrong → right"), ("right_to_wrong", "Right → wrong")):
        items = flips[direction]
        if not items:
            continue
        shown = f"first {FLIPS_SHOWN} of {len(items)}" if len(items) > FLIPS_SHOWN else f"{len(items)}"
        rows = [
            [
                str(item["index"]),
                escape_cell(item["prompt"]),
                escape_cell(item["reference"]),
                escape_cell(item["baseline_prediction"]),
                escape_cell(item["prediction"]),
            ]
            for item in items[:FLIPS_SHOWN]
        ]
        lines += ["", f"**{title}** ({shown})", ""]
        lines += _table(["index", "prompt", "reference", escape_cell(baseline), escape_cell(label)], rows)
    return lines


def forgetting_line(column: dict[str, Any], forgetting: dict[str, Any]) -> str:
    """One sentence per probed column; starts with ``WARNING`` when the drop is past the threshold."""
    change = (
        f"probe {forgetting['metric']} {format_number(column['baseline_value'])} → {format_number(column['value'])} "
        f"(Δ {format_signed(column['delta'])}"
    )
    if column["delta_ci"] is not None:
        change += f" [{format_signed(column['delta_ci'][0])}, {format_signed(column['delta_ci'][1])}]"
    change += ")"
    if column["warning"]:
        return (
            f"WARNING: {column['label']} forgot general ability: {change}, a drop of {column['drop']:.3f} past the "
            f"threshold {forgetting['threshold']:.3f}. {forgetting['advice']}"
        )
    return f"{column['label']}: {change}, within the threshold {forgetting['threshold']:.3f}."


def _forgetting_lines(forgetting: dict[str, Any]) -> list[str]:
    lines = [
        "## Forgetting",
        "",
        f"General-ability probe, baseline `{escape_cell(forgetting['baseline'])}` "
        f"(`{escape_cell(forgetting['baseline_path'])}`).",
        "",
    ]
    for column in forgetting["columns"]:
        text = escape_cell(forgetting_line(column, forgetting), limit=10_000)
        lines.append(f"- **{text}**" if column["warning"] else f"- {text}")
    return lines


def render_comparison_markdown(comparison: dict[str, Any]) -> str:
    labels = [c["label"] for c in comparison["columns"]]
    others = ", ".join(escape_cell(label) for label in labels[1:])
    lines = [
        f"# Comparison: {escape_cell(labels[0])} vs {others}",
        "",
        f"Baseline: **{escape_cell(labels[0])}**. Intervals: {comparison['confidence']:.0%} "
        f"{comparison['ci_method']} (seed {comparison['seed']}); deltas: {comparison['delta_ci_method']}. "
        "↑/↓ is the direction of the change; `*` marks a delta whose interval excludes 0.",
        "",
        "## Models",
        "",
        *_columns_lines(comparison),
        "",
        "## Metrics",
        "",
        *_metric_lines(comparison["metrics"], labels),
    ]
    for kind, group in comparison["groups"].items():
        sizes = ", ".join(f"{escape_cell(label)} n={n}" for label, n in group["n"].items() if n is not None)
        lines += ["", f"### Kind: {escape_cell(kind)}" + (f" ({sizes})" if sizes else ""), ""]
        lines += _metric_lines(group["metrics"], labels)
    lines += ["", "## Flipped samples", "", f"Right/wrong by {comparison['flip_criterion']}.", ""]
    for label, flips in comparison["flips"].items():
        lines += [*_flip_lines(label, flips, labels[0]), ""]
    if comparison["forgetting"] is not None:
        lines += _forgetting_lines(comparison["forgetting"])
    return "\n".join(lines).rstrip() + "\n"
