"""Choosing metrics per sample, and the summary the evaluation runner writes."""

import json

import pytest

from tunelab.evaluate.metrics import EmbeddingScorer, answer_kind, infer_label_set, score_samples, summarize

MIXED_REFS = [
    '{"intent": "add_to_cart", "params": {"product": "卫衣", "size": "L"}}',
    '```json\n{"name": "张三", "age": 30}\n```',
    "正面",
    "负面",
    "正面",
    "负面",
    "今天天气不错",
    "The cat sat on the mat.",
]
MIXED_PREDS = [
    '好的：{"name": "add_to_cart", "arguments": "{\\"size\\": \\"l\\", \\"product\\": \\"卫衣\\"}"}',
    '{"name": "张三", "age": "31"}',
    "正面",
    "正面",
    " 正面",
    "负面",
    "今天天气很好",
    "the cat sat",
]


# --- label sets and kinds ------------------------------------------------------------------------------------------


def test_label_set_is_short_repeated_answers_normalised():
    refs = ["Positive", "positive ", "负面", "负面", "中性", "a long free-text answer " * 3, '{"a": 1}', '{"a": 1}']
    assert infer_label_set(refs) == {"positive", "负面"}
    assert infer_label_set(refs, min_repeats=1) == {"positive", "负面", "中性"}


def test_too_many_distinct_short_answers_are_not_labels():
    refs = [f"答案{i}" for i in range(21)] * 2
    assert infer_label_set(refs) == set()
    assert len(infer_label_set(refs, max_labels=21)) == 21


def test_multi_line_answers_are_never_labels():
    assert infer_label_set(["是\n否", "是\n否"]) == set()


@pytest.mark.parametrize(
    ("ref", "label_set", "kind"),
    [
        ('{"intent": "x", "params": {}}', {"x"}, "json"),
        ("[1, 2]", None, "json"),
        ('```json\n{"a": 1}\n```', None, "json"),
        ('see {"a": 1}', None, "text"),  # a reference must be JSON as a whole
        ("Positive", {"positive"}, "label"),
        ("ＰＯＳＩＴＩＶＥ", {"Positive"}, "label"),
        ("Positive", None, "text"),
        ("北京是中国的首都。", {"positive"}, "text"),
    ],
)
def test_answer_kind(ref, label_set, kind):
    assert answer_kind(ref, label_set) == kind


# --- per-sample scores ---------------------------------------------------------------------------------------------


def test_each_kind_gets_its_metrics():
    samples = score_samples(MIXED_PREDS, MIXED_REFS)
    assert [s.kind for s in samples] == ["json", "json", "label", "label", "label", "label", "text", "text"]
    assert samples[0].scores == {"exact_match": 0.0, "json_valid": 1.0, "intent_correct": 1.0, "param_f1": 1.0}
    # age 31 vs 30: tp 1 (name), fp 1, fn 1 -> F1 = 2 / 4; no intent in a plain object
    assert samples[1].scores == {"exact_match": 0.0, "json_valid": 1.0, "param_f1": 0.5}
    assert samples[4].scores == {"exact_match": 1.0, "correct": 1.0}
    assert samples[3].scores == {"exact_match": 0.0, "correct": 0.0}
    assert set(samples[6].scores) == {"exact_match", "rouge1", "rouge2", "rougeL", "bleu"}
    assert samples[6].scores["rouge2"] == pytest.approx(3 / 5)  # see test_metrics_text
    assert samples[7].scores["rouge1"] == pytest.approx(2 / 3)


def test_an_explicit_empty_label_set_turns_labels_into_text():
    samples = score_samples(["正面", "负面"], ["正面", "正面"], label_set=set())
    assert {s.kind for s in samples} == {"text"}


def test_exact_match_options_are_passed_through():
    assert score_samples(["Ｙes"], ["yes"], label_set=set())[0].scores["exact_match"] == 1.0
    assert score_samples(["Ｙes"], ["yes"], label_set=set(), width=False)[0].scores["exact_match"] == 0.0


def test_embedder_adds_cosine_to_text_samples_only():
    seen = []

    def encode(texts):
        seen.extend(texts)
        return [[1.0, 0.0] for _ in texts]

    samples = score_samples(MIXED_PREDS, MIXED_REFS, embedder=EmbeddingScorer(encode))
    assert [s.scores.get("embedding_cosine") for s in samples] == [None] * 6 + [1.0, 1.0]
    assert seen == ["今天天气很好", "the cat sat", "今天天气不错", "The cat sat on the mat."]


def test_lengths_must_match():
    with pytest.raises(ValueError, match="1 predictions for 2 references"):
        score_samples(["a"], ["a", "b"])


# --- summary -------------------------------------------------------------------------------------------------------


def test_summary_of_a_mixed_test_set():
    samples = score_samples(MIXED_PREDS, MIXED_REFS)
    summary = summarize(samples, MIXED_PREDS, MIXED_REFS)
    json.dumps(summary, allow_nan=False)
    assert list(summary) == ["overall", "groups"]
    assert list(summary["groups"]) == ["json", "label", "text"]

    overall = summary["overall"]
    assert overall["n"] == 8
    assert overall["exact_match"] == pytest.approx(3 / 8)  # 正面, 正面 (stripped), 负面
    assert overall["json_valid"] == 1.0 and overall["correct"] == 0.75
    assert overall["intent_correct"] == 1.0  # only the tool call has an intent
    assert set(overall["ci95"]) == set(overall) - {"n", "ci95"}

    json_group = summary["groups"]["json"]
    assert json_group["n"] == 2
    assert json_group["param_f1"] == pytest.approx((1.0 + 0.5) / 2)  # mean of per-sample F1
    tool_calls = json_group["tool_calls"]
    assert tool_calls["param_f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))  # micro: tp 3, fp 1, fn 1
    assert tool_calls["per_field"]["age"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}

    label_group = summary["groups"]["label"]
    assert (label_group["n"], label_group["correct"]) == (4, 0.75)
    assert label_group["classification"]["confusion"] == {"labels": ["正面", "负面"], "matrix": [[2, 0], [1, 1]]}
    assert "rouge1" not in label_group

    text_group = summary["groups"]["text"]
    assert set(text_group) == {"n", "exact_match", "rouge1", "rouge2", "rougeL", "bleu", "ci95", "corpus_bleu"}
    assert text_group["bleu"] == pytest.approx(((2 / 15) ** 0.25 + 1 / 2.718281828459045) / 2)


def test_summary_omits_absent_kinds_and_checks_lengths():
    samples = score_samples(["a"], ["a"], label_set=set())
    assert list(summarize(samples, ["a"], ["a"])["groups"]) == ["text"]
    with pytest.raises(ValueError, match="1 scored samples for 2 references"):
        summarize(samples, ["a", "b"], ["a", "b"])


def test_forced_kind_and_strict_exact_match():
    from tunelab.evaluate.metrics.score import scoring_options

    preds, refs = ["Positive ", "{\"a\": 1}"], ["positive", "{\"a\": 1}"]
    auto = score_samples(preds, refs)
    assert [s.kind for s in auto] == ["text", "json"]
    forced = score_samples(preds, refs, kind="text")
    assert [s.kind for s in forced] == ["text", "text"]
    strict = scoring_options("auto", "strict")
    loose = score_samples(preds, refs, label_set=set())
    tight = score_samples(preds, refs, label_set=set(), whitespace=strict.whitespace, case=strict.case,
                          width=strict.width)
    assert loose[0].scores["exact_match"] == 1.0 and tight[0].scores["exact_match"] == 0.0
