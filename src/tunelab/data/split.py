"""Deterministic train/validation/test split and weighted mixing of several sources."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from tunelab.errors import ConfigError

T = TypeVar("T")


@dataclass
class Splits:
    train: list
    validation: list
    test: list


def split_size(size: float, total: int, field: str) -> int:
    """A fraction (< 1) of ``total`` or an absolute count (>= 1)."""
    if size <= 0:
        return 0
    count = round(size * total) if size < 1 else int(size)
    if size < 1 and count == 0 and total > 1:
        count = 1
    if count >= total:
        raise ConfigError(f"{field}: {size} leaves no training samples out of {total}")
    return count


def split_items(items: Sequence[T], val_size: float, test_size: float, seed: int) -> Splits:
    """Shuffle with ``seed`` and cut test first, then validation: the same inputs always give the same split."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_test = split_size(test_size, len(items), "data.test_size")
    n_val = split_size(val_size, len(items) - n_test, "data.val_size")
    test = [items[i] for i in order[:n_test]]
    val = [items[i] for i in order[n_test : n_test + n_val]]
    train = [items[i] for i in order[n_test + n_val :]]
    return Splits(train=train, validation=val, test=test)


def mix_sources(sources: Sequence[tuple[Sequence[T], float]], seed: int) -> tuple[list[T], list[int]]:
    """Sample each source to its weight's share of the combined size; returns the mix and per-source counts.

    Equal weights keep every item once. Otherwise a source is subsampled without replacement when its target is
    smaller than it, and repeated whole (plus a sample without replacement for the rest) when larger.
    """
    weights = [w for _, w in sources]
    if len(set(weights)) <= 1:
        mixed = [item for items, _ in sources for item in items]
        return mixed, [len(items) for items, _ in sources]
    total = sum(len(items) for items, _ in sources)
    rng = random.Random(seed)
    mixed: list[T] = []
    counts: list[int] = []
    for items, weight in sources:
        target = round(total * weight / sum(weights))
        whole, rest = divmod(target, len(items)) if items else (0, 0)
        chosen = list(items) * whole + rng.sample(list(items), rest)
        mixed.extend(chosen)
        counts.append(len(chosen))
    rng.shuffle(mixed)
    return mixed, counts
