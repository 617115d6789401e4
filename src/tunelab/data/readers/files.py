"""Reading data files into raw rows, each tagged with the ``file:line`` it came from.

This module knows about file layouts and text encodings, nothing about record formats: it yields plain dicts (or a
``DataError`` for a row that cannot be read) and leaves their meaning to ``formats.py``.

Problems that spoil the whole file (missing, unsupported type, undecodable bytes, a broken JSON array) raise
``DataError``. Every layout is streamed (JSON Lines line by line, JSON arrays element by element, CSV row by row,
Parquet in batches), so a file of any size is read in memory that does not grow with it. A single unreadable row
(a malformed JSONL line, a CSV row with too many cells, a non-object) is yielded as a ``DataError`` in place of the
row so the loader can skip it or stop, as the user chose.
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
    """Decode a text file's bytes as :func:`text_encoding` decides (UTF-8 with its BOM stripped, else GBK)."""
    encoding, bom = _encoding_of(io.BytesIO(data), name)
    return data[bom:].decode(encoding)


def text_encoding(path: Path, name: str) -> tuple[str, int]:
    """``(encoding, BOM length)`` of a text file: UTF-8 (a BOM is skipped: Windows tools such as Notepad and Excel's
    "CSV UTF-8" prepend one, and left in it would become part of the first key), else GBK, else a ``DataError``
    naming the line of the first byte that is not UTF-8. Found by streaming the file; the readers then decode it
    piece by piece with that encoding, so the choice is made per file (a file that is valid UTF-8 up to its last
    line is not read as UTF-8 and then GBK halfway through)."""
    with path.open("rb") as handle:
        return _encoding_of(handle, name)


# Undecodable bytes, as a share of a file's non-ASCII bytes, up to which the file is UTF-8 with damaged bytes rather
# than GBK. A GBK file fails UTF-8 at nearly every non-ASCII byte; a UTF-8 file with one stray byte would decode
# as GBK too (UTF-8's Chinese often does), and every line would turn into mojibake.
_DAMAGED_UTF8_SHARE = 0.05


def _encoding_of(handle: Any, name: str) -> tuple[str, int]:
    bom = len(codecs.BOM_UTF8) if handle.read(len(codecs.BOM_UTF8)) == codecs.BOM_UTF8 else 0
    handle.seek(bom)
    utf8_error = _first_decode_error(handle, "utf-8")
    if utf8_error is None:
        return "utf-8", bom
    handle.seek(bom)
    bad, non_ascii = _utf8_damage(handle)
    damaged_utf8 = bad <= _DAMAGED_UTF8_SHARE * non_ascii
    handle.seek(bom)
    if not damaged_utf8:
        # Chinese datasets saved on Windows are often GBK (code page 936); decoding strictly means a file in any
        # other legacy encoding still fails here instead of turning into mojibake in most cases.
        if _first_decode_error(handle, "gbk") is None:
            return "gbk", bom
        handle.seek(bom)
    offset, byte = utf8_error
    line = _line_at(handle, offset)
    if damaged_utf8:
        raise DataError(f"{name}:{line}", None, f"not valid UTF-8: byte 0x{byte:02x} at offset {bom + offset} "
                        f"({bad} undecodable byte{'s' * (bad != 1)} in a file that is otherwise UTF-8); fix or remove "
                        f"{'them' if bad != 1 else 'it'}")
    raise DataError(f"{name}:{line}", None, f"not valid UTF-8 (or GBK) text: byte 0x{byte:02x} at offset "
                    f"{bom + offset}; re-save the file as UTF-8")


_SCAN_BYTES = 1 << 20
_ASCII = bytes(range(128))


def _utf8_damage(handle: Any) -> tuple[int, int]:
    """(bytes that are not UTF-8, non-ASCII bytes) from the current position to the end."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")  # a bad byte -> one lone surrogate
    bad = non_ascii = 0
    while True:
        chunk = handle.read(_SCAN_BYTES)
        non_ascii += len(chunk.translate(None, _ASCII))
        bad += sum(1 for char in decoder.decode(chunk, final=not chunk) if "\udc80" <= char <= "\udcff")
        if not chunk:
            return bad, non_ascii


def _line_at(handle: Any, offset: int) -> int:
    """The 1-based line of byte ``offset`` (from the current position)."""
    newlines = 0
    while offset > 0 and (chunk := handle.read(min(_SCAN_BYTES, offset))):
        newlines += chunk.count(b"\n")
        offset -= len(chunk)
    return newlines + 1


def _first_decode_error(handle: Any, encoding: str) -> tuple[int, int] | None:
    """``(offset, byte)`` of the first byte that does not decode, or ``None``; reads from the current position."""
    decoder = codecs.getincrementaldecoder(encoding)()
    offset = 0  # of the next chunk, from where reading started
    while True:
        chunk = handle.read(_SCAN_BYTES)
        pending = len(decoder.getstate()[0])  # bytes of a character cut by the previous chunk's end
        try:
            decoder.decode(chunk, final=not chunk)
        except UnicodeDecodeError as error:
            return offset - pending + error.start, error.object[error.start]
        if not chunk:
            return None
        offset += len(chunk)


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
    encoding, bom = text_encoding(path, name)
    with path.open("rb") as handle:
        handle.seek(bom)
        # Split on b"\n" only: str.splitlines() would also break at U+2028 and friends, which JSON strings may
        # contain. In UTF-8 and GBK the byte 0x0a is never part of a multi-byte character, so splitting the bytes
        # first and decoding each line gives the same lines as decoding the file first.
        for number, raw in enumerate(handle, start=1):
            line = raw.removesuffix(b"\n").decode(encoding)
            if not line.strip():
                continue
            source = f"{name}:{number}"
            yield source, parse_json_line(source, line)


def _read_json(path: Path, name: str) -> Iterator[RowOrError]:
    """A top-level array of objects; also a bare stream of objects (JSON Lines saved with a ``.json`` name).

    Read through a sliding window (:class:`_JsonWindow`), one element at a time, so the file is never held whole.
    Each row's line is where its element starts.
    """
    encoding, bom = text_encoding(path, name)
    with path.open("rb") as raw:
        raw.seek(bom)
        window = _JsonWindow(io.TextIOWrapper(raw, encoding=encoding, newline=""), name)
        if not window.skip_whitespace():
            return
        if window.peek() == "{":
            while window.skip_whitespace():
                yield window.row()
            return
        if window.peek() != "[":
            raise window.fail("expected an array of objects ('[') or an object ('{')")
        window.advance()
        if not window.skip_whitespace():
            raise window.fail("the array is not closed with ']'")
        if window.peek() == "]":
            window.advance()
        else:
            while True:
                yield window.row()
                if not window.skip_whitespace():
                    raise window.fail("the array is not closed with ']'")
                if window.peek() == ",":
                    window.advance()
                    window.skip_whitespace()
                elif window.peek() == "]":
                    window.advance()
                    break
                else:
                    raise window.fail("expected ',' or ']' after an array element")
        if window.skip_whitespace():
            raise window.fail("unexpected text after the closing ']'")


_WINDOW_CHARS = 1 << 20
"""Characters read at a time by :class:`_JsonWindow`; an element longer than the window doubles the next read."""


class _JsonWindow:
    """The unread part of a JSON text file, decoded one value at a time with ``json.JSONDecoder.raw_decode``.

    Why not ``ijson``: it yields values without their position in the file, and every row must name the line its
    element starts on. ``raw_decode`` on a window of text gives the end offset of each value, the window keeps a
    running line count, and the standard library's decoder reads values exactly as ``json.loads`` does.

    The window always starts at the beginning of a line, so a ``JSONDecodeError``'s column is the column in the file
    and its line is an offset from :attr:`first_line`. A value cut off by the end of the window is retried after
    reading more; a real syntax error is therefore reported once the rest of the file has been read, at the latest.
    """

    _decoder = json.JSONDecoder()

    def __init__(self, handle: io.TextIOBase, name: str) -> None:
        self.handle, self.name = handle, name
        self.text, self.pos, self.eof = "", 0, False
        self.first_line = 1
        """Line number of ``text[0]``."""
        self._counted, self._line = 0, 1  # the line number at offset _counted of text, advanced as pos moves on

    def line_at(self, pos: int) -> int:
        if pos >= self._counted:
            self._line += self.text.count("\n", self._counted, pos)
        else:
            self._line -= self.text.count("\n", pos, self._counted)
        self._counted = pos
        return self._line

    def _read_more(self) -> bool:
        """Append the next piece of the file, dropping the lines before ``pos``; at the end of the file, change
        nothing (so a decoding error's position still points into ``text``) and return False."""
        if self.eof:
            return False
        chunk = self.handle.read(max(_WINDOW_CHARS, len(self.text) - self.pos))
        if not chunk:
            self.eof = True
            return False
        keep = self.text.rfind("\n", 0, self.pos) + 1
        if keep:
            self.first_line = self.line_at(keep)
            self.text, self.pos, self._counted = self.text[keep:], self.pos - keep, 0
        self.text += chunk
        return True

    def skip_whitespace(self) -> bool:
        """Move past JSON whitespace; False when the file ends first."""
        while True:
            self.pos = _skip_whitespace(self.text, self.pos)
            if self.pos < len(self.text):
                return True
            if not self._read_more():
                return False

    def peek(self) -> str:
        return self.text[self.pos]

    def advance(self) -> None:
        self.pos += 1

    def row(self) -> RowOrError:
        """The value at ``pos`` (which is not whitespace) as a row, leaving ``pos`` after it."""
        start = self.pos
        while True:
            try:
                value, end = self._decoder.raw_decode(self.text, start)
            except json.JSONDecodeError as error:
                if _maybe_cut_off(error) and self._read_more():
                    start = self.pos
                    continue
                line = self.first_line + error.lineno - 1
                raise DataError(f"{self.name}:{line}", "-", _invalid_json(error)) from None
            if end == len(self.text) and self._read_more():
                start = self.pos  # a number may go on in the next piece
                continue
            break
        source = f"{self.name}:{self.line_at(start)}"
        self.pos = end
        return source, value if isinstance(value, dict) else _not_an_object(source, value)

    def fail(self, problem: str) -> DataError:
        # A broken array cannot be resynchronised, so this ends the file rather than one row.
        return DataError(f"{self.name}:{self.line_at(self.pos)}", "-", f"invalid JSON: {problem}")


def _maybe_cut_off(error: json.JSONDecodeError) -> bool:
    """Whether the error could come from the window ending inside a value rather than from bad JSON.

    The end of the window cuts a value at its last few characters (``tr`` of ``true``, half a ``\\u`` escape) or
    inside a string; any other error is reported at once instead of reading the rest of the file first.
    """
    return error.pos >= len(error.doc) - 16 or error.msg.startswith("Unterminated string")


def _skip_whitespace(text: str, pos: int) -> int:
    match = _JSON_WHITESPACE.match(text, pos)
    assert match is not None  # the pattern matches the empty string
    return match.end()


def _read_csv(path: Path, name: str) -> Iterator[RowOrError]:
    encoding, bom = text_encoding(path, name)
    # The csv module refuses fields over 128 KiB by default; documents for continued pre-training are often longer.
    # The limit is process-wide, so it is only ever raised.
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    with path.open("rb") as raw:
        raw.seek(bom)
        # strict: an unclosed quote is an error, not a cell that swallows the rest of the file
        yield from _csv_rows(csv.reader(io.TextIOWrapper(raw, encoding=encoding, newline=""), strict=True), name)


def _csv_rows(reader: Any, name: str) -> Iterator[RowOrError]:
    try:
        header = next(reader, None)
        if header is None:
            return
        columns = [column.strip() for column in header]
        # A quoted cell may span lines, so a row starts on the line after the previous row ended.
        start = reader.line_num + 1
        while True:
            source = f"{name}:{start}"
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as error:  # the reader goes on with the next line
                start = reader.line_num + 1
                unclosed = " (a quoted cell that starts in this row is never closed)" if "end of data" in str(
                    error) else ""
                yield source, DataError(source, "-", f"invalid CSV: {error}{unclosed}")
                continue
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
