"""Tokenize once: a second run with the same inputs reads the disk cache; any input that shapes tokens misses it."""

import copy
import json

import pytest

import tunelab.data.cache as cache
from conftest import arithmetic_rows, write_jsonl
from tunelab.config.load import load_config
from tunelab.data.build import load_splits, tokenize_splits
from tunelab.data.template import build_template
from tunelab.models.load import load_tokenizer


@pytest.fixture
def counted(monkeypatch):
    """Counts real tokenizations behind the cache."""
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return tokenize_splits(*args, **kwargs)

    monkeypatch.setattr(cache, "tokenize_splits", counting)
    return calls


def prepare(model, data, cache_dir, *extra):
    config = load_config(None, [f"model.name_or_path={model}", f"data.datasets=[{{path: '{data}'}}]",
                                "data.val_size=4", f"data.cache_dir={cache_dir}", *extra])
    tokenizer = load_tokenizer(config.model)
    template = build_template(config.data.template, tokenizer, config.data.custom_template)
    return load_splits(config.data), template, tokenizer, config.data


def as_plain(data):
    return {name: [(list(e.input_ids), list(e.labels), e.source, e.truncation) for e in getattr(data, name)]
            for name in ("train", "validation")}, {k: v.to_dict() for k, v in data.stats.items()}


def test_second_run_hits_and_every_input_invalidates(tiny_model, tmp_path, counted):
    data = write_jsonl(tmp_path / "arith.jsonl", arithmetic_rows(40))
    store = tmp_path / "cache"
    first, note = cache.tokenize_with_cache(*prepare(tiny_model, data, store))
    assert note.startswith("tokenized data cached in") and len(counted) == 1
    second, note = cache.tokenize_with_cache(*prepare(tiny_model, data, store))
    assert note.startswith("tokenized data cache hit") and "tokenization skipped" in note
    assert len(counted) == 1 and as_plain(second) == as_plain(first)

    for extra in (["data.template=alpaca"], ["data.cutoff_len=512"], ["data.train_on=last_turn"], ["data.seed=7"]):
        _, note = cache.tokenize_with_cache(*prepare(tiny_model, data, store, *extra))
        assert note.startswith("tokenized data cached in"), extra

    splits, template, tokenizer, config = prepare(tiny_model, data, store)
    grown = copy.deepcopy(tokenizer)
    grown.add_tokens(["<new_tool>"])
    _, note = cache.tokenize_with_cache(splits, template, grown, config)
    assert note.startswith("tokenized data cached in"), "a changed tokenizer must not hit"

    with data.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps({"instruction": "1+1", "input": "", "output": "2"}) + "\n")
    _, note = cache.tokenize_with_cache(*prepare(tiny_model, data, store))
    assert note.startswith("tokenized data cached in"), "changed data must not hit"
    assert len(counted) == 1 + 4 + 1 + 1

    _, note = cache.tokenize_with_cache(*prepare(tiny_model, data, store, "data.cache_tokenized=false"))
    assert note == "" and len(counted) == 8
    assert len([p for p in store.iterdir() if not p.name.startswith(".")]) == 7


def test_parallel_workers_tokenize_identically(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "arith.jsonl", arithmetic_rows(600))
    splits, template, tokenizer, config = prepare(tiny_model, data, tmp_path / "cache")
    one = tokenize_splits(splits, template, tokenizer, config)
    two = tokenize_splits(splits, template, tokenizer, config.model_copy(update={"tokenize_workers": 2}))
    assert len(one.train) > 512  # more than one worker chunk, so the pool really runs
    assert as_plain(one) == as_plain(two)


def test_auto_workers_start_only_for_large_data_and_share_the_cpus():
    from tunelab.data.build import tokenize_worker_count

    assert tokenize_worker_count("auto", 4095, cpus=16, local_processes=1) == 1  # small: in this process
    assert tokenize_worker_count("auto", 100_000, cpus=16, local_processes=1) == 8  # at most 8
    assert tokenize_worker_count("auto", 100_000, cpus=2, local_processes=1) == 2
    assert tokenize_worker_count("auto", 100_000, cpus=16, local_processes=8) == 2  # torchrun, 8 GPUs
    assert tokenize_worker_count("auto", 100_000, cpus=4, local_processes=8) == 1
    assert tokenize_worker_count(3, 1000, cpus=1, local_processes=1) == 3  # as set
    assert tokenize_worker_count(3, 10, cpus=1, local_processes=1) == 1  # one chunk: in this process
    assert tokenize_worker_count("auto", 100_000, cpus=16, local_processes=1, can_fork=False) == 1  # Windows


def test_tokenize_workers_accepts_auto_or_a_positive_count():
    from tunelab.errors import ConfigError

    assert load_config(None, []).data.tokenize_workers == "auto"
    assert load_config(None, ["data.tokenize_workers=4"]).data.tokenize_workers == 4
    with pytest.raises(ConfigError, match="tokenize_workers"):
        load_config(None, ["data.tokenize_workers=0"])


def test_usable_cpus_follow_a_container_quota(tmp_path):
    import os

    from tunelab.data.build import _usable_cpus

    visible = len(os.sched_getaffinity(0))
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("max 100000\n")
    assert _usable_cpus(cpu_max) == visible
    cpu_max.write_text("50000 100000\n")  # half a CPU: one worker at least
    assert _usable_cpus(cpu_max) == 1
    assert _usable_cpus(tmp_path / "missing") == visible


def test_workers_leave_the_tokenizers_setting_as_it_was(tiny_model, tmp_path, monkeypatch):
    import os

    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    data = write_jsonl(tmp_path / "arith.jsonl", arithmetic_rows(600))
    splits, template, tokenizer, config = prepare(tiny_model, data, tmp_path / "cache")
    tokenize_splits(splits, template, tokenizer, config.model_copy(update={"tokenize_workers": 2}))
    assert "TOKENIZERS_PARALLELISM" not in os.environ
