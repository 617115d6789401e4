"""Config -> records -> splits -> token examples: everything training needs from the data section."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.config.schema import DataConfig
from tunelab.data.readers import load_records, write_rejects
from tunelab.data.record import Record
from tunelab.data.split import SourceSample, apply_samples, sample_sources, split_items
from tunelab.data.template import Template
from tunelab.data.tokenize import Example, TokenizeStats, tokenize_record
from tunelab.errors import ConfigError, DataError


@dataclass
class RecordSplits:
    train: list[Record]
    validation: list[Record]
    test: list[Record]
    mix: list[dict[str, Any]] = field(default_factory=list)
    rejects: list[Any] = field(default_factory=list)


@dataclass
class TokenizedData:
    train: list[Example]
    validation: list[Example]
    stats: dict[str, TokenizeStats]


def load_splits(config: DataConfig) -> RecordSplits:
    """Read every dataset, split each one by the same seed, and mix the training parts by weight.

    Each source is split on its own so the test set holds every source in proportion, and weights shape only
    what training sees (validation and test stay unweighted).
    """
    if not config.datasets:
        raise ConfigError("data.datasets: no training data given; add at least one {path: FILE}")
    parts: list[tuple[list[Record], float]] = []
    validation: list[Record] = []
    test: list[Record] = []
    rejects: list[Any] = []
    mix: list[dict[str, Any]] = []
    for spec in config.datasets:
        loaded = load_records(spec, config.on_bad_record)
        rejects.extend(loaded.rejects)
        if not loaded.records:
            raise DataError(spec.path, None, f"no readable records ({len(loaded.rejects)} bad ones skipped)")
        # SFT trains on (and evaluates against) a preference record's chosen answer; converted here, before the
        # split, so that test.jsonl holds the answer the evaluation compares with.
        preference = sum(record.kind == "preference" for record in loaded.records)
        records = [record.as_sft() for record in loaded.records] if preference else loaded.records
        splits = split_items(records, config.val_size, config.test_size, config.seed)
        parts.append((splits.train, spec.weight))
        validation.extend(splits.validation)
        test.extend(splits.test)
        mix.append({"path": spec.path, "format": loaded.format, "records": len(loaded.records),
                    "rejected": len(loaded.rejects), "weight": spec.weight, "train_available": len(splits.train),
                    "preference_as_chosen": preference})
    samples, rng = sample_sources([len(items) for items, _ in parts], [w for _, w in parts], config.seed)
    train = apply_samples([items for items, _ in parts], samples, rng)
    for entry, sample in zip(mix, samples, strict=True):
        entry.update(mix_entry(sample, len(train)))
    return RecordSplits(train=train, validation=validation, test=test, mix=mix, rejects=rejects)


def mix_entry(sample: SourceSample, total: int) -> dict[str, Any]:
    """The fields of a source's ``data_mix.json`` entry that say how the mix sampled it (``total``: the mix size)."""
    return {"train_used": sample.count, "share": round(sample.count / max(total, 1), 4),
            "replacement": sample.with_replacement, "sampling": sample.describe()}


def tokenize_splits(splits: RecordSplits, template: Template, tokenizer: Any, config: DataConfig) -> TokenizedData:
    stats: dict[str, TokenizeStats] = {}
    out: dict[str, list[Example]] = {}
    for name, records in (("train", splits.train), ("validation", splits.validation)):
        stat = TokenizeStats()
        examples = []
        for example in _tokenize_records(records, template, tokenizer, config, name):
            stat.add(example)
            if example is not None:
                examples.append(example)
        stats[name] = stat
        out[name] = examples
    if splits.train and not out["train"]:
        raise ConfigError("data.cutoff_len: every training sample lost all of its answer to truncation")
    return TokenizedData(train=out["train"], validation=out["validation"], stats=stats)


# Records per task sent to a tokenizing worker: large enough that pickling the results is cheap next to the work.
_WORKER_CHUNK = 256
# ``auto`` starts workers only above this many records: below it tokenizing takes a few seconds at most (2,000 chat
# records took 1.5 s on the CI machine), less than forking workers and sending each the tokenizer would save.
_AUTO_MIN_RECORDS = 16 * _WORKER_CHUNK
_AUTO_MAX_WORKERS = 8


def tokenize_worker_count(setting: int | str, records: int, *, cpus: int, local_processes: int,
                          can_fork: bool = True) -> int:
    """Processes that tokenize ``records`` records: ``data.tokenize_workers`` as set, or for ``auto`` the CPUs this
    process may use shared among the training processes of this machine (torchrun starts one per GPU), at most 8,
    where the platform can fork. One chunk or less is tokenized here whatever the setting."""
    if records <= _WORKER_CHUNK:
        return 1
    if setting != "auto":
        return int(setting)
    if records < _AUTO_MIN_RECORDS or not can_fork:
        return 1
    return max(1, min(_AUTO_MAX_WORKERS, cpus // max(1, local_processes)))


def _usable_cpus(cgroup_cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """CPUs this process may run on, and no more than a container's CPU quota (cgroup v2 ``cpu.max``) allows."""
    import math
    import os

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = cgroup_cpu_max.read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cpus


def _fork_context() -> Any:
    """Forked workers inherit the template and tokenizer without pickling them and need no ``__main__`` guard in
    the caller's script; ``None`` where the platform cannot fork (Windows)."""
    import multiprocessing

    return multiprocessing.get_context("fork") if "fork" in multiprocessing.get_all_start_methods() else None


def _tokenize_records(
    records: list[Record], template: Template, tokenizer: Any, config: DataConfig, name: str
) -> Iterator[Example | None]:
    """Examples in record order, with a progress bar; in several processes when ``data.tokenize_workers`` says so."""
    import os

    from tqdm.auto import tqdm

    context = _fork_context()
    workers = tokenize_worker_count(config.tokenize_workers, len(records), cpus=_usable_cpus(),
                                    local_processes=int(os.environ.get("LOCAL_WORLD_SIZE") or "1"),
                                    can_fork=context is not None)
    bar = tqdm(total=len(records), desc=f"tokenize {name}" + (f" ({workers} processes)" if workers > 1 else ""),
               unit="rec", mininterval=0.5, disable=len(records) < _WORKER_CHUNK)
    try:
        if workers == 1:
            for record in records:
                yield tokenize_record(record, template, tokenizer, config.cutoff_len, config.train_on)
                bar.update()
            return
        from concurrent.futures import ProcessPoolExecutor

        # The workers are forked: the Rust tokenizer's own thread pool must stay off in them (the variable is read
        # in the child), and this process's setting comes back afterwards.
        before = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        chunks = [records[i : i + _WORKER_CHUNK] for i in range(0, len(records), _WORKER_CHUNK)]
        try:
            with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                     initargs=(template, tokenizer, config.cutoff_len, config.train_on)) as pool:
                for examples in pool.map(_tokenize_chunk, chunks):
                    yield from examples
                    bar.update(len(examples))
        finally:
            if before is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = before
    finally:
        bar.close()


# State of a tokenizing worker process, set once by its initializer (the template and tokenizer are pickled once
# per worker, not once per chunk).
_WORKER: dict[str, Any] = {}


def _init_worker(template: Template, tokenizer: Any, cutoff_len: int, train_on: str) -> None:
    _WORKER.update(template=template, tokenizer=tokenizer, cutoff_len=cutoff_len, train_on=train_on)


def _tokenize_chunk(records: list[Record]) -> list[Example | None]:
    w = _WORKER
    return [tokenize_record(r, w["template"], w["tokenizer"], w["cutoff_len"], w["train_on"]) for r in records]


def write_records(path: Path, records: list[Record]) -> None:
    """JSONL in OpenAI messages format (with each record's source), readable by every tunelab command."""
    with path.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps({**record.to_json(), "source": record.source}, ensure_ascii=False) + "\n")


def write_split_files(run_dir: Path, splits: RecordSplits) -> None:
    write_records(run_dir / "test.jsonl", splits.test)
    write_records(run_dir / "validation.jsonl", splits.validation)
    if splits.rejects:
        write_rejects(run_dir / "rejects.jsonl", splits.rejects)
