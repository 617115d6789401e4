"""Records streamed from files or a training config, each with the split it belongs to.

Every layout is streamed by :func:`tunelab.data.readers.read_rows` (JSON Lines by line, JSON arrays by element, CSV
by row, Parquet in batches), so a corpus of any size passes through in memory that does not grow with it. Rows are
parsed by the same :func:`~tunelab.data.readers.parse_record` as training, and a malformed row becomes a
:class:`~tunelab.data.readers.Reject` with the reason training would give.

A config's splits and mix are planned from record counts alone (:func:`tunelab.data.split.split_order` and
:func:`~tunelab.data.split.sample_sources` need nothing else), so they are exactly training's without holding its
records: one counting pass, then a few bytes per record.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.config.schema import DataConfig
from tunelab.data.readers import Reject, detect_format, parse_record, read_rows
from tunelab.data.record import Record
from tunelab.errors import ConfigError, DataError

__all__ = ["SPLITS", "FileSummary", "RecordStream", "Source", "config_stream", "file_split", "files_stream",
           "iter_file", "read_inputs"]

SPLITS = ("train", "validation", "test", "unused")
"""``unused``: in a config's data but left out of the training mix by its weight (and not held out)."""

_SPLIT_NAMES = (("test", re.compile(r"(^|[^a-z])(test|eval)([^a-z]|$)")),
                ("validation", re.compile(r"(^|[^a-z])(val|valid|validation|dev)([^a-z]|$)")))


def file_split(path: str) -> str:
    """The split a file holds, judged by its name: ``*test*``/``*eval*`` test, ``*val*``/``*dev*`` validation."""
    stem = Path(path).stem.lower()
    for split, pattern in _SPLIT_NAMES:
        if pattern.search(stem):
            return split
    return "train"


@dataclass(frozen=True)
class Source:
    """A data file and its layout (``auto`` detects it), as a config's dataset names them."""

    path: str
    format: str = "auto"


def read_inputs(inputs: Sequence[str]) -> tuple[list[Source], Any]:
    """``(sources, config)`` from a config (``*.yaml``/``*.yml``, optional ``key=value`` overrides after it) or files.

    A config gives its datasets with their declared formats; files are detected. ``config`` is ``None`` for files.
    """
    if inputs and Path(inputs[0]).suffix.lower() in (".yaml", ".yml"):
        from tunelab.config.load import load_config

        config = load_config(inputs[0], list(inputs[1:]))
        if not config.data.datasets:
            raise ConfigError("data.datasets: no training data given; add at least one {path: FILE}")
        return [Source(spec.path, spec.format) for spec in config.data.datasets], config
    return [Source(path) for path in inputs], None


@dataclass
class FileSummary:
    path: str
    split: str
    format: str = "auto"
    records: int = 0
    rejected: int = 0
    reject_examples: list[dict[str, str]] = field(default_factory=list)
    preference: int = 0
    """Preference records (SFT trains on their chosen answer)."""

    def count(self, item: Record | Reject, fmt: str) -> None:
        if isinstance(item, Reject):
            self.rejected += 1
            if len(self.reject_examples) < REJECT_EXAMPLES:
                self.reject_examples.append({"source": item.source, "reason": item.reason})
        else:
            self.records += 1
            self.preference += item.kind == "preference"
            self.format = fmt


REJECT_EXAMPLES = 20
"""Bad records listed per file (all are counted)."""


def iter_file(path: str, fmt: str = "auto") -> Iterator[tuple[Record | Reject, str]]:
    """``(record or reject, detected format)`` per row, as ``load_records(..., "skip")`` would read them."""
    detected = fmt if fmt != "auto" else None
    for source, row in read_rows(path):
        try:
            if isinstance(row, DataError):
                raise row
            row_format = detected or detect_format(row, source)
            record = parse_record(row, row_format, source)
        except DataError as error:
            reason = f"{error.field}: {error.problem}" if error.field else error.problem
            yield Reject(source, reason, row if isinstance(row, dict) else None), detected or "auto"
            continue
        detected = detected or row_format
        yield record, detected


Item = tuple[Record, str]
"""A record and its split."""


@dataclass
class RecordStream:
    """A re-iterable stream of ``(record, split)``: the report and the cleaner read their input more than once.

    ``files`` is complete after the first pass; ``mix`` holds the training mix when the input is a config.
    """

    open: Callable[[], Iterator[Item]]
    files: list[FileSummary]
    mix: list[dict[str, Any]] = field(default_factory=list)

    def __iter__(self) -> Iterator[Item]:
        return self.open()


def _as_source(source: str | Source) -> Source:
    return source if isinstance(source, Source) else Source(source)


def files_stream(sources: Sequence[str | Source], split_by_name: bool = True) -> RecordStream:
    """Records of ``sources`` in order; each file's split comes from its name (:func:`file_split`) when asked."""
    resolved = [_as_source(s) for s in sources]
    for source in resolved:
        if not Path(source.path).is_file():
            raise DataError(source.path, None, "file not found" if not Path(source.path).exists() else
                            "expected a file")
    summaries = [FileSummary(s.path, file_split(s.path) if split_by_name else "train", s.format) for s in resolved]
    passes = 0

    def open_stream() -> Iterator[Item]:
        nonlocal passes
        passes += 1
        count = passes == 1
        for source, summary in zip(resolved, summaries, strict=True):
            for item, fmt in iter_file(source.path, source.format):
                if count:
                    summary.count(item, fmt)
                if isinstance(item, Record):
                    yield item, summary.split

    return RecordStream(open=open_stream, files=summaries)


_TRAIN, _VALIDATION, _TEST, _UNUSED = (np.uint8(SPLITS.index(name)) for name in SPLITS)


def config_stream(config: DataConfig) -> RecordStream:
    """The records of a training config, split and mixed exactly as :func:`tunelab.data.build.load_splits` does.

    A counting pass reads each dataset once (bad rows are skipped and listed, as with ``on_bad_record: skip``);
    the splits and the mix are then planned from the counts, a byte per record. Records left out of the training
    mix by a weight below their share are ``unused``, and a record the mix repeats appears once.
    """
    from tunelab.data.build import mix_entry
    from tunelab.data.split import sample_sources, split_order

    if not config.datasets:
        raise ConfigError("data.datasets: no training data given; add at least one {path: FILE}")
    summaries, sides, train_positions = [], [], []
    for spec in config.datasets:
        summary, rows = FileSummary(spec.path, "train", spec.format), 0
        for item, fmt in iter_file(spec.path, spec.format):
            rows += 1
            summary.count(item, fmt)
        if rows == 0:
            raise DataError(spec.path, None, "the file holds no records")
        shuffled, n_test, n_val = split_order(summary.records, config.val_size, config.test_size, config.seed)
        order = np.array(shuffled, dtype=np.int64)
        del shuffled
        side = np.full(summary.records, _TRAIN, dtype=np.uint8)
        side[order[:n_test]] = _TEST
        side[order[n_test : n_test + n_val]] = _VALIDATION
        summaries.append(summary)
        sides.append(side)
        train_positions.append(order[n_test + n_val :])
    samples, _ = sample_sources([p.size for p in train_positions], [s.weight for s in config.datasets], config.seed)
    total = sum(sample.count for sample in samples)
    mix = []
    for spec, summary, side, train, sample in zip(config.datasets, summaries, sides, train_positions, samples,
                                                   strict=True):
        if sample.repeats == 0:  # subsampled: only the drawn positions of the training part are used
            side[train] = _UNUSED
            side[train[np.array(sample.extra, dtype=np.int64)]] = _TRAIN
        mix.append({"path": spec.path, "format": summary.format, "records": summary.records,
                    "rejected": summary.rejected, "weight": spec.weight, "train_available": int(train.size),
                    "preference_as_chosen": summary.preference, **mix_entry(sample, total)})
    del train_positions, samples

    def open_stream() -> Iterator[Item]:
        for spec, side in zip(config.datasets, sides, strict=True):
            index = 0
            for item, _ in iter_file(spec.path, spec.format):
                if isinstance(item, Record):
                    yield item, SPLITS[side[index]]
                    index += 1

    return RecordStream(open=open_stream, files=summaries, mix=mix)
