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
    if total == 0:
        raise ConfigError(f"{field}: there are no readable records to split")
    if count >= total:
        raise ConfigError(f"{field}: {size} leaves no training samples out of {total}")
    return count


def split_order(n: int, val_size: float, test_size: float, seed: int) -> tuple[list[int], int, int]:
    """``(order, n_test, n_val)``: positions ``0..n-1`` shuffled with ``seed``; test takes the first ``n_test``,
    validation the next ``n_val``, training the rest.

    It depends on ``n`` alone, so a streaming reader that has only counted the items splits them as
    :func:`split_items` does.
    """
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_test = split_size(test_size, n, "data.test_size")
    n_val = split_size(val_size, n - n_test, "data.val_size")
    return order, n_test, n_val


def split_items(items: Sequence[T], val_size: float, test_size: float, seed: int) -> Splits:
    """Shuffle with ``seed`` and cut test first, then validation: the same inputs always give the same split."""
    order, n_test, n_val = split_order(len(items), val_size, test_size, seed)
    test = [items[i] for i in order[:n_test]]
    val = [items[i] for i in order[n_test : n_test + n_val]]
    train = [items[i] for i in order[n_test + n_val :]]
    return Splits(train=train, validation=val, test=test)


@dataclass(frozen=True)
class SourceSample:
    """How the mix samples one source: every item ``repeats`` times, plus one more copy of the ``extra`` positions.

    ``extra`` is drawn without replacement, so no item appears more than ``repeats + 1`` times.
    """

    size: int
    repeats: int
    extra: list[int]

    @property
    def count(self) -> int:
        return self.size * self.repeats + len(self.extra)

    @property
    def with_replacement(self) -> bool:
        """Whether items repeat: the target exceeds the source, so it is upsampled."""
        return self.repeats > 1 or (self.repeats == 1 and bool(self.extra))

    def describe(self) -> str:
        """The sampling in words, as the training log, ``data_mix.json`` and ``data report`` state it."""
        if self.repeats == 1 and not self.extra:
            return "no sampling: every record once"
        if self.repeats == 0:
            return f"without replacement: {len(self.extra):,} of {self.size:,} records"
        more = f", plus {len(self.extra):,} of {self.size:,} drawn without replacement" if self.extra else ""
        return f"with replacement (records repeat): every record {self.repeats}x{more}"


def sample_sources(sizes: Sequence[int], weights: Sequence[float], seed: int) -> tuple[list[SourceSample],
                                                                                       random.Random | None]:
    """Each source's sample for a mix at its weight's share of the combined size, and the generator to shuffle with.

    Weights all 1 (the default) keep every item once and need no shuffle (``None``): the sources are concatenated.
    Any other weights, equal ones too (2 and 2 mean half each), are shares: a source is subsampled without
    replacement when its target is smaller than it, and repeated whole (plus a sample without replacement for the
    rest) when larger. Positions only: a streaming reader that has counted the items samples as training does.
    """
    if all(weight == 1 for weight in weights):
        return [SourceSample(n, 1, []) for n in sizes], None
    total = sum(sizes)
    rng = random.Random(seed)
    samples = []
    for n, weight in zip(sizes, weights, strict=True):
        target = round(total * weight / sum(weights))
        whole, rest = divmod(target, n) if n else (0, 0)
        # random.sample picks positions from the population's length alone: a range draws what a list would.
        samples.append(SourceSample(n, whole, rng.sample(range(n), rest)))
    return samples, rng


def mix_sources(sources: Sequence[tuple[Sequence[T], float]], seed: int) -> tuple[list[T], list[int]]:
    """Sample each source to its weight's share of the combined size (:func:`sample_sources`), then shuffle.

    Returns the mix and the per-source counts.
    """
    samples, rng = sample_sources([len(items) for items, _ in sources], [w for _, w in sources], seed)
    return apply_samples([items for items, _ in sources], samples, rng), [sample.count for sample in samples]


def apply_samples(sources: Sequence[Sequence[T]], samples: Sequence[SourceSample],
                  rng: random.Random | None) -> list[T]:
    """The mixed items of :func:`sample_sources`' samples, shuffled with its generator (when it gave one)."""
    mixed: list[T] = []
    for items, sample in zip(sources, samples, strict=True):
        mixed.extend(list(items) * sample.repeats + [items[i] for i in sample.extra])
    if rng is not None:
        rng.shuffle(mixed)
    return mixed
