"""One streaming pass over the records that keeps a few numbers per record, then the corpus-level findings.

Per record the pass keeps hashes, lengths, flags and a MinHash signature (on disk, through :class:`SignatureFile`),
about 60 bytes of memory plus 1 KB of disk at the default 128 permutations; texts are not kept. Findings name
records by their index in the stream; :func:`collect_records` fetches the few whose text a report shows.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.data.quality import minhash
from tunelab.data.quality.diversity import DistinctCounter, token_ngram_hashes
from tunelab.data.quality.flags import FLAGS, LOOP_MIN_CHARS, LOOP_NGRAM, Texts, answer_flags
from tunelab.data.quality.stream import SPLITS
from tunelab.data.quality.text import language, leading_word, normalized, word_tokens
from tunelab.data.record import Record
from tunelab.evaluate.metrics.select import infer_label_set

__all__ = ["BATCH", "Corpus", "SignatureFile", "TokenLengths", "analyze_stream", "collect_records", "record_texts"]

BATCH = 512
"""Records hashed together in one vectorised step."""
_LABEL_CANDIDATE_CHARS = 64
_LABEL_COUNTER_LIMIT = 100_000
"""Distinct short answers tracked for label detection before those seen once are dropped (labels repeat)."""
FLAG_BITS = {name: 1 << i for i, name in enumerate(FLAGS)}


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def record_texts(record: Record) -> tuple[str, str, str]:
    """``(prompt, last user turn, answer)``: the prompt is the system prompt and every turn before the answer.

    The answer is the final assistant turn, or ``chosen`` for preference data; plain text is all answer.
    """
    answer = record.answer if record.kind != "preference" else record.chosen
    turns = record.prompt_turns if record.kind != "text" else ()
    prompt = "\n".join(([record.system] if record.system else []) + [t.content for t in turns])
    last_user = next((t.content for t in reversed(turns) if t.role == "user"), "")
    return prompt, last_user, answer or ""


class SignatureFile:
    """Per record a ``(2, num_perm)`` uint32 block (prompt, answer), appended to a temporary file.

    A million records at 128 permutations is 1 GB: kept on disk and read back with plain reads, so the page cache,
    not the process, holds it. (Not a memory map: mapped pages count towards the process's resident memory, and
    the kernel maps pages around each one touched, so scattered reads of 16,384 rows showed a 750 MB peak at a
    million records.)
    """

    def __init__(self, num_perm: int, directory: str | None = None) -> None:
        self.num_perm = num_perm
        handle, self.path = tempfile.mkstemp(prefix="tunelab-minhash-", suffix=".u32", dir=directory)
        self._file = os.fdopen(handle, "wb")
        self.rows = 0

    def append(self, block: np.ndarray) -> None:
        self._file.write(np.ascontiguousarray(block, dtype=np.uint32).tobytes())
        self.rows += block.shape[0]

    def take(self, index: np.ndarray) -> np.ndarray:
        """A copy of the rows at ``index``, in its order; each run of consecutive rows is one read."""
        self._file.flush()
        if self.rows == 0 or len(index) == 0:
            return np.zeros((0, 2, self.num_perm), dtype=np.uint32)
        wanted, inverse = np.unique(index, return_inverse=True)
        rows = np.empty((wanted.size, 2, self.num_perm), dtype=np.uint32)
        row_bytes = rows[0].nbytes
        bounds = np.concatenate(([0], np.flatnonzero(np.diff(wanted) != 1) + 1, [wanted.size])).tolist()
        with open(self.path, "rb", buffering=0) as handle:
            for start, stop in zip(bounds[:-1], bounds[1:], strict=False):
                handle.seek(int(wanted[start]) * row_bytes)
                view = memoryview(rows[start:stop]).cast("B")
                while view:  # one read() may return less than asked for
                    done = handle.readinto(view)
                    if not done:
                        raise EOFError(f"{self.path}: fewer signature rows than recorded")
                    view = view[done:]
        return rows[inverse.ravel()]

    def close(self) -> None:
        self._file.close()
        Path(self.path).unlink(missing_ok=True)


class TokenLengths:
    """Token counts through the training tokenization (:func:`tunelab.data.tokenize.tokenize_record`)."""

    def __init__(self, template: Any, tokenizer: Any, cutoff_len: int, train_on: str) -> None:
        self.template, self.tokenizer, self.cutoff_len, self.train_on = template, tokenizer, cutoff_len, train_on

    def measure(self, record: Record) -> tuple[int, int, int, int]:
        """``(full length, length after cutoff, supervised tokens before, after)``; after is 0 when dropped."""
        from tunelab.data.tokenize import tokenize_record

        # A cutoff no sample reaches: the record as it would be without truncation.
        full = tokenize_record(record, self.template, self.tokenizer, 1 << 30, self.train_on)
        if full is None:
            return 0, 0, 0, 0
        if len(full.input_ids) <= self.cutoff_len:
            return len(full.input_ids), len(full.input_ids), full.supervised_tokens, full.supervised_tokens
        cut = tokenize_record(record, self.template, self.tokenizer, self.cutoff_len, self.train_on)
        kept = (len(cut.input_ids), cut.supervised_tokens) if cut is not None else (0, 0)
        return len(full.input_ids), kept[0], full.supervised_tokens, kept[1]


@dataclass
class Corpus:
    """Everything the first pass kept: per-record columns, counters, and the signature file."""

    columns: dict[str, np.ndarray]
    signatures: SignatureFile
    languages: dict[str, Counter[str]]
    kinds: Counter[str]
    leading_words: Counter[str]
    distinct: dict[str, DistinctCounter]
    label_set: set[str]
    label_counts: Counter[str]
    num_perm: int
    tokens: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return int(self.columns["split"].size)


_COLUMNS = {
    "split": np.uint8, "line": np.int64, "exact": np.uint64, "prompt_hash": np.uint64, "answer_hash": np.uint64,
    "prompt_chars": np.uint32, "answer_chars": np.uint32, "flags": np.uint16,
    "tokens": np.uint32, "tokens_kept": np.uint32, "supervised": np.uint32, "supervised_kept": np.uint32,
}


class _Collector:
    def __init__(self, num_perm: int, token_lengths: TokenLengths | None, temp_dir: str | None) -> None:
        self.perms = minhash.Permutations.make(num_perm)
        self.signatures = SignatureFile(num_perm, temp_dir)
        self.token_lengths = token_lengths
        self.parts: dict[str, list[np.ndarray]] = {name: [] for name in _COLUMNS}
        self.languages: dict[str, Counter[str]] = {"prompt": Counter(), "answer": Counter(), "system": Counter()}
        self.kinds: Counter[str] = Counter()
        self.leading: Counter[str] = Counter()
        self.distinct = {"instruction_1": DistinctCounter(), "instruction_2": DistinctCounter(),
                         "answer_2": DistinctCounter()}
        self.short_answers: Counter[str] = Counter()
        self.seen = 0

    def add_batch(self, batch: list[tuple[Record, str]]) -> None:
        rows: dict[str, list[int]] = {name: [] for name in _COLUMNS}
        prompts, users, answers, prompt_norms, answer_norms, user_norms = [], [], [], [], [], []
        for record, split in batch:
            prompt, user, answer = record_texts(record)
            pn, an, un = normalized(prompt), normalized(answer), normalized(user)
            prompts.append(prompt)
            users.append(user)
            answers.append(answer)
            prompt_norms.append(pn)
            answer_norms.append(an)
            user_norms.append(un)
            self.kinds[record.kind] += 1
            rows["split"].append(SPLITS.index(split))
            tail = record.source.rsplit(":", 1)[-1]
            rows["line"].append(int(tail) if tail.isdigit() else -1)
            rows["exact"].append(_hash64(pn + "\x1f" + an))
            rows["prompt_hash"].append(_hash64(pn) if pn else 0)
            rows["answer_hash"].append(_hash64(an))
            rows["prompt_chars"].append(len(prompt))
            rows["answer_chars"].append(len(answer))
            self._add_label_candidate(answer)
            if record.system:
                self.languages["system"][language(record.system[:500])] += 1
            if un:
                self.leading[leading_word(un)] += 1
            self._add_tokens(rows, record)
        sigs = minhash.signatures([t for pair in zip(prompt_norms, answer_norms, strict=True) for t in pair],
                                  self.perms).reshape(len(batch), 2, -1)
        self.signatures.append(sigs)
        copy = minhash.similarity(sigs[:, 0], sigs[:, 1])
        long_answers = [an if len(an) >= LOOP_MIN_CHARS else "" for an in answer_norms]
        distinct_long = minhash.distinct_shares(long_answers, LOOP_NGRAM)
        for i in range(len(batch)):
            prompt_lang, answer_lang = language(users[i][:500]), language(answers[i][:500])
            if users[i]:
                self.languages["prompt"][prompt_lang] += 1
            self.languages["answer"][answer_lang] += 1
            texts = Texts(prompt=users[i], answer=answers[i], prompt_norm=prompt_norms[i], answer_norm=answer_norms[i],
                          prompt_lang=prompt_lang, answer_lang=answer_lang,
                          copy_similarity=float(copy[i]) if prompt_norms[i] else 0.0,
                          distinct_long_ngrams=float(distinct_long[i]))
            rows["flags"].append(sum(FLAG_BITS[name] for name in answer_flags(texts)))
        instruction_tokens = [word_tokens(u) for u in user_norms]
        self.distinct["instruction_1"].add(token_ngram_hashes(instruction_tokens, 1))
        self.distinct["instruction_2"].add(token_ngram_hashes(instruction_tokens, 2))
        self.distinct["answer_2"].add(token_ngram_hashes([word_tokens(a) for a in answer_norms], 2))
        for name, dtype in _COLUMNS.items():
            if rows[name]:
                self.parts[name].append(np.array(rows[name], dtype=dtype))
        self.seen += len(batch)

    def _add_tokens(self, rows: dict[str, list[int]], record: Record) -> None:
        if self.token_lengths is None:
            return
        full, kept, supervised, supervised_kept = self.token_lengths.measure(record)
        rows["tokens"].append(full)
        rows["tokens_kept"].append(kept)
        rows["supervised"].append(supervised)
        rows["supervised_kept"].append(supervised_kept)

    def _add_label_candidate(self, answer: str) -> None:
        if len(answer) > _LABEL_CANDIDATE_CHARS or "\n" in answer.strip():
            return
        self.short_answers[answer] += 1
        if len(self.short_answers) > _LABEL_COUNTER_LIMIT:
            # Labels repeat: one seen once among this many distinct short answers cannot reach a 1 % share.
            self.short_answers = Counter({k: v for k, v in self.short_answers.items() if v > 1})

    def finish(self) -> Corpus:
        columns = {name: (np.concatenate(parts) if parts else np.zeros(0, dtype=_COLUMNS[name]))
                   for name, parts in self.parts.items()}
        label_set = _label_set(self.short_answers, self.seen)
        label_counts: Counter[str] = Counter()
        label_hashes = []
        for answer, count in self.short_answers.items():
            if normalized(answer) in label_set:
                label_counts[normalized(answer)] += count
                label_hashes.append(_hash64(normalized(answer)))
        is_label = np.isin(columns["answer_hash"], np.array(label_hashes, dtype=np.uint64))
        columns["is_label"] = is_label
        # A one-word answer is fine when the answers are classes: clear ``empty`` for label answers.
        columns["flags"] = np.where(is_label, columns["flags"] & ~np.uint16(FLAG_BITS["empty"]), columns["flags"])
        return Corpus(columns=columns, signatures=self.signatures, languages=self.languages, kinds=self.kinds,
                      leading_words=self.leading, distinct=self.distinct, label_set=label_set,
                      label_counts=label_counts, num_perm=self.perms.a.size, tokens=self.token_lengths is not None)


def _label_set(short_answers: Counter[str], total: int) -> set[str]:
    """:func:`infer_label_set` over every answer: short ones from the counter, the rest as never-label stand-ins."""
    counted = sum(short_answers.values())

    def refs() -> Iterator[str]:
        for answer, count in short_answers.items():
            for _ in range(count):
                yield answer
        for _ in range(total - counted):
            yield "-\n-"  # multi-line: never a label candidate

    return infer_label_set(refs())


def analyze_stream(
    items: Iterable[tuple[Record, str]], *, num_perm: int = minhash.NUM_PERM, token_lengths: TokenLengths | None = None,
    temp_dir: str | None = None, progress: Callable[[int], None] | None = None,
) -> Corpus:
    """The first pass: per-record columns and corpus counters (see the module docstring)."""
    collector = _Collector(num_perm, token_lengths, temp_dir)
    batch: list[tuple[Record, str]] = []
    try:
        for item in items:
            batch.append(item)
            if len(batch) == BATCH:
                collector.add_batch(batch)
                batch = []
                if progress is not None:
                    progress(collector.seen)
        if batch:
            collector.add_batch(batch)
    except BaseException:
        collector.signatures.close()
        raise
    return collector.finish()


def collect_records(items: Iterable[tuple[Record, str]], wanted: Iterable[int]) -> dict[int, Record]:
    """The records at the ``wanted`` stream indices (a second pass; stops after the last one)."""
    wanted = set(wanted)
    found: dict[int, Record] = {}
    if not wanted:
        return found
    last = max(wanted)
    for index, (record, _) in enumerate(items):
        if index in wanted:
            found[index] = record
        if index >= last:
            break
    return found


def to_json_ready(value: Any) -> Any:
    """numpy scalars and arrays as plain Python, for ``json.dumps``."""
    return json.loads(json.dumps(value, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))
