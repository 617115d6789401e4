"""Human-readable views of tokenized samples: what the model reads, and which part it learns."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text

from tunelab.data.tokenize import IGNORE_INDEX, Example


def supervised_spans(example: Example) -> list[tuple[list[int], bool]]:
    """Runs of consecutive token ids that share a supervised flag."""
    runs: list[tuple[list[int], bool]] = []
    for token, label in zip(example.input_ids, example.labels, strict=True):
        flag = label != IGNORE_INDEX
        if runs and runs[-1][1] == flag:
            runs[-1][0].append(token)
        else:
            runs.append(([token], flag))
    return runs


def render_example(example: Example, tokenizer: Any) -> Text:
    """Context in dim text, supervised answer spans in green between ⟦ and ⟧ (visible without colour too)."""
    text = Text()
    for ids, supervised in supervised_spans(example):
        piece = tokenizer.decode(ids, skip_special_tokens=False)
        if supervised:
            text.append("⟦", style="bold green")
            text.append(piece, style="green")
            text.append("⟧", style="bold green")
        else:
            text.append(piece, style="dim")
    return text


def print_preview(console: Console, examples: Sequence[Example], tokenizer: Any, cutoff_len: int) -> None:
    for example in examples:
        console.rule(f"{example.source}")
        console.print(render_example(example, tokenizer))
        cut = "" if example.truncation == "none" else f"; truncated ({example.truncation}) to fit cutoff_len"
        console.print(f"[cyan]{len(example.input_ids)} tokens ({example.supervised_tokens} supervised, "
                      f"cutoff_len {cutoff_len}){cut}[/]")


def write_tokenized(path: Path, examples: Iterable[Example]) -> int:
    count = 0
    with path.open("w", encoding="utf-8") as handle:
        for example in examples:
            handle.write(json.dumps({"input_ids": example.input_ids, "labels": example.labels,
                                     "source": example.source}) + "\n")
            count += 1
    return count
