"""``tunelab data clean``: drop records by chosen rules, write the rest and a rejects file with one reason each.

Rules are applied in a fixed order and the first that matches names the reason, so the same input and options
always give the same output: unreadable rows, length bounds, answer flags, exact duplicates, near-duplicates,
conflicts. Of a group of duplicates the first record in input order is kept.

A conflict group (the same or a near-same prompt with different answers) is handled one of two ways:

    drop       every record goes (``conflict``): which answer is right is unknown, and training on both teaches
               the model to guess. The safe choice (``--drop-conflicts``, or ``--conflicts drop``).
    majority   (``--conflicts majority``) the records giving the most common answer stay and the others go
               (``conflict_minority``, naming the kept answer); a tie between the most common answers drops the
               whole group. Right when disagreement is annotation noise around a consensus (several annotators,
               crowd labels). Each record is a vote, copies included; near-duplicate answers count as one answer,
               as in the report.

The input is data files or a training config (its datasets, in their declared formats; weights and splits do not
apply: every record is cleaned).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from tunelab.data.build import write_records
from tunelab.data.quality import findings
from tunelab.data.quality.analyze import FLAG_BITS, analyze_stream
from tunelab.data.quality.flags import FLAGS
from tunelab.data.quality.stream import Source, files_stream, iter_file
from tunelab.data.readers import Reject, write_rejects
from tunelab.data.record import Record
from tunelab.errors import ConfigError

__all__ = ["CleanOptions", "CleanResult", "Drop", "clean_files", "parse_flags", "rejects_path"]


@dataclass
class CleanOptions:
    dedup: bool = False
    near_dedup: bool = False
    conflicts: Literal["keep", "drop", "majority"] = "keep"
    """What to do with conflict groups (see the module docstring)."""
    drop_flags: tuple[str, ...] = ()
    min_chars: int | None = None
    max_chars: int | None = None
    """Bounds on a record's prompt + answer characters."""
    near_dup_threshold: float = 0.8


@dataclass
class CleanResult:
    kept: int = 0
    read: int = 0
    reasons: Counter[str] = field(default_factory=Counter)

    @property
    def dropped(self) -> int:
        return sum(self.reasons.values())

    def describe(self) -> str:
        why = ", ".join(f"{reason} {count}" for reason, count in sorted(self.reasons.items(), key=lambda r: -r[1]))
        return f"kept {self.kept} of {self.read} rows; dropped {self.dropped}" + (f": {why}" if why else "")


def parse_flags(text: str | None) -> tuple[str, ...]:
    if not text:
        return ()
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in FLAGS]
    if unknown:
        raise ConfigError(f"--drop-flags: unknown flag {unknown[0]!r}; allowed: {', '.join(FLAGS)}")
    return names


@dataclass(frozen=True)
class Drop:
    rule: str
    """The counted reason: ``min_chars``, ``flag:loop``, ``exact_duplicate``, ..."""
    detail: str
    kept: int | None = None
    """For duplicates and outvoted answers, the stream index of the record kept in their place."""
    quote_kept: bool = False
    """Name the kept record's answer in the reason (an outvoted answer names the one that won)."""


def _drop_reasons(sources: Sequence[Source], options: CleanOptions) -> dict[int, Drop]:
    """Stream index -> why, for every readable record the options drop (the first rule that matches wins)."""
    corpus = analyze_stream(files_stream(sources, split_by_name=False))
    try:
        c = corpus.columns
        drops: dict[int, Drop] = {}

        def mark(indices: Iterable[Any], drop: Drop) -> None:
            for i in indices:
                drops.setdefault(int(i), drop)

        chars = c["prompt_chars"].astype(np.int64) + c["answer_chars"]
        if options.min_chars is not None:
            mark(np.nonzero(chars < options.min_chars)[0],
                 Drop("min_chars", f"prompt + answer shorter than {options.min_chars} characters"))
        if options.max_chars is not None:
            mark(np.nonzero(chars > options.max_chars)[0],
                 Drop("max_chars", f"prompt + answer longer than {options.max_chars} characters"))
        for name in options.drop_flags:
            mark(np.nonzero(c["flags"] & np.uint16(FLAG_BITS[name]))[0], Drop(f"flag:{name}", FLAGS[name][1]))
        if options.dedup:
            for group in findings.exact_groups(corpus):
                mark(group[1:], Drop("exact_duplicate", "same prompt and answer as", int(group[0])))
        if options.near_dedup:
            clusters = findings.cluster_near_duplicates(corpus, options.near_dup_threshold)
            for group in clusters.members():
                mark(group[1:], Drop("near_duplicate", f"similarity >= {options.near_dup_threshold} to",
                                     int(group[0])))
        if options.conflicts != "keep":
            prompts = findings.cluster_near_duplicates(corpus, options.near_dup_threshold, part=0,
                                                       valid=c["prompt_hash"] != 0)
            for group in findings.conflicts(corpus, prompts)["all"]:
                members = np.array(group["records"], dtype=np.int64)
                for indices, drop in _conflict_drops(corpus, members, group["distinct_answers"], options):
                    mark(indices, drop)
        return drops
    finally:
        corpus.signatures.close()


def _conflict_drops(corpus: Any, members: np.ndarray, distinct: int,
                    options: CleanOptions) -> list[tuple[np.ndarray, Drop]]:
    """What to drop of one conflict group: all of it, or (majority) the records outvoted by a unique winner."""
    what = f"{members.size} records with the same or a near-same prompt have {distinct} different answers"
    if options.conflicts == "drop":
        return [(members, Drop("conflict", what))]
    variants = findings.answer_variants(corpus, members, options.near_dup_threshold)
    votes = np.bincount(variants)
    if (votes == votes.max()).sum() > 1:
        return [(members, Drop("conflict", f"{what}; the most common answers tie ({votes.max()} records each), "
                                           "so none is kept"))]
    winner = int(votes.argmax())
    kept = int(members[variants == winner].min())
    drop = Drop("conflict_minority", f"{what}; the majority answer ({votes.max()} of {members.size} records) is "
                                     "kept, first at", kept, quote_kept=True)
    return [(members[variants != winner], drop)]


def rejects_path(out: Path) -> Path:
    """``OUT.jsonl`` -> ``OUT.rejects.jsonl``."""
    return out.with_name(out.name.removesuffix(".jsonl") + ".rejects.jsonl")


def clean_files(sources: Sequence[str | Source], out: Path, options: CleanOptions) -> CleanResult:
    """Write the kept records to ``out`` (OpenAI messages JSONL) and every dropped row to ``OUT.rejects.jsonl``.

    Streaming passes (statistics, kept records, the answers quoted in rejects, rejects), so memory does not grow
    with the input.
    """
    if not (options.dedup or options.near_dedup or options.conflicts != "keep" or options.drop_flags
            or options.min_chars is not None or options.max_chars is not None):
        raise ConfigError("nothing to do: choose --dedup, --near-dedup, --drop-conflicts, --drop-flags, "
                          "--min-chars or --max-chars")
    resolved = [s if isinstance(s, Source) else Source(s) for s in sources]
    drops = _drop_reasons(resolved, options)
    referenced = {d.kept for d in drops.values() if d.kept is not None}
    result = CleanResult()
    out.parent.mkdir(parents=True, exist_ok=True)

    def rows() -> Iterator[tuple[Record | Reject, int | None]]:
        index = 0
        for source in resolved:
            for item, _ in iter_file(source.path, source.format):
                if isinstance(item, Reject):
                    yield item, None
                else:
                    yield item, index
                    index += 1

    def kept() -> Iterator[Record]:
        for item, index in rows():
            result.read += 1
            if isinstance(item, Reject):
                result.reasons["unreadable"] += 1
            elif index in drops:
                result.reasons[drops[index].rule] += 1
            else:
                result.kept += 1
                yield item

    def rejects() -> Iterator[Reject]:
        # index -> (source, answer) of the records kept for others: read first, since a majority answer's first
        # record can come after an outvoted one
        stand_ins = {index: (item.source, _quote(item)) for item, index in rows()
                     if isinstance(item, Record) and index in referenced}
        for item, index in rows():
            if isinstance(item, Reject):
                yield Reject(item.source, f"unreadable: {item.reason}", item.raw)
                continue
            assert index is not None  # every record has a stream index
            drop = drops.get(index)
            if drop is not None:
                yield Reject(item.source, f"{drop.rule}: {_detail(drop, stand_ins)}",
                             {**item.to_json(), "source": item.source})

    write_records(out, kept())  # type: ignore[arg-type]  # iterated once; a list would hold the whole corpus
    write_rejects(rejects_path(out), rejects())
    return result


QUOTE_CHARS = 80
"""Characters of a kept answer quoted in an outvoted record's reason."""


def _quote(record: Record) -> str:
    text = (record.answer if record.kind != "preference" else record.chosen) or ""
    return repr(text if len(text) <= QUOTE_CHARS else text[: QUOTE_CHARS - 1] + "…")


def _detail(drop: Drop, stand_ins: dict[int, tuple[str, str]]) -> str:
    if drop.kept is None:
        return drop.detail
    source, answer = stand_ins[drop.kept]
    return f"{drop.detail} {source}" + (f": {answer}" if drop.quote_kept else "")
