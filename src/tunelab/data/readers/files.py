"""Reading data files into raw rows, each tagged with the ``file:line`` it came from.

This module knows about file layouts and text encodings, nothing about record formats: it yields plain dicts (or a
``DataError`` for a row that cannot be read) and leaves their meaning to ``formats.py``.

Problems that spoil the whole file (missing, unsupported type, undecodable bytes, a broken JSON array) raise
``DataError``. A single unreadable row (a malformed JSONL line, a CSV row with too many cells, a non-object) is
yielded as a ``DataError`` in place of the row so the loader can skip it or stop, as the user chose.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tunelab.errors import DataError

RowOrError = tuple[str, dict[str, Any] | DataError]

# Rows are read from Parquet in batches of this many, so a large file never becomes one Python list at once.
PARQUET_BATCH_ROWS = 1024

# JSON's own whitespace; str.isspace() or \s would also accept characters JSON forbids between tokens.
_JSON_WHITESPACE = re.compile(r"[ \t\n\r]*")


def read_rows(path: str | Path) -> Iterator[RowOrError]:
    """Yield ``(source, row)`` pairs from a JSON, JSONL/NDJSON, CSV or Parquet file.

    ``source`` is ``file:line`` with the file named as the caller spelled it. ``row`` is a dict, or a ``DataError``
    when that one row cannot be read. File-wide problems raise ``DataError`` at once, before iteration starts.
    """
    name = str(path)
    path = Path(path)
    if not path.exists():
        raise DataError(name, None, "file not found")
    if path.is_dir():
        raise DataError(name, None, "expected a file, got a directory")
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        supported = ", ".join(sorted(_READERS))
        raise DataError(name, None, f"unsupported file type '{path.suffix or '(none)'}'; supported: {supported}")
    return reader(path, name)


def decode_text(data: bytes, name: str) -> str:
    """Decode a text file's bytes: UTF-8 (BOM stripped), else GBK, else a ``DataError`` pointing at the bad byte."""
    offset = 0
    if data.startswith(codecs.BOM_UTF8):
        # Windows tools (Notepad, Excel's "CSV UTF-8") prepend a BOM; left in, it would become part of the first key.
        data, offset = data[len(codecs.BOM_UTF8) :], len(codecs.BOM_UTF8)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as utf8_error:
        try:
            # Chinese datasets saved on Windows are often GBK (code page 936); decoding strictly means a file in
            # any other legacy encoding still fails below instead of turning into mojibake in most cases.
            return data.decode("gbk")
        except UnicodeDecodeError:
            bad = data[utf8_error.start]
            where = offset + utf8_error.start
            raise DataError(
                name,
                None,
                f"not valid UTF-8 (or GBK) text: byte 0x{bad:02x} at offset {where}; re-save the file as UTF-8",
            ) from None


def _read_text(path: Path, name: str) -> str:
    return decode_text(path.read_bytes(), name)


def _not_an_object(source: str, value: object) -> DataError:
    return DataError(source, "-", f"expected a JSON object, got {type(value).__name__}")


def _invalid_json(error: json.JSONDecodeError) -> str:
    return f"invalid JSON: {error.msg} (column {error.colno})"


def parse_json_line(source: str, line: str) -> dict[str, Any] | DataError:
    """One JSONL line: the object, or the error that names its source."""
    try:
        value = json.loads(line)
    except json.JSONDecodeError as error:
        return DataError(source, "-", _invalid_json(error))
    return value if isinstance(value, dict) else _not_an_object(source, value)


def _read_jsonl(path: Path, name: str) -> Iterator[RowOrError]:
    text = _read_text(path, name)
    # Split on "\n" only: str.splitlines() would also break at U+2028 and friends, which JSON strings may contain.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        source = f"{name}:{number}"
        yield source, parse_json_line(source, line)


def _read_json(path: Path, name: str) -> Iterator[RowOrError]:
    """A top-level array of objects; also a bare stream of objects (JSON Lines saved with a ``.json`` name).

    Each row's line is where its object starts, found by decoding one value at a time with ``raw_decode`` and
    counting newlines as the scan moves forward, so the whole pass stays linear in the file size.
    """
    text = _read_text(path, name)
    decoder = json.JSONDecoder()
    lines = _LineCounter(text)

    def fail(pos: int, problem: str) -> DataError:
        # A broken array cannot be resynchronised, so this ends the file rather than one row.
        return DataError(f"{name}:{lines.at(pos)}", "-", f"invalid JSON: {problem}")

    def decode_at(pos: int) -> tuple[Any, int]:
        try:
            return decoder.raw_decode(text, pos)
        except json.JSONDecodeError as error:
            raise DataError(f"{name}:{error.lineno}", "-", _invalid_json(error)) from None

    def row_at(pos: int, value: Any) -> RowOrError:
        source = f"{name}:{lines.at(pos)}"
        return source, value if isinstance(value, dict) else _not_an_object(source, value)

    pos = _skip_whitespace(text, 0)
    if pos == len(text):
        return
    if text[pos] == "{":
        while pos < len(text):
            value, end = decode_at(pos)
            yield row_at(pos, value)
            pos = _skip_whitespace(text, end)
        return
    if text[pos] != "[":
        raise fail(pos, "expected an array of objects ('[') or an object ('{')")
    pos = _skip_whitespace(text, pos + 1)
    if text.startswith("]", pos):
        pos += 1
    else:
        while True:
            value, end = decode_at(pos)
            yield row_at(pos, value)
            pos = _skip_whitespace(text, end)
            if text.startswith(",", pos):
                pos = _skip_whitespace(text, pos + 1)
            elif text.startswith("]", pos):
                pos += 1
                break
            elif pos == len(text):
                raise fail(pos, "the array is not closed with ']'")
            else:
                raise fail(pos, "expected ',' or ']' after an array element")
    pos = _skip_whitespace(text, pos)
    if pos != len(text):
        raise fail(pos, "unexpected text after the closing ']'")


def _skip_whitespace(text: str, pos: int) -> int:
    match = _JSON_WHITESPACE.match(text, pos)
    assert match is not None  # the pattern matches the empty string
    return match.end()


class _LineCounter:
    """Line numbers of increasing offsets in one text, counting each newline once."""

    def __init__(self, text: str) -> None:
        self._text = text
        self._pos = 0
        self._line = 1

    def at(self, pos: int) -> int:
        if pos < self._pos:
            return self._text.count("\n", 0, pos) + 1
        self._line += self._text.count("\n", self._pos, pos)
        self._pos = pos
        return self._line


def _read_csv(path: Path, name: str) -> Iterator[RowOrError]:
    text = _read_text(path, name)
    # The csv module refuses fields over 128 KiB by default; documents for continued pre-training are often longer.
    # The limit is process-wide, so it is only ever raised.
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None:
            return
        columns = [column.strip() for column in header]
        # A quoted cell may span lines, so a row starts on the line after the previous row ended.
        start = reader.line_num + 1
        for cells in reader:
            source = f"{name}:{start}"
            start = reader.line_num + 1
            if not any(cells):
                continue  # a blank line or a row of empty cells: nothing to read
            if len(cells) > len(columns):
                yield source, DataError(source, "-", f"{len(cells)} cells but the header has {len(columns)} columns")
                continue
            # An empty cell is how CSV writes a missing value, so it becomes a missing key rather than "". Short rows
            # are allowed (strict=False): their trailing cells are missing too.
            yield source, {column: cell for column, cell in zip(columns, cells, strict=False) if cell != ""}
    except csv.Error as error:
        raise DataError(f"{name}:{reader.line_num}", "-", f"invalid CSV: {error}") from None


def _read_parquet(path: Path, name: str) -> Iterator[RowOrError]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as error:
        raise DataError(name, None, f"not a readable Parquet file: {error}") from None
    number = 0
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS):
        for row in batch.to_pylist():
            number += 1
            # A null cell is Parquet's missing value (columns are shared by all rows), as an empty cell is CSV's.
            yield f"{name}:{number}", {key: value for key, value in row.items() if value is not None}


_READERS: dict[str, Callable[[Path, str], Iterator[RowOrError]]] = {
    ".csv": _read_csv,
    ".json": _read_json,
    ".jsonl": _read_jsonl,
    ".ndjson": _read_jsonl,
    ".parquet": _read_parquet,
}
