"""Reading dataset files (JSON, JSONL, CSV, Parquet) into canonical records, each tagged ``file:line``."""

from tunelab.data.readers.files import decode_text, read_rows
from tunelab.data.readers.formats import detect_format, parse_record
from tunelab.data.readers.load import LoadResult, Reject, load_records, write_rejects

__all__ = [
    "LoadResult",
    "Reject",
    "decode_text",
    "detect_format",
    "load_records",
    "parse_record",
    "read_rows",
    "write_rejects",
]
