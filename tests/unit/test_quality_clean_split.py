"""``data clean`` accounts for every dropped row; ``data split`` keeps near-duplicates together and labels in
proportion; the streaming reader agrees with the training loader; the training mix hits its weights."""

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tunelab.config.schema import DatasetSpec
from tunelab.data.quality.clean import CleanOptions, clean_files, parse_flags, rejects_path
from tunelab.data.quality.splitting import assign_groups, split_files
from tunelab.data.quality.stream import iter_file
from tunelab.data.readers import Reject, load_records
from tunelab.errors import ConfigError


def write(path: Path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return str(path)


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text("utf-8").splitlines()]


def row(instruction: str, output: str) -> dict:
    return {"instruction": instruction, "output": output}


def unique_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [row(f"Question {seed}-{i}: " + " ".join(f"w{rng.randrange(10**6)}" for _ in range(8)),
                " ".join(f"a{rng.randrange(10**6)}" for _ in range(10)) + ".") for i in range(n)]


def test_streaming_reader_matches_the_training_loader(tmp_path):
    path = tmp_path / "mixed.jsonl"
    lines = ['{"instruction": "解释", "output": "好的。"}', "", "[1, 2]", '{"instruction": "x"', '{"text": "hi"}',
             '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}',
             '{"instruction": "q", "output": "   "}']
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode("utf-8") + b"\n")
    loaded = load_records(DatasetSpec(path=str(path)), "skip")
    streamed = [item for item, _ in iter_file(str(path))]
    assert [r for r in streamed if not isinstance(r, Reject)] == loaded.records
    assert [(r.source, r.reason) for r in streamed if isinstance(r, Reject)] == \
        [(r.source, r.reason) for r in loaded.rejects]
    gbk = tmp_path / "gbk.jsonl"
    gbk.write_bytes('{"instruction": "你好", "output": "世界"}\n'.encode("gbk"))
    assert [item for item, _ in iter_file(str(gbk))] == load_records(DatasetSpec(path=str(gbk)), "skip").records


def test_clean_rejects_account_for_every_dropped_row(tmp_path):
    rows = unique_rows(6, 0)
    near = dict(rows[1], output=rows[1]["output"][:-1] + "!")
    data = [*rows, rows[0], near, row("Say something", "..."), row("Tell me a story.", "I went home. " * 10),
            '{"broken', row("Is the sky green?", "yes"), row("Is the sky green?", "no"), row("hi", "ok")]
    path = write(tmp_path / "in.jsonl", data)
    out = tmp_path / "clean.jsonl"
    options = CleanOptions(dedup=True, near_dedup=True, conflicts="drop", drop_flags=("empty", "loop"),
                           min_chars=5)
    result = clean_files([path], out, options)
    kept, rejects = read(out), read(rejects_path(out))
    assert result.read == len(data) == len(kept) + len(rejects)
    assert result.kept == len(kept) == 6
    reasons = {r["source"].rsplit(":", 1)[1]: r["reason"].split(":")[0] for r in rejects}
    assert reasons == {"7": "exact_duplicate", "8": "near_duplicate", "9": "flag", "10": "flag", "11": "unreadable",
                       "12": "conflict", "13": "conflict", "14": "min_chars"}
    exact = next(r for r in rejects if r["source"].endswith(":7"))
    assert exact["reason"] == f"exact_duplicate: same prompt and answer as {path}:1"
    assert exact["raw"]["messages"][-1]["content"] == rows[0]["output"]
    assert dict(result.reasons) == {"exact_duplicate": 1, "near_duplicate": 1, "flag:empty": 1, "flag:loop": 1,
                                    "unreadable": 1, "conflict": 2, "min_chars": 1}
    assert [k["source"] for k in kept] == [f"{path}:{i}" for i in range(1, 7)]
    again = tmp_path / "again.jsonl"
    clean_files([path], again, options)
    assert again.read_bytes() == out.read_bytes()
    assert rejects_path(again).read_text("utf-8").replace("again", "clean") == rejects_path(out).read_text("utf-8")


def test_clean_needs_a_rule_and_known_flags(tmp_path):
    with pytest.raises(ConfigError, match="nothing to do"):
        clean_files([write(tmp_path / "d.jsonl", unique_rows(2, 1))], tmp_path / "o.jsonl", CleanOptions())
    with pytest.raises(ConfigError, match="--drop-flags: unknown flag 'loops'; allowed: empty, copy, loop"):
        parse_flags("empty,loops")


def test_assign_groups_keeps_groups_whole_and_strata_in_proportion():
    group = np.repeat(np.arange(50), 2)  # 50 pairs
    stratum = np.array([i % 5 == 0 for i in range(50)]).repeat(2).astype(np.uint64)  # 10 pairs label 1
    sides = assign_groups(group, stratum, n_test=20, n_val=10, seed=0)
    for g in range(50):
        assert sides[2 * g] == sides[2 * g + 1]
    assert Counter(sides.tolist()) == {0: 70, 2: 20, 1: 10}
    assert Counter(stratum[sides == 2].tolist()) == {0: 16, 1: 4}


def test_split_file_stratifies_labels_and_keeps_near_duplicates_together(tmp_path):
    rng = random.Random(5)
    rows = []
    for i in range(60):
        label = "positive" if i % 3 else "负面"
        text = " ".join(f"t{rng.randrange(10**6)}" for _ in range(12))
        rows.append(row(f"Review {i}: {text}", label))
        if i % 10 == 0:
            rows.append(row(f"Review {i}: {text}!", label))  # a near-duplicate that must stay beside it
    path = write(tmp_path / "d.jsonl", rows)
    result = split_files([path], tmp_path / "out", val_size=0.1, test_size=0.2, seed=3)
    files = {name: read(tmp_path / "out" / f"{name}.jsonl") for name in ("train", "validation", "test")}
    assert result.stratified and result.groups_kept_together == 6
    assert sum(len(f) for f in files.values()) == len(rows) == 66
    assert {name: len(f) for name, f in files.items()} == result.counts
    assert abs(len(files["test"]) - 13) <= 1 and abs(len(files["validation"]) - 5) <= 1
    for name, records in files.items():
        share = sum(r["messages"][-1]["content"] == "负面" for r in records) / len(records)
        assert abs(share - 22 / 66) < 0.12, name
    side_of = {r["messages"][0]["content"].rstrip("!"): name for name, f in files.items() for r in f}
    for name, f in files.items():
        for r in f:
            assert side_of[r["messages"][0]["content"].rstrip("!")] == name
    again = split_files([path], tmp_path / "again", val_size=0.1, test_size=0.2, seed=3)
    assert again.counts == result.counts
    assert (tmp_path / "again" / "test.jsonl").read_bytes() == (tmp_path / "out" / "test.jsonl").read_bytes()


def test_weighted_mix_shares_within_tolerance(tmp_path):
    from tunelab.config.schema import DataConfig
    from tunelab.data.build import load_splits

    task = write(tmp_path / "task.jsonl", unique_rows(300, 7))
    general = write(tmp_path / "general.jsonl", unique_rows(100, 8))
    config = DataConfig(datasets=[{"path": task}, {"path": general, "weight": 0.5}], test_size=0.1, seed=3)
    splits = load_splits(config)
    share = sum(r.source.startswith(general) for r in splits.train) / len(splits.train)
    assert abs(share - 1 / 3) < 0.01
    assert [m["share"] for m in splits.mix] == pytest.approx([2 / 3, 1 / 3], abs=0.01)


def test_majority_vote_keeps_the_most_common_answer_and_names_it(tmp_path):
    paris = "The capital of France is Paris, a city on the Seine."
    france = "What is the capital of France? Answer in one sentence."
    data = [
        row("这条评论是正面还是负面？物流很快，质量很好", "正面"),  # 1  \
        row("这条评论是正面还是负面？物流很快，质量很好", "负面"),  # 2   | 正面 wins 2 to 1
        row("这条评论是正面还是负面？物流很快，质量很好", "正面"),  # 3  /
        row(france, paris),  # 4  \
        row(france, "The capital of France is Lyon, by the Rhone."),  # 5   | Paris wins: a near-duplicate
        row(france, paris[:-1] + "!"),  # 6  /  answer is the same answer
        row("Is the sky green?", "yes"), row("Is the sky green?", "no"),  # 7, 8: a tie, both go
        *unique_rows(4, 3),
    ]
    path = write(tmp_path / "in.jsonl", data)
    out = tmp_path / "clean.jsonl"
    result = clean_files([path], out, CleanOptions(conflicts="majority"))
    rejects = {r["source"].rsplit(":", 1)[1]: r["reason"] for r in read(rejects_path(out))}
    assert rejects == {
        "2": f"conflict_minority: 3 records with the same or a near-same prompt have 2 different answers; the "
             f"majority answer (2 of 3 records) is kept, first at {path}:1: '正面'",
        "5": f"conflict_minority: 3 records with the same or a near-same prompt have 2 different answers; the "
             f"majority answer (2 of 3 records) is kept, first at {path}:4: {paris!r}",
        "7": "conflict: 2 records with the same or a near-same prompt have 2 different answers; the most common "
             "answers tie (1 records each), so none is kept",
        "8": "conflict: 2 records with the same or a near-same prompt have 2 different answers; the most common "
             "answers tie (1 records each), so none is kept",
    }
    assert dict(result.reasons) == {"conflict_minority": 2, "conflict": 2}
    assert [k["source"].rsplit(":", 1)[1] for k in read(out)] == ["1", "3", "4", "6", "9", "10", "11", "12"]
    dropped_all = tmp_path / "all.jsonl"
    assert clean_files([path], dropped_all, CleanOptions(conflicts="drop")).reasons == {"conflict": 8}


def test_majority_vote_names_the_kept_answer_when_an_outvoted_record_comes_first(tmp_path):
    data = [row("北京是哪个国家的首都？", "日本"), row("北京是哪个国家的首都？", "中国"),
            row("北京是哪个国家的首都？", "中国"), *unique_rows(3, 5)]
    path = write(tmp_path / "in.jsonl", data)
    out = tmp_path / "clean.jsonl"
    result = clean_files([path], out, CleanOptions(conflicts="majority"))
    rejects = read(rejects_path(out))
    assert [r["source"] for r in rejects] == [f"{path}:1"]
    assert rejects[0]["reason"].endswith(f"is kept, first at {path}:2: '中国'")
    assert result.kept == 5 and dict(result.reasons) == {"conflict_minority": 1}


def test_clean_and_split_read_a_config_with_its_formats(tmp_path):
    from tunelab.data.quality.stream import read_inputs

    jsonl = write(tmp_path / "a.jsonl", unique_rows(10, 4))
    csv = tmp_path / "b.data"  # a CSV whose name does not say so: the config's format must be used
    csv.write_text("instruction,output\n" + "".join(f"Q{i} x y z,A{i} p q r\n" for i in range(6)), "utf-8")
    csv = csv.rename(tmp_path / "b.csv")
    config = tmp_path / "c.yaml"
    config.write_text(f"data: {{datasets: [{{path: '{jsonl}', format: alpaca}}, {{path: '{csv}', weight: 3}}], "
                      "test_size: 4}\n", "utf-8")
    sources, loaded = read_inputs([str(config), "data.seed=9"])
    assert [(s.path, s.format) for s in sources] == [(jsonl, "alpaca"), (str(csv), "auto")]
    assert loaded.data.seed == 9
    result = clean_files(sources, tmp_path / "clean.jsonl", CleanOptions(dedup=True))
    assert (result.read, result.kept) == (16, 16)
    split = split_files(sources, tmp_path / "split", val_size=0, test_size=loaded.data.test_size, seed=9)
    assert split.counts == {"train": 12, "validation": 0, "test": 4}


def test_sampling_is_stated_with_or_without_replacement():
    from tunelab.data.split import sample_sources

    samples, rng = sample_sources([100, 40, 10], [1.0, 0.1, 0.4], seed=0)  # targets: 150 x 1/1.5, 0.1/1.5, 0.4/1.5
    assert rng is not None and [s.count for s in samples] == [100, 10, 40]
    assert [s.describe() for s in samples] == [
        "no sampling: every record once",
        "without replacement: 10 of 40 records",
        "with replacement (records repeat): every record 4x",
    ]
    assert [s.with_replacement for s in samples] == [False, False, True]
    samples, rng = sample_sources([30, 20], [1.0, 2.0], seed=0)
    assert rng is not None and samples[1].describe() == \
        "with replacement (records repeat): every record 1x, plus 13 of 20 drawn without replacement"
    assert sample_sources([3, 4], [1.0, 1.0], seed=0)[1] is None  # every weight 1: concatenated, no shuffle
    # equal weights other than 1 are equal shares (they used to mean "concatenate", unlike 1 and 1.01)
    assert [s.count for s in sample_sources([100, 10], [2.0, 2.0], seed=0)[0]] == [55, 55]
    assert [s.count for s in sample_sources([100, 10], [1.0, 1.01], seed=0)[0]] == [55, 55]
