"""Diversity measures: distinct-n over a stream in bounded memory, and concentration of a categorical spread.

distinct-n (Li et al., 2016, "A Diversity-Promoting Objective Function for Neural Conversation Models") is the
number of distinct token n-grams divided by the number of n-grams. Counting distinct n-grams exactly needs a set as
large as the vocabulary of n-grams, so past :data:`KMV_SIZE` distinct values the count is estimated with a
k-minimum-values sketch (Bar-Yossef et al., 2002): keep the k smallest of the 64-bit hashes seen; the k-th smallest
``h_k`` gives ``(k - 1) / (h_k / 2**64)``. Its relative standard error is about ``1/sqrt(k - 2)``, 1.1 % here;
below k distinct values the count is exact.
"""

from __future__ import annotations

import math
import zlib
from collections import Counter
from collections.abc import Sequence

import numpy as np

from tunelab.data.quality.minhash import sorted_unique

__all__ = ["KMV_SIZE", "DistinctCounter", "normalized_entropy", "token_ngram_hashes"]

KMV_SIZE = 8192


class DistinctCounter:
    """Distinct count of uint64 hashes, exact below :data:`KMV_SIZE` values, a KMV estimate above."""

    def __init__(self, k: int = KMV_SIZE) -> None:
        self.k = k
        self.kept = np.zeros(0, dtype=np.uint64)
        self.total = 0
        self.saturated = False

    def add(self, hashes: np.ndarray) -> None:
        self.total += int(hashes.size)
        if self.saturated:
            hashes = hashes[hashes < self.kept[-1]]  # cannot enter the k smallest: skip the sort
        merged = sorted_unique(np.concatenate([self.kept, hashes.astype(np.uint64)]))
        if merged.size > self.k:
            self.saturated = True
            merged = merged[: self.k]
        self.kept = merged

    @property
    def distinct(self) -> float:
        if not self.saturated:
            return float(self.kept.size)
        return (self.k - 1) / ((float(self.kept[-1]) + 1.0) / 2.0**64)

    @property
    def ratio(self) -> float | None:
        """distinct / total, or ``None`` when nothing was counted."""
        return min(self.distinct / self.total, 1.0) if self.total else None


def _mix64(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser."""
    h = h ^ (h >> np.uint64(30))
    h = h * np.uint64(0xBF58476D1CE4E5B9)
    h = h ^ (h >> np.uint64(27))
    h = h * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def token_ngram_hashes(token_lists: Sequence[Sequence[str]], n: int) -> np.ndarray:
    """64-bit hashes of every token n-gram inside each list (none crosses from one list to the next)."""
    counts = np.fromiter((len(t) for t in token_lists), dtype=np.int64, count=len(token_lists))
    flat = [token for tokens in token_lists for token in tokens]
    # crc32 is deterministic across processes (Python's str hash is salted per process).
    hashes = _mix64(np.fromiter(map(zlib.crc32, map(str.encode, flat)), dtype=np.uint64, count=len(flat)))
    if n == 1 or hashes.size < n:
        return hashes if n == 1 else np.zeros(0, dtype=np.uint64)
    m = hashes.size - (n - 1)
    combined = hashes[:m].copy()
    for k in range(1, n):
        combined = _mix64(combined * np.uint64(0x9E3779B97F4A7C15) + hashes[k : k + m])
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    owner = np.repeat(np.arange(len(token_lists)), counts)[:m]
    return combined[(np.arange(m) - starts[owner]) <= counts[owner] - n]


def normalized_entropy(counts: Counter[str] | dict[str, int]) -> float | None:
    """Shannon entropy of the spread divided by its maximum, log(number of categories): 1 = even, 0 = one category."""
    values = [v for v in counts.values() if v > 0]
    total = sum(values)
    if len(values) < 2:
        return 0.0 if values else None
    entropy = -sum(v / total * math.log(v / total) for v in values)
    return entropy / math.log(len(values))
