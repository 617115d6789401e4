"""Records streamed from files or a training config, each with the split it belongs to.

JSON Lines files are read line by line, so a corpus of any size passes through in constant memory; other layouts
go through :func:`tunelab.data.readers.read_rows` (JSON arrays and CSV are read whole; Parquet in batches). Rows
are parsed by the same :func:`~tunelab.data.readers.parse_record` as training, and a malformed row becomes a
:class:`~tunelab.data.readers.Reject` with the reason training would give.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.config.schema import DataConfig
from tunelab.data.readers import Reject, detect_format, parse_record, read_rows
from tunelab.data.readers.files import RowOrError, parse_json_line
from tunelab.data.record import Record
from tunelab.errors import DataError

__all__ = ["SPLITS", "FileSummary", "RecordStream", "config_stream", "file_split", "files_stream", "iter_file"]

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


@dataclass
class FileSummary:
    path: str
    split: str
    format: str = "auto"
    records: int = 0
    rejected: int = 0
    reject_examples: list[dict[str, str]] = field(default_factory=list)


REJECT_EXAMPLES = 20
"""Bad records listed per file (all are counted)."""


def iter_file(path: str, fmt: str = "auto") -> Iterator[tuple[Record | Reject, str]]:
    """``(record or reject, detected format)`` per row, as ``load_records(..., "skip")`` would read them."""
    detected = fmt if fmt != "auto" else None
    for source, row in _rows(path):
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


def _rows(path: str) -> Iterator[RowOrError]:
    if Path(path).suffix.lower() in (".jsonl", ".ndjson") and Path(path).is_file():
        return _stream_jsonl(path)
    return read_rows(path)


def _stream_jsonl(name: str) -> Iterator[RowOrError]:
    """Line by line, numbered and decoded as :func:`tunelab.data.readers.read_rows` does (UTF-8, BOM, else GBK).

    The GBK fallback is decided per line here, per file there; a file that is valid in one encoding reads the same.
    """
    with open(name, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            raw = raw.removesuffix(b"\n")  # as split("\n") leaves it: an error's column counts from the line
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                try:
                    line = raw.decode("gbk")
                except UnicodeDecodeError:
                    yield f"{name}:{number}", DataError(f"{name}:{number}", "-", "not valid UTF-8 (or GBK) text")
                    continue
            if not line.strip():
                continue
            source = f"{name}:{number}"
            yield source, parse_json_line(source, line)


Item = tuple[Record, str]
"""A record and its split."""


@dataclass
class RecordStream:
    """A re-iterable stream of ``(record, split)``: the report and the cleaner read their input twice.

    ``files`` is filled during the first pass; ``mix`` holds the training mix when the input is a config.
    """

    open: Callable[[], Iterator[Item]]
    files: list[FileSummary]
    mix: list[dict[str, Any]] = field(default_factory=list)

    def __iter__(self) -> Iterator[Item]:
        return self.open()


def files_stream(paths: Sequence[str], split_by_name: bool = True) -> RecordStream:
    """Records of ``paths`` in order; each file's split comes from its name (:func:`file_split`) when asked."""
    for path in paths:
        if not Path(path).is_file():
            raise DataError(path, None, "file not found" if not Path(path).exists() else "expected a file")
    summaries = [FileSummary(path, file_split(path) if split_by_name else "train") for path in paths]
    passes = 0

    def open_stream() -> Iterator[Item]:
        nonlocal passes
        passes += 1
        count = passes == 1
        for summary in summaries:
            for item, fmt in iter_file(summary.path):
                if isinstance(item, Reject):
                    if count:
                        _count_reject(summary, item)
                    continue
                if count:
                    summary.records += 1
                    summary.format = fmt
                yield item, summary.split

    return RecordStream(open=open_stream, files=summaries)


def _count_reject(summary: FileSummary, reject: Reject) -> None:
    summary.rejected += 1
    if len(summary.reject_examples) < REJECT_EXAMPLES:
        summary.reject_examples.append({"source": reject.source, "reason": reject.reason})


def config_stream(config: DataConfig) -> RecordStream:
    """The records of a training config, split exactly as training splits them (:func:`load_splits`).

    The splits are computed once (training holds its data in memory too); records left out of the training mix by
    a weight below their share are ``unused``, and a record the mix repeats appears once.
    """
    from tunelab.data.build import load_splits

    splits = load_splits(config.model_copy(update={"on_bad_record": "skip"}))
    held_out = {r.source: "test" for r in splits.test} | {r.source: "validation" for r in splits.validation}
    trained = {r.source for r in splits.train}
    summaries = [FileSummary(e["path"], "train", e["format"], e["records"], e["rejected"]) for e in splits.mix]
    by_path = {s.path: s for s in summaries}
    for reject in splits.rejects:
        path = reject.source.rsplit(":", 1)[0]
        if path in by_path and len(by_path[path].reject_examples) < REJECT_EXAMPLES:
            by_path[path].reject_examples.append({"source": reject.source, "reason": reject.reason})
    mix = _describe_mix(splits.mix)
    del splits

    def open_stream() -> Iterator[Item]:
        for spec in config.datasets:
            for item, _ in iter_file(spec.path, spec.format):
                if isinstance(item, Record):
                    split = held_out.get(item.source) or ("train" if item.source in trained else "unused")
                    yield item, split

    return RecordStream(open=open_stream, files=summaries, mix=mix)


def _describe_mix(mix: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each source's mix entry plus how :func:`tunelab.data.split.mix_sources` sampled it, in words."""
    described = []
    for entry in mix:
        available, used = entry["train_available"], entry["train_used"]
        if used == available:
            sampling = "every record once"
        elif used < available:
            sampling = f"{used} of {available} sampled without replacement"
        else:
            whole, rest = divmod(used, available)
            sampling = f"repeated {whole}x, plus {rest} sampled without replacement"
        described.append({**entry, "sampling": sampling})
    return described
