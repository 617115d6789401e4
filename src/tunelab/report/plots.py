"""PNG charts for the comparison report, drawn with matplotlib's Agg renderer.

Figures are built as ``matplotlib.figure.Figure`` objects, never through ``pyplot``: no global figure registry, no
GUI backend chosen at import, safe to call from a process that has another backend active.

Only ASCII reaches a chart: the default fonts often lack CJK glyphs, which would draw as empty boxes. Non-ASCII model
labels are replaced by ``column N``; :func:`plot_legend_names` tells the report which name stands for which label.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["MAX_BAR_METRICS", "bar_metric_names", "length_histogram_png", "metric_bars_png", "plot_legend_names"]

MAX_BAR_METRICS = 8
"""More bars than this per model make the chart unreadable; the tables hold the rest."""


def plot_legend_names(labels: Sequence[str]) -> list[str]:
    """The name each column gets inside a chart: its label when ASCII, else ``column N`` (1-based)."""
    return [label if label.isascii() else f"column {i + 1}" for i, label in enumerate(labels)]


def bar_metric_names(comparison: dict[str, Any]) -> list[str]:
    """Metrics worth a bar: higher-is-better, ASCII-named, and every value in [0, 1] so they share one axis."""
    names = []
    for name, row in comparison["metrics"].items():
        values = [cell["value"] for cell in row["columns"].values()]
        if row["higher_is_better"] and name.isascii() and all(v is not None and 0 <= v <= 1 for v in values):
            names.append(name)
    return names[:MAX_BAR_METRICS]


def _png(figure: Figure) -> bytes:
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def metric_bars_png(comparison: dict[str, Any]) -> bytes | None:
    """Grouped bars, one group per metric and one bar per model, with the per-sample-mean CI as error bars.

    None when no metric qualifies (see :func:`bar_metric_names`).
    """
    names = bar_metric_names(comparison)
    if not names:
        return None
    labels = [c["label"] for c in comparison["columns"]]
    width = 0.8 / len(labels)
    positions = np.arange(len(names))
    figure = Figure(figsize=(max(6.0, 1.2 * len(names) * max(1, len(labels) / 2)), 4.0))
    axes = figure.add_subplot()
    for i, (label, legend) in enumerate(zip(labels, plot_legend_names(labels), strict=True)):
        cells = [comparison["metrics"][name]["columns"][label] for name in names]
        values = np.array([cell["value"] for cell in cells])
        # The reported value need not be the per-sample mean (it is the eval's aggregate), so clip the bar's error
        # to zero on a side where it would be negative instead of letting matplotlib reject it.
        lows = np.array([cell["ci"][0] if cell["ci"] else v for cell, v in zip(cells, values, strict=True)])
        highs = np.array([cell["ci"][1] if cell["ci"] else v for cell, v in zip(cells, values, strict=True)])
        errors = np.clip(np.vstack([values - lows, highs - values]), 0, None)
        axes.bar(positions + (i - (len(labels) - 1) / 2) * width, values, width, yerr=errors, capsize=3, label=legend)
    axes.set_xticks(positions, names, rotation=20 if len(names) > 4 else 0)
    axes.set_ylim(0, 1.05)
    axes.set_ylabel("score")
    axes.set_title(f"Metrics with {comparison['confidence']:.0%} bootstrap CI")
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside: bars reach 1.0
    axes.grid(axis="y", alpha=0.3)
    return _png(figure)


def length_histogram_png(lengths: Mapping[str, Sequence[int]]) -> bytes:
    """Histogram of prediction lengths in characters, one outline per model over shared bins."""
    labels = list(lengths)
    everything = np.concatenate([np.zeros(0), *(np.asarray(v, dtype=np.float64) for v in lengths.values())])
    bins = np.histogram_bin_edges(everything, bins=min(30, max(1, everything.size))).tolist()
    figure = Figure(figsize=(6.0, 3.5))
    axes = figure.add_subplot()
    for label, legend in zip(labels, plot_legend_names(labels), strict=True):
        axes.hist(lengths[label], bins=bins, histtype="step", linewidth=1.5, label=legend)
    axes.set_xlabel("prediction length (characters)")
    axes.set_ylabel("samples")
    axes.set_title("Prediction lengths")
    axes.legend(fontsize="small")
    return _png(figure)
