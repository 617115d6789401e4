"""Data quality: the report (``tunelab data report``), the cleaner (``data clean``) and the splitter (``data split``).

    stream.py     records from files or a training config, each with its split; every layout streamed
    analyze.py    the one streaming pass: a few numbers and a MinHash signature per record, corpus counters
    findings.py   duplicates, near-duplicate clusters, leakage, conflicts, flags, labels, diversity, lengths
    topics.py     content diversity: TF-IDF + LSA + k-means topic clusters of a seeded sample
    report.py     two passes -> report dict (+ difficulty with a model); render.py -> report.md / report.html
    clean.py      drop by rule, one reason per dropped row;  splitting.py  grouped, stratified splits
    minhash.py    shingles, signatures, LSH by sorting;  flags.py  per-record answer checks;  text.py  language,
                  leading words
"""

from tunelab.data.quality.clean import CleanOptions, CleanResult, clean_files
from tunelab.data.quality.flags import FLAGS
from tunelab.data.quality.report import ReportSettings, build_report, open_input, write_report
from tunelab.data.quality.splitting import SplitResult, split_files

__all__ = [
    "CleanOptions",
    "CleanResult",
    "FLAGS",
    "ReportSettings",
    "SplitResult",
    "build_report",
    "clean_files",
    "open_input",
    "split_files",
    "write_report",
]
