"""The loss-curve PNG of a run, drawn from its metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path


def plot_loss_curve(metrics_path: Path, out_path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not metrics_path.is_file():
        return None
    entries = [json.loads(line) for line in metrics_path.read_text("utf-8").splitlines() if line.strip()]
    train = [(e["step"], e["loss"]) for e in entries if "loss" in e]
    val = [(e["step"], e["eval_loss"]) for e in entries if "eval_loss" in e]
    if not train and not val:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if val:
        ax.plot(*zip(*val, strict=True), marker="o", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    return out_path
