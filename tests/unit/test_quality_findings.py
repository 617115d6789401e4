"""Corpus-level findings of ``tunelab data report`` on small crafted files, with the exact expected results."""

import json
import random
from pathlib import Path

import pytest

from tunelab.data.quality.diversity import DistinctCounter
from tunelab.data.quality.report import ReportSettings, build_report, open_input


def write(path: Path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return str(path)


def row(instruction: str, output: str, **extra) -> dict:
    return {"instruction": instruction, "output": output, **extra}


def filler(n: int, seed: int) -> list[dict]:
    """Distinct records that match nothing else: random Chinese and English text."""
    rng = random.Random(seed)
    hanzi = (
        "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都"
        "两体制机当使点从业本去把性好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第向道命此变条只没结解问意建月公无系军很情者最立代想"
        "已通并提直题党程展五果料象员革位入常文总次品式活设及管特件长求老头基资边流路级少图山统接知较将组见计别她手角期根论运农指几九区强放决西被干做必战先回则任取据处理府研质"
    )
    out = []
    for i in range(n):
        if i % 2:
            text = "".join(rng.choice(hanzi) for _ in range(60))
            out.append(row(f"第{i}题：{text[:20]}", text[20:] + "。"))
        else:
            words = " ".join(f"w{rng.randrange(10**6)}" for _ in range(20))
            out.append(row(f"Question {i}: {words[:60]}", words[60:] + "."))
    return out


def report_of(*files: str, **settings) -> dict:
    stream, config = open_input(list(files))
    return build_report(stream, ReportSettings(**settings), config)


def sources(examples: list[dict]) -> list[str]:
    return [e["source"] for e in examples]


def shingles(text: str) -> set[str]:
    return {text[i : i + 3] for i in range(len(text) - 2)}


def test_inventory_counts_records_bad_rows_and_languages(tmp_path):
    path = write(tmp_path / "data.jsonl", [
        row("解释光合作用", "光合作用把光能转化为化学能。"),
        row("Explain gravity", "Gravity pulls masses together."),
        '{"instruction": "broken"',
        row("Say hi", ""),
        row("你好", "Hello!"),
    ])
    report = report_of(path)
    files = report["inventory"]["files"]
    assert [(f["records"], f["rejected"], f["format"], f["split"]) for f in files] == [(3, 2, "alpaca", "train")]
    assert files[0]["reject_examples"] == [
        {"source": f"{path}:3", "reason": "-: invalid JSON: Expecting ',' delimiter (column 25)"},
        {"source": f"{path}:4", "reason": "output: empty answer"},
    ]
    assert report["inventory"]["languages"]["prompt"] == {"zh": 2, "en": 1}
    assert report["inventory"]["languages"]["answer"] == {"zh": 1, "en": 2}


def test_exact_duplicates_fold_case_width_and_whitespace(tmp_path):
    rows = [row("Hello World", "Hi there."), row("hello   world", "HI THERE."), row("ＨＥＬＬＯ world", "hi there."),
            row("Hello World", "Something else entirely, not a copy."), *filler(6, 0)]
    report = report_of(write(tmp_path / "d.jsonl", rows))
    exact = report["duplicates"]["exact"]
    assert (exact["groups"], exact["records"], exact["removable"]) == (1, 3, 2)
    assert [e["source"].rsplit(":", 1)[1] for e in exact["examples"][0]] == ["1", "2", "3"]


def test_near_duplicate_threshold(tmp_path):
    rng = random.Random(3)
    base = "".join(chr(0x4E00 + rng.randrange(2000)) for _ in range(200))
    close = base[:100] + "变" + base[101:]  # one character changed: Jaccard ~0.97
    far = base[:100] + "".join(chr(0x4E00 + rng.randrange(2000)) for _ in range(100))  # Jaccard ~0.33
    assert len(shingles(base) & shingles(close)) / len(shingles(base) | shingles(close)) > 0.95
    assert 0.25 < len(shingles(base) & shingles(far)) / len(shingles(base) | shingles(far)) < 0.4
    path = write(tmp_path / "d.jsonl", [row("写一段话", base), row("写一段话", close), row("写一段话", far),
                                        *filler(6, 1)])
    strict = report_of(path, near_dup_threshold=0.8)["duplicates"]["near"]
    assert (strict["clusters"], strict["records"]) == (1, 2)
    assert sources(strict["examples"][0]) == [f"{path}:1", f"{path}:2"]
    loose = report_of(path, near_dup_threshold=0.2)["duplicates"]["near"]
    assert (loose["clusters"], loose["records"]) == (1, 3)
    assert report_of(path, near_dup_threshold=1.0)["duplicates"]["near"]["clusters"] == 0


def test_leakage_across_files_named_by_split(tmp_path):
    shared = row("Summarize the plot of Hamlet in two sentences please.",
                 "A prince avenges his father's murder by his uncle. Almost everyone dies.")
    near = row("Summarize the plot of Hamlet in two sentences, please.",
               "A prince avenges his father's murder by his uncle. Almost everyone dies.")
    train = write(tmp_path / "train.jsonl", [shared, *filler(8, 2)])
    test = write(tmp_path / "test.jsonl", [near, *filler(3, 3)[1:]])
    leak = report_of(train, test)["leakage"]
    assert leak["checked"] and (leak["leaked"], leak["held_out_records"]) == (1, 3)
    assert leak["by_split"] == {"validation": 0, "test": 1}
    assert leak["examples"][0]["held_out"]["source"] == f"{test}:1"
    assert leak["examples"][0]["train"]["source"] == f"{train}:1"
    assert report_of(train)["leakage"]["checked"] is False


def test_leakage_uses_the_config_split(tmp_path):
    rows = filler(40, 4)
    rows += [dict(r) for r in rows[:10]]  # ten exact copies: some land on both sides of the split
    data = write(tmp_path / "d.jsonl", rows)
    config = tmp_path / "c.yaml"
    config.write_text(f"data: {{datasets: [{{path: '{data}'}}], test_size: 10, seed: 1}}\n", "utf-8")
    report = report_of(str(config))
    from tunelab.config.load import load_config
    from tunelab.data.build import load_splits

    splits = load_splits(load_config(str(config), []).data)
    train_keys = {json.dumps(r.to_messages()) for r in splits.train}
    expected = sum(json.dumps(r.to_messages()) in train_keys for r in splits.test)
    assert expected > 0
    assert report["inventory"]["splits"] == {"train": 40, "test": 10}
    assert report["leakage"]["leaked"] == expected
    assert report["mix"][0]["sampling"] == "no sampling: every record once"
    assert report["mix"][0]["replacement"] is False


def test_conflicting_labels_and_answers(tmp_path):
    rows = [
        row("这条评论是正面还是负面？物流很快，质量很好", "正面"),
        row("这条评论是正面还是负面？物流很快，质量很好", "负面"),
        row("Is this review positive or negative? Arrived broken.", "negative"),
        row("Is this review positive or negative? Arrived broken!", "positive"),  # near-same prompt
        row("Tell me a fact about the moon.", "The Moon is about 384,000 km from Earth."),
        row("Tell me a fact about the moon.", "The Moon is about 384,400 km from Earth."),  # near-same answer
        row("What is 0 plus 0?", "0"), row("What is 0 plus 3?", "3"),  # similar shingles, short: not the same
        *[row(f"评论{i}：还行", "正面" if i % 2 else "负面") for i in range(6)],
        *[row(f"Review {i}: fine", "positive" if i % 2 else "negative") for i in range(6)],
    ]
    report = report_of(write(tmp_path / "d.jsonl", rows))
    conflicts = report["conflicts"]
    assert (conflicts["groups"], conflicts["records"], conflicts["label_groups"]) == (2, 4, 2)
    lines = sorted(e["source"].rsplit(":", 1)[1] for g in conflicts["examples"] for e in g["records"])
    assert lines == ["1", "2", "3", "4"]


def test_label_set_and_imbalance(tmp_path):
    rows = [row(f"Review {i}: text number {i}", "positive") for i in range(12)]
    rows += [row(f"评论 {i}：第{i}条", "负面") for i in range(2)]
    rows += [row("Explain tides in one paragraph.", "Tides are caused mainly by the Moon's gravity pulling on the "
                 "oceans, with the Sun adding a smaller effect.")]
    labels = report_of(write(tmp_path / "d.jsonl", rows))["labels"]
    assert labels["labels"] == {"positive": 12, "负面": 2}
    assert labels["imbalance_ratio"] == 6.0 and labels["imbalanced"] is True
    balanced = [row(f"Review {i}: text {i}", "positive" if i % 2 else "negative") for i in range(10)]
    assert report_of(write(tmp_path / "b.jsonl", balanced))["labels"]["imbalanced"] is False
    assert report_of(write(tmp_path / "t.jsonl", filler(10, 5)))["labels"] is None


def test_flag_examples_point_at_the_flagged_records(tmp_path):
    rows = [row("Tell me a story.", "Once upon a time. " * 6), row("讲个故事", "从前有座山，山里有座庙。" * 5),
            row("你是谁", "作为一个AI语言模型，我无法回答。"), *filler(4, 6)]
    path = write(tmp_path / "d.jsonl", rows)
    flags = report_of(path)["flags"]
    assert {name: f["count"] for name, f in flags.items() if f["count"]} == {"loop": 2, "refusal": 1}
    assert sources(flags["loop"]["examples"]) == [f"{path}:1", f"{path}:2"]


def test_diversity_scores_name_their_inputs(tmp_path):
    rows = [row("Explain A B", "x y."), row("Explain A C", "x z."), row("Write A B", "x y."), row("解释一下", "好的。")]
    diversity = report_of(write(tmp_path / "d.jsonl", rows))["diversity"]
    # instruction bigrams: explain-a, a-b, explain-a, a-c, write-a, a-b, 解-释, 释-一, 一-下 -> 7 distinct of 9
    assert diversity["instructions"]["distinct_2"] == pytest.approx(7 / 9, abs=1e-4)
    assert diversity["task_types"]["top"][:2] == [{"word": "explain", "count": 2}, {"word": "write", "count": 1}]
    assert all(d["computed_from"] for d in diversity.values())


def test_distinct_counter_is_exact_when_small_and_close_when_large():
    import numpy as np

    small = DistinctCounter(k=100)
    small.add(np.array([1, 2, 2, 3], dtype=np.uint64))
    assert (small.distinct, small.total, small.ratio) == (3.0, 4, 0.75)
    large = DistinctCounter(k=4096)
    rng = np.random.default_rng(0)
    values = rng.integers(0, 2**63, size=50_000, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    for chunk in np.array_split(np.concatenate([values, values[:20_000]]), 13):
        large.add(chunk)
    assert large.saturated and abs(large.distinct / 50_000 - 1) < 0.05


def test_token_lengths_match_training_tokenization(tmp_path, tiny_model):
    from transformers import AutoTokenizer

    from tunelab.config.schema import DatasetSpec
    from tunelab.data.readers import load_records
    from tunelab.data.template import build_template
    from tunelab.data.tokenize import tokenize_record

    rows = [row("加 " * n, "答 " * n) for n in (2, 5, 40, 80)]
    path = write(tmp_path / "d.jsonl", rows)
    tokens = report_of(path, model=str(tiny_model), cutoff_len=64)["lengths"]["tokens"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    template = build_template(None, tokenizer)
    records = load_records(DatasetSpec(path=path), "error").records
    full = [tokenize_record(r, template, tokenizer, 10**9) for r in records]
    cut = [tokenize_record(r, template, tokenizer, 64) for r in records]
    lost = sum(f.supervised_tokens - (c.supervised_tokens if c else 0) for f, c in zip(full, cut, strict=True))
    assert tokens["truncated"] == sum(len(f.input_ids) > 64 for f in full) == 2
    assert tokens["supervised_tokens_lost"] == lost > 0
    assert tokens["longest"][0]["source"] == f"{path}:4"


def test_a_chain_of_small_answer_edits_is_one_answer_not_a_conflict(tmp_path):
    from tunelab.data.quality.minhash import Permutations, signatures, similarity

    a = "the quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat today"
    b = a.replace("brown", "brawn")
    c = b.replace("warm", "worm")
    sig = signatures([a, b, c], Permutations.make())
    # The premise: at 0.86, a~b and b~c, but a and c alone would look different.
    assert similarity(sig[0], sig[1]) >= 0.86 and similarity(sig[1], sig[2]) >= 0.86 > similarity(sig[0], sig[2])
    prompt = "Rewrite this sentence about the fox and the cat, please."
    path = write(tmp_path / "d.jsonl", [row(prompt, a), row(prompt, c), row(prompt, b), *filler(4, 9)])
    assert report_of(path, near_dup_threshold=0.86)["conflicts"]["groups"] == 0
    assert report_of(path, near_dup_threshold=0.95)["conflicts"]["groups"] == 1
