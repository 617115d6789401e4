"""Tokenize once: a disk cache of the tokenized train and validation examples.

The key is a SHA-256 over everything that shapes an example: the records to tokenize (their content and
``file:line``, so a changed data file, split, mix or weight is a new key), the tokenizer (its serialized vocabulary,
merges, normalizer and special tokens, or the vocabulary of a slow tokenizer), the template (its strings, or the
chat template), ``cutoff_len``, ``train_on``, and the source of the tokenization code itself. Reading and hashing
the records is far cheaper than rendering and encoding them, which is what a hit skips.

An entry is a folder: ``meta.json`` (statistics, sources, truncation kinds) and one ``.npz`` per split (token ids
and labels as flat int32 arrays with offsets; loaded with ``allow_pickle=False``, so a cache folder can never run
code). Entries are written to a temporary folder and renamed, so a crash never leaves half an entry; only the
newest ``KEEP`` entries are kept.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from array import array
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.config.schema import DataConfig
from tunelab.data.build import RecordSplits, TokenizedData, tokenize_splits
from tunelab.data.tokenize import Example, TokenizeStats

FORMAT = 1
KEEP = 16
SPLITS = ("train", "validation")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tunelab" / "tokenized"


def tokenize_with_cache(
    splits: RecordSplits, template: Any, tokenizer: Any, config: DataConfig
) -> tuple[TokenizedData, str]:
    """Tokenized data, from the cache when the same inputs were tokenized before; and a line saying which."""
    if not config.cache_tokenized:
        return tokenize_splits(splits, template, tokenizer, config), ""
    root = Path(config.cache_dir).expanduser() if config.cache_dir is not None else default_cache_dir()
    key = cache_key(splits, template, tokenizer, config)
    entry = root / key
    if (entry / "meta.json").is_file():
        data = read_entry(entry)
        os.utime(entry)  # most recently used: kept longest
        return data, f"tokenized data cache hit: {entry} (tokenization skipped)"
    data = tokenize_splits(splits, template, tokenizer, config)
    try:
        write_entry(root, key, data)
    except OSError as exc:  # a read-only or full disk must not stop training
        return data, f"tokenized data not cached ({exc})"
    return data, f"tokenized data cached in {entry}"


def cache_key(splits: RecordSplits, template: Any, tokenizer: Any, config: DataConfig) -> str:
    digest = hashlib.sha256()

    def feed(value: Any) -> None:
        digest.update(json.dumps(value, ensure_ascii=False, sort_keys=True, default=str).encode("utf-8"))
        digest.update(b"\0")

    feed({"format": FORMAT, "cutoff_len": config.cutoff_len, "train_on": config.train_on})
    feed(template_fingerprint(template, tokenizer))
    feed(tokenizer_fingerprint(tokenizer))
    feed(_code_fingerprint())
    for name in SPLITS:
        records = getattr(splits, name)
        feed([name, len(records)])
        for record in records:
            feed([record.source, record.to_json()])
    return digest.hexdigest()[:32]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode("utf-8"))
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode("utf-8"))
    extra = {"special": getattr(tokenizer, "special_tokens_map", {}), "chat": getattr(tokenizer, "chat_template", None)}
    digest.update(json.dumps(extra, sort_keys=True, default=str).encode("utf-8"))
    return digest.hexdigest()


def template_fingerprint(template: Any, tokenizer: Any) -> Any:
    if dataclasses.is_dataclass(template) and not isinstance(template, type):
        return {"name": template.name, **dataclasses.asdict(template)}
    return {"name": template.name, "chat_template": getattr(tokenizer, "chat_template", None)}


def _code_fingerprint() -> str:
    """The tokenization code is part of the key: a fix there must not be hidden behind old cache entries."""
    from tunelab.data import template, tokenize

    digest = hashlib.sha256()
    for module in (tokenize, template):
        digest.update(Path(module.__file__ or "").read_bytes())
    return digest.hexdigest()


def write_entry(root: Path, key: str, data: TokenizedData) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
    meta: dict[str, Any] = {"format": FORMAT, "stats": {}, "sources": {}, "truncation": {}}
    for name in SPLITS:
        examples: list[Example] = getattr(data, name)
        lengths = np.array([len(e.input_ids) for e in examples], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        ids = np.array([t for e in examples for t in e.input_ids], dtype=np.int32)
        labels = np.array([t for e in examples for t in e.labels], dtype=np.int32)
        np.savez(staging / f"{name}.npz", input_ids=ids, labels=labels, offsets=offsets)
        meta["sources"][name] = [e.source for e in examples]
        meta["truncation"][name] = [e.truncation for e in examples]
        meta["stats"][name] = dataclasses.asdict(data.stats[name])
    (staging / "meta.json").write_text(json.dumps(meta, ensure_ascii=False), "utf-8")
    entry = root / key
    try:
        staging.rename(entry)
    except OSError:  # another run wrote the same entry first: theirs is identical
        shutil.rmtree(staging, ignore_errors=True)
    _evict(root)
    return entry


def read_entry(entry: Path) -> TokenizedData:
    meta = json.loads((entry / "meta.json").read_text("utf-8"))
    out: dict[str, list[Example]] = {}
    for name in SPLITS:
        with np.load(entry / f"{name}.npz", allow_pickle=False) as arrays:
            ids, labels, offsets = arrays["input_ids"], arrays["labels"], arrays["offsets"].tolist()
        # 4-byte arrays, not lists: a listed token costs 36 bytes (slot and int object), and the ints of a whole
        # dataset, once made, stay in Python's allocator after training drops them (see collate.training_features).
        # Consumers read them as sequences of ints.
        out[name] = [
            Example(input_ids=array("i", ids[a:b].tobytes()),  # type: ignore[arg-type]
                    labels=array("i", labels[a:b].tobytes()),  # type: ignore[arg-type]
                    source=source, truncation=cut)
            for a, b, source, cut in zip(offsets[:-1], offsets[1:], meta["sources"][name], meta["truncation"][name],
                                         strict=True)
        ]
    stats = {name: TokenizeStats(**meta["stats"][name]) for name in SPLITS}
    return TokenizedData(train=out["train"], validation=out["validation"], stats=stats)


def _evict(root: Path) -> None:
    entries = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                     key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[KEEP:]:
        shutil.rmtree(old, ignore_errors=True)
