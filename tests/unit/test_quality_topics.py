"""Content diversity by topic clustering: crafted zh/en corpora with known topics, and the score's two extremes."""

import json
import random
from collections import Counter
from pathlib import Path

import pytest

from tunelab.data.quality import topics
from tunelab.data.quality.report import ReportSettings, build_report, open_input
from tunelab.data.quality.text import normalized

COOKING = ["recipe", "oven", "bake", "flour", "sugar", "butter", "dough", "garlic", "onion", "simmer",
           "boil", "pan", "salt", "pepper", "sauce", "chicken", "roast", "knife", "slice", "cream"]
CODE = ["python", "function", "variable", "loop", "compile", "debug", "class", "method", "array", "string",
        "integer", "return", "import", "module", "syntax", "error", "list", "dictionary"]
FOOTBALL = ["足球", "比赛", "球队", "进球", "射门", "门将", "教练",
            "联赛", "冠军", "球员", "点球", "中场", "后卫", "球迷"]
FILLER = ["the", "a", "is", "of", "and", "to", "in", "it", "this", "that", "with", "for", "on"]


def three_topics(n_each: int, seed: int) -> tuple[list[dict], list[int]]:
    """English cooking, English programming and Chinese football records, interleaved; and each one's topic."""
    rng = random.Random(seed)
    rows, truth = [], []
    for i in range(3 * n_each):
        topic = i % 3
        if topic == 2:
            words = ["".join(rng.choice(FOOTBALL) for _ in range(3)) for _ in range(6)]
            rows.append({"instruction": f"第{i}题：" + "，".join(words[:2]) + "？",
                         "output": "，".join(words[2:]) + "。"})
        else:
            vocabulary = (COOKING, CODE)[topic] + FILLER
            words = [rng.choice(vocabulary) for _ in range(30)]
            rows.append({"instruction": f"Question {i}: " + " ".join(words[:8]) + "?",
                         "output": " ".join(words[8:]).capitalize() + "."})
        truth.append(topic)
    return rows, truth


def texts_of(rows: list[dict]) -> list[str]:
    return [normalized(r["instruction"] + "\n" + r["output"]) for r in rows]


def test_terms_are_english_words_and_chinese_bigrams_without_function_words():
    assert topics.topic_terms(normalized("Bake the bread in an oven")) == ["bake", "bread", "oven"]
    # 的 and 了 never enter a bigram; the runs either side of them still give theirs.
    assert topics.topic_terms("我们喜欢的足球比赛结束了") == ["喜欢", "足球", "球比", "比赛", "赛结", "结束"]
    assert topics.topic_terms("用python写冒泡排序") == ["python", "写冒", "冒泡", "泡排", "排序"]


def test_three_clear_topics_in_two_languages_are_recovered_exactly():
    rows, truth = three_topics(30, seed=1)
    found = topics.find_topics(texts_of(rows), seed=0)
    assert found is not None and found.structured and found.k == 3
    assert found.sizes == [30, 30, 30]
    # Every cluster is exactly one topic: the (topic, cluster) pairs form a one-to-one map.
    pairs = Counter(zip(truth, found.labels.tolist(), strict=True))
    assert sorted(pairs.values()) == [30, 30, 30] and len({c for _, c in pairs}) == 3
    cluster_of = {t: c for t, c in pairs}
    assert set(found.terms[cluster_of[0]]) <= set(COOKING)
    assert set(found.terms[cluster_of[1]]) <= set(CODE)
    assert all(len(term) == 2 for term in found.terms[cluster_of[2]]) and "足球" in found.terms[cluster_of[2]]
    for cluster, examples in enumerate(found.examples):
        assert len(examples) == 3 and all(found.labels[e] == cluster for e in examples)


def test_topics_are_deterministic_for_a_seed():
    rows, _ = three_topics(40, seed=2)
    texts = texts_of(rows)
    first, again = topics.find_topics(texts, seed=5), topics.find_topics(texts, seed=5)
    assert first is not None and again is not None
    assert first.labels.tolist() == again.labels.tolist() and first.terms == again.terms
    assert first.silhouettes == again.silhouettes
    assert topics.sample_indices(100_000, 7) == topics.sample_indices(100_000, 7)
    assert topics.sample_indices(100_000, 7) != topics.sample_indices(100_000, 8)
    assert len(topics.sample_indices(100_000, 7)) == topics.SAMPLE and topics.sample_indices(5, 7) == [0, 1, 2, 3, 4]


def test_one_topic_scores_zero_and_unrelated_records_score_near_one():
    rng = random.Random(3)
    one = [" ".join(rng.choice(COOKING) for _ in range(40)) for _ in range(300)]
    found = topics.find_topics(one, seed=0)
    # k-means cuts it in parts (k >= 2 always); their centroids point the same way, so they merge back into one.
    assert found is not None and found.k == 1 and found.sizes == [300] and found.cohesion > 0.5
    assert found.summary(list(range(300)), 300, 0)["score"] == 0.0
    vocabulary = [f"w{i}x" for i in range(3000)]
    scattered = [" ".join(rng.choice(vocabulary) for _ in range(60)) for _ in range(2000)]
    found = topics.find_topics(scattered, seed=0)
    assert found is not None and (found.k, found.structured) == (topics.K_MAX, False) and found.cohesion < 0.1
    assert found.summary(list(range(2000)), 2000, 0)["score"] > 0.95
    assert topics.find_topics(["too few"] * 4, seed=0) is None


def test_report_shows_topics_with_what_they_are_computed_from(tmp_path: Path):
    rows, truth = three_topics(20, seed=4)
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    stream, config = open_input([str(path)])
    report = build_report(stream, ReportSettings(seed=3), config)
    block = report["diversity"]["topics"]
    assert block["kind"] == "content" and (block["k"], block["sampled"], block["seed"]) == (3, 60, 3)
    assert block["score"] == pytest.approx(1.0986 / 2.9957, abs=1e-3)  # log 3 / log 20: three even topics
    assert "entropy of topic-cluster sizes / log(20)" in block["computed_from"]
    for cluster in block["clusters"]:
        lines = {int(e["source"].rsplit(":", 1)[1]) - 1 for e in cluster["examples"]}
        assert len({truth[i] for i in lines}) == 1  # a cluster's examples are all on one topic
    from tunelab.data.quality.render import render_markdown

    markdown = render_markdown(report)
    assert "Topics (content): 3 clusters of 60 records" in markdown and "| topics | content |" in markdown
