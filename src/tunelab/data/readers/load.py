"""Loading one dataset file into records, stopping at or setting aside the rows that are malformed."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tunelab.config.schema import DatasetSpec
from tunelab.data.readers.files import read_rows
from tunelab.data.readers.formats import detect_format, parse_record
from tunelab.data.record import Record
from tunelab.errors import DataError


@dataclass(frozen=True)
class Reject:
    """A row left out in ``skip`` mode: where it was, why, and the row itself (``None`` when it could not be read)."""

    source: str
    reason: str
    raw: dict[str, Any] | None


@dataclass
class LoadResult:
    records: list[Record] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    format: str = "auto"
    """The declared format, else the one detected from the first good row (``auto`` when no row was good)."""


def load_records(spec: DatasetSpec, on_bad_record: Literal["error", "skip"]) -> LoadResult:
    """Read ``spec.path`` into records tagged ``file:line``.

    With ``on_bad_record="error"`` the first malformed row raises its ``DataError``; with ``"skip"`` each becomes a
    ``Reject``. A file with no rows at all raises: training on nothing is never what was meant.
    """
    if on_bad_record not in ("error", "skip"):
        raise ValueError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
    result = LoadResult(format=spec.format)
    # Detection waits for the first row that parses, so one odd first row cannot set the format of the whole file.
    detected = spec.format != "auto"
    rows = 0
    for source, row in read_rows(spec.path):
        rows += 1
        try:
            if isinstance(row, DataError):
                raise row
            fmt = result.format if detected else detect_format(row, source)
            record = parse_record(row, fmt, source)
        except DataError as error:
            if on_bad_record == "error":
                raise
            result.rejects.append(Reject(source, _reason(error), row if isinstance(row, dict) else None))
            continue
        if not detected:
            result.format, detected = fmt, True
        result.records.append(record)
    if rows == 0:
        raise DataError(spec.path, None, "the file holds no records")
    return result


def write_rejects(path: Path, rejects: Iterable[Reject]) -> None:
    """Write one JSON line ``{source, reason, raw}`` per reject, text kept readable (no ``\\u`` escapes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for reject in rejects:
            line = {"source": reject.source, "reason": reject.reason, "raw": reject.raw}
            # default=str: Parquet rows may hold dates or bytes, which a rejects file should show, not choke on.
            out.write(json.dumps(line, ensure_ascii=False, default=str) + "\n")


def _reason(error: DataError) -> str:
    """The message without its ``file:line`` prefix, which the reject already carries as ``source``."""
    return f"{error.field}: {error.problem}" if error.field else error.problem
