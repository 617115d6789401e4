"""The comparison as one self-contained HTML file: inline CSS, charts as base64 PNG, nothing fetched.

Everything that comes from data (labels, paths, prompts, predictions, metric names) goes through ``html.escape``;
the page declares UTF-8 so Chinese text shows as written.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from typing import Any

from tunelab.report.markdown import (
    FLIPS_SHOWN,
    delta_verdict,
    forgetting_line,
    format_chars,
    format_delta,
    format_estimate,
    shorten,
)
from tunelab.report.plots import length_histogram_png, metric_bars_png, plot_legend_names

__all__ = ["render_comparison_html"]

# Local font names only (no web fonts): the CJK ones cover Chinese on Linux, macOS and Windows respectively.
_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", "Noto Sans CJK SC", "PingFang SC", "Microsoft YaHei",
       sans-serif; margin: 2rem auto; max-width: 1200px; padding: 0 1rem; color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 0.5rem 0 1.5rem; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.3rem 0.6rem; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.num { font-variant-numeric: tabular-nums; white-space: nowrap; }
td.text { white-space: pre-wrap; word-break: break-word; max-width: 22rem; }
.better { color: #176b2c; font-weight: 600; }
.worse { color: #a4161a; font-weight: 600; }
.warning { background: #fff3cd; border: 1px solid #e0a800; padding: 0.6rem 0.9rem; font-weight: 600; }
.note { color: #555; font-size: 0.9rem; }
figure { margin: 1rem 0; }
figure img { max-width: 100%; }
code { background: #f3f3f3; padding: 0 0.2rem; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """``header`` and ``rows`` hold ready HTML (escaped, possibly a ``<td>`` of their own): cells are wrapped here."""
    head = "".join(f"<th>{cell}</th>" for cell in header)
    body = "".join(
        "<tr>" + "".join(cell if cell.startswith("<td") else f"<td>{cell}</td>" for cell in row) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _image(png: bytes, alt: str, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    figcaption = f'<figcaption class="note">{caption}</figcaption>' if caption else ""
    return f'<figure><img src="data:image/png;base64,{data}" alt="{_e(alt)}">{figcaption}</figure>'


def _legend_caption(labels: Sequence[str]) -> str:
    names = plot_legend_names(labels)
    renamed = [f"{_e(name)} = {_e(label)}" for name, label in zip(names, labels, strict=True) if name != label]
    return ("In the chart: " + "; ".join(renamed) + ".") if renamed else ""


def _metric_table(metrics: dict[str, Any], labels: Sequence[str]) -> str:
    if not metrics:
        return '<p class="note">No numeric metrics.</p>'
    header = ["metric", *(_e(label) for label in labels), *(f"Δ {_e(label)}" for label in labels[1:])]
    rows = []
    for name, row in metrics.items():
        cells = row["columns"]
        higher = row["higher_is_better"]
        title = _e(name) + ("" if higher else ' <span class="note">(lower is better)</span>')
        values = [f'<td class="num">{_e(format_estimate(cells[label]))}</td>' for label in labels]
        deltas = []
        for label in labels[1:]:
            verdict = delta_verdict(cells[label], higher)
            css = f"num {verdict}" if verdict else "num"
            deltas.append(f'<td class="{css}">{_e(format_delta(cells[label], higher))}</td>')
        rows.append([title, *values, *deltas])
    return _table(header, rows)


def _columns_table(comparison: dict[str, Any]) -> str:
    rows = [
        [
            _e(c["label"]) + (" <em>(baseline)</em>" if i == 0 else ""),
            _e(c["model"] or "–"),
            _e(c["adapter"] or "–"),
            f"<code>{_e(c['path'])}</code>",
            f'<td class="num">{c["n"]}</td>',
            f'<td class="num">{_e(format_chars(c["prediction_chars"]["mean"]))}</td>',
        ]
        for i, c in enumerate(comparison["columns"])
    ]
    return _table(["column", "model", "adapter", "eval folder", "samples", "mean prediction chars"], rows)


def _text(value: str) -> str:
    return f'<td class="text">{_e(shorten(value))}</td>'


def _flips(label: str, flips: dict[str, Any], baseline: str) -> str:
    counts = flips["counts"]
    parts = [
        f"<h3>{_e(label)} vs {_e(baseline)}</h3>",
        f"<p>{counts['wrong_to_right']} wrong → right, {counts['right_to_wrong']} right → wrong, "
        f"{counts['unchanged']} unchanged (of {counts['compared']} samples with a right/wrong score).</p>",
    ]
    for direction, title in (("wrong_to_right", "Wrong → right"), ("right_to_wrong", "Right → wrong")):
        items = flips[direction]
        if not items:
            continue
        shown = f"first {FLIPS_SHOWN} of {len(items)}" if len(items) > FLIPS_SHOWN else f"{len(items)}"
        rows = [
            [
                f'<td class="num">{item["index"]}</td>',
                _text(item["prompt"]),
                _text(item["reference"]),
                _text(item["baseline_prediction"]),
                _text(item["prediction"]),
            ]
            for item in items[:FLIPS_SHOWN]
        ]
        parts.append(f"<h4>{title} ({shown})</h4>")
        parts.append(_table(["index", "prompt", "reference", _e(baseline), _e(label)], rows))
    return "\n".join(parts)


def _forgetting(forgetting: dict[str, Any]) -> str:
    parts = [
        "<h2>Forgetting</h2>",
        f"<p>General-ability probe, baseline <strong>{_e(forgetting['baseline'])}</strong> "
        f"(<code>{_e(forgetting['baseline_path'])}</code>).</p>",
    ]
    for column in forgetting["columns"]:
        css = "warning" if column["warning"] else "note"
        parts.append(f'<p class="{css}">{_e(forgetting_line(column, forgetting))}</p>')
    return "\n".join(parts)


def render_comparison_html(comparison: dict[str, Any], prediction_lengths: Mapping[str, Sequence[int]]) -> str:
    """The report page; ``prediction_lengths`` maps each column label to its predictions' lengths in characters."""
    labels = [c["label"] for c in comparison["columns"]]
    title = f"Comparison: {labels[0]} vs {', '.join(labels[1:])}"
    caption = _legend_caption(labels)
    body = [
        f"<h1>{_e(title)}</h1>",
        f'<p class="note">Baseline: <strong>{_e(labels[0])}</strong>. Intervals: {comparison["confidence"]:.0%} '
        f"{_e(comparison['ci_method'])} (seed {comparison['seed']}); deltas: {_e(comparison['delta_ci_method'])}. "
        "↑/↓ is the direction of the change; <code>*</code> marks a delta whose interval excludes 0 "
        "(green: better, red: worse).</p>",
        "<h2>Models</h2>",
        _columns_table(comparison),
        "<h2>Metrics</h2>",
        _metric_table(comparison["metrics"], labels),
    ]
    bars = metric_bars_png(comparison)
    if bars is not None:
        body.append(_image(bars, "metrics per model with confidence intervals", caption))
    for kind, group in comparison["groups"].items():
        sizes = ", ".join(f"{_e(label)} n={n}" for label, n in group["n"].items() if n is not None)
        body.append(f"<h3>Kind: {_e(kind)}" + (f' <span class="note">({sizes})</span>' if sizes else "") + "</h3>")
        body.append(_metric_table(group["metrics"], labels))
    body += [
        "<h2>Prediction lengths</h2>",
        _image(length_histogram_png(prediction_lengths), "histogram of prediction lengths per model", caption),
        "<h2>Flipped samples</h2>",
        f'<p class="note">Right/wrong by {_e(comparison["flip_criterion"])}.</p>',
        *(_flips(label, flips, labels[0]) for label, flips in comparison["flips"].items()),
    ]
    if comparison["forgetting"] is not None:
        body.append(_forgetting(comparison["forgetting"]))
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_e(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )
