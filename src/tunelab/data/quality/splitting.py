"""``tunelab data split``: train/validation/test files that keep near-duplicates together and labels in proportion.

Records are grouped by near-duplicate cluster (exact duplicates included), and whole groups are dealt to the
splits, so no test record has a copy in training. When the answers form a label set (:func:`infer_label_set`),
each label is dealt on its own so every split holds the labels in the corpus's proportions (records without a label
answer form one more stratum). Sizes follow the training config's rule: a fraction below 1 or a count. A group is
never cut, so a split can exceed its size by less than one group. The input is data files or a training config (its
datasets in their declared formats, split together; weights do not apply).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tunelab.data.build import write_records
from tunelab.data.quality import findings
from tunelab.data.quality.analyze import analyze_stream
from tunelab.data.quality.stream import Source, files_stream
from tunelab.data.record import Record
from tunelab.data.split import split_size

__all__ = ["SPLIT_FILES", "SplitResult", "assign_groups", "split_files"]

SPLIT_FILES = {"train": "train.jsonl", "validation": "validation.jsonl", "test": "test.jsonl"}


@dataclass
class SplitResult:
    counts: dict[str, int]
    stratified: bool
    groups_kept_together: int
    """Near-duplicate groups of two or more records, each placed whole in one split."""
    label_counts: dict[str, Counter[str]] = field(default_factory=dict)
    rejected: int = 0

    def describe(self) -> str:
        sizes = ", ".join(f"{name} {count}" for name, count in self.counts.items())
        how = "stratified by label" if self.stratified else "not stratified (answers are not a label set)"
        return (f"{sizes}; {how}; {self.groups_kept_together} near-duplicate groups kept on one side"
                + (f"; {self.rejected} unreadable rows skipped" if self.rejected else ""))


def _quotas(strata_sizes: dict[int, int], total: int, wanted: int) -> dict[int, int]:
    """``wanted`` records shared among strata in proportion to their sizes (largest remainder, exact sum)."""
    if total == 0:
        return dict.fromkeys(strata_sizes, 0)
    exact = {s: wanted * n / total for s, n in strata_sizes.items()}
    quotas = {s: int(v) for s, v in exact.items()}
    for s in sorted(exact, key=lambda s: (-(exact[s] - quotas[s]), s))[: wanted - sum(quotas.values())]:
        quotas[s] += 1
    return quotas


def assign_groups(group: np.ndarray, stratum: np.ndarray, n_test: int, n_val: int, seed: int) -> np.ndarray:
    """Per record 0 (train), 1 (validation) or 2 (test): whole groups, shuffled by ``seed``, per stratum quotas.

    ``group`` holds each record's group id, ``stratum`` each record's stratum (a group takes its first record's).
    """
    roots, first, sizes = np.unique(group, return_index=True, return_counts=True)
    group_stratum = stratum[first]
    strata = Counter({int(s): int(n) for s, n in zip(*np.unique(stratum, return_counts=True), strict=True)})
    test_quota = _quotas(strata, group.size, n_test)
    val_quota = _quotas({s: n - test_quota[s] for s, n in strata.items()}, group.size - n_test, n_val)
    order = list(range(roots.size))
    random.Random(seed).shuffle(order)
    taken_test: Counter[int] = Counter()
    taken_val: Counter[int] = Counter()
    side = np.zeros(roots.size, dtype=np.uint8)
    for g in order:
        s = int(group_stratum[g])
        if taken_test[s] < test_quota[s]:
            side[g], taken_test[s] = 2, taken_test[s] + int(sizes[g])
        elif taken_val[s] < val_quota[s]:
            side[g], taken_val[s] = 1, taken_val[s] + int(sizes[g])
    return side[np.searchsorted(roots, group)]


def split_files(sources: Sequence[str | Source], out_dir: Path, val_size: float, test_size: float, seed: int,
                near_dup_threshold: float = 0.8) -> SplitResult:
    """Split the records of ``sources`` (files, or a config's datasets in their formats) together."""
    stream = files_stream(sources, split_by_name=False)
    corpus = analyze_stream(stream)
    try:
        clusters = findings.cluster_near_duplicates(corpus, near_dup_threshold)
        is_label = corpus.columns["is_label"]
        stratified = bool(is_label.any())
        stratum = np.where(is_label, corpus.columns["answer_hash"], np.uint64(0)) if stratified else \
            np.zeros(corpus.size, dtype=np.uint64)
        n_test = split_size(test_size, corpus.size, "--test-size")
        n_val = split_size(val_size, corpus.size - n_test, "--val-size")
        sides = assign_groups(clusters.root, stratum, n_test, n_val, seed)
        together = len(clusters.members())
    finally:
        corpus.signatures.close()
    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(SPLIT_FILES)
    label_counts: dict[str, Counter[str]] = {name: Counter() for name in names}

    def records_of(side: int) -> Iterator[Record]:
        for index, (record, _) in enumerate(stream):
            if sides[index] == side:
                if stratified and is_label[index]:
                    label_counts[names[side]][(record.answer or "").strip()] += 1
                yield record

    for side, name in enumerate(names):
        write_records(out_dir / SPLIT_FILES[name], records_of(side))  # type: ignore[arg-type]  # streamed once
    counts = {name: int((sides == side).sum()) for side, name in enumerate(names)}
    return SplitResult(counts=counts, stratified=stratified, groups_kept_together=together,
                       label_counts=label_counts if stratified else {}, rejected=sum(f.rejected for f in stream.files))
