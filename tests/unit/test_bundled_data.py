"""Checks of the bundled datasets in ``src/tunelab/resources`` and of their generator script."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from collections import Counter
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RESOURCES = REPO / "src" / "tunelab" / "resources"
SCRIPT = REPO / "scripts" / "make_bundled_data.py"

CJK = re.compile(r"[\u4e00-\u9fff]")
ALLOWED_INTENTS = {"add_to_cart", "check_stock", "query_price", "apply_coupon", "track_order", "ask_shipping"}
PARAM_KEYS = {  # intent -> (required keys, optional keys)
    "add_to_cart": ({"product", "color", "size", "quantity"}, set()),
    "check_stock": ({"product"}, {"color", "size"}),
    "query_price": ({"product"}, set()),
    "apply_coupon": ({"code"}, set()),
    "track_order": ({"order_id"}, set()),
    "ask_shipping": ({"city"}, set()),
}
ZH_QTY = {1: "一", 2: "两", 3: "三", 4: "四", 5: "五"}
EN_QTY = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
PROBE_CATEGORIES = {"arithmetic", "reading", "commonsense", "string", "multiple_choice", "logic"}


@cache
def generator():
    spec = importlib.util.spec_from_file_location("make_bundled_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("make_bundled_data", module)
    spec.loader.exec_module(module)
    return module


@cache
def read_jsonl(name: str) -> tuple[dict, ...]:
    lines = (RESOURCES / name).read_text(encoding="utf-8").splitlines()
    assert lines, name
    return tuple(json.loads(line) for line in lines)


def demo() -> tuple[dict, ...]:
    return read_jsonl("demo_sft.jsonl")


def probe() -> tuple[dict, ...]:
    return read_jsonl("general_probe.jsonl")


def user_of(record: dict) -> str:
    return next(m["content"] for m in record["messages"] if m["role"] == "user")


def answer_of(record: dict) -> str:
    return record["messages"][-1]["content"]


def is_tool(record: dict) -> bool:
    return record["messages"][0]["role"] == "system"


def has_chinese(record: dict) -> bool:
    return any(CJK.search(m["content"]) for m in record["messages"] if m["role"] != "system")


# ----------------------------------------------------------------------------------------------
# Generator
# ----------------------------------------------------------------------------------------------


def test_generator_is_deterministic_and_matches_committed_files():
    gen = generator()
    first, second = gen.generate(), gen.generate()
    assert first == second
    assert set(first) == {"demo_sft.jsonl", "demo_corpus.txt", "general_probe.jsonl"}
    for name, content in first.items():
        committed = (RESOURCES / name).read_bytes()
        assert committed == content.encode("utf-8"), f"{name} is stale: run python scripts/make_bundled_data.py"


def test_generator_depends_on_seed():
    gen = generator()
    assert gen.generate(gen.SEED + 1)["demo_sft.jsonl"] != gen.generate()["demo_sft.jsonl"]


# ----------------------------------------------------------------------------------------------
# demo_sft.jsonl
# ----------------------------------------------------------------------------------------------


def test_demo_structure():
    records = demo()
    assert 750 <= len(records) <= 850
    for rec in records:
        assert set(rec) == {"messages"}
        roles = [m["role"] for m in rec["messages"]]
        assert roles in (["system", "user", "assistant"], ["user", "assistant"]), roles
        for m in rec["messages"]:
            assert set(m) == {"role", "content"}
            assert isinstance(m["content"], str) and m["content"].strip() == m["content"] and m["content"]


def test_demo_user_messages_are_unique():
    users = [user_of(r) for r in demo()]
    assert len(users) == len(set(users))


def test_demo_mix_and_languages():
    records = demo()
    tool = [r for r in records if is_tool(r)]
    assert 0.65 <= len(tool) / len(records) <= 0.75
    assert len({r["messages"][0]["content"] for r in tool}) == 1, "one system prompt for all tool records"
    assert sum(has_chinese(r) for r in records) / len(records) >= 0.30
    tool_zh = sum(has_chinese(r) for r in tool) / len(tool)
    assert 0.55 <= tool_zh <= 0.75
    intents = Counter(json.loads(answer_of(r))["intent"] for r in tool)
    assert set(intents) == ALLOWED_INTENTS
    assert min(intents.values()) >= 0.1 * len(tool)


def test_tool_call_answers():
    for rec in filter(is_tool, demo()):
        user, answer = user_of(rec), answer_of(rec)
        call = json.loads(answer)
        assert set(call) == {"intent", "params"}
        assert call["intent"] in ALLOWED_INTENTS
        # compact, sorted keys, raw UTF-8
        assert answer == json.dumps(call, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
        required, optional = PARAM_KEYS[call["intent"]]
        keys = set(call["params"])
        assert required <= keys <= required | optional, (user, answer)
        for key, value in call["params"].items():
            if key == "quantity":
                assert type(value) is int and 1 <= value <= 5
                spelled = (str(value), ZH_QTY[value]) if has_chinese(rec) else (str(value), EN_QTY[value])
                assert any(s in user for s in spelled), (user, answer)
            else:
                assert isinstance(value, str) and value in user, (user, answer)
        if call["intent"] == "track_order":
            assert re.fullmatch(r"\d{6}", call["params"]["order_id"])
        if "size" in keys:
            assert call["params"]["size"] in {"S", "M", "L", "XL"}
        # Values are in the language of the request.
        if "product" in keys and not has_chinese(rec):
            assert not CJK.search(answer)
        assert len(answer) <= 100


def test_other_task_answers_are_short_labels_or_numbers():
    others = [r for r in demo() if not is_tool(r)]
    assert others
    for rec in others:
        user, answer = user_of(rec), answer_of(rec)
        assert len(answer) < 80
        if user.startswith(("判断评论的情感", "Classify the sentiment")):
            assert answer in {"positive", "negative"}
        elif user.startswith(("商品分类", "Classify the product")):
            assert answer in {"clothing", "shoes", "electronics", "beauty", "food", "home"}
        elif user.startswith(("提取", "Extract")):
            assert answer in user
        else:
            assert re.fullmatch(r"\d+", answer), (user, answer)


def test_demo_shop_math_is_correct():
    checked = 0
    for rec in demo():
        user, answer = user_of(rec), int(answer_of(rec)) if answer_of(rec).isdigit() else None
        if answer is None or is_tool(rec) or user.startswith(("提取", "Extract")):
            continue
        if m := re.search(r"单价(\d+)元，买(\d+)件|costs (\d+) dollars\. How much do (\d+)", user):
            a, b = (int(x) for x in m.groups() if x)
            assert answer == a * b
        elif m := re.search(r"(\d+)元，满减(\d+)元|is (\d+) dollars with (\d+) dollars off", user):
            a, b = (int(x) for x in m.groups() if x)
            assert answer == a - b
        elif m := re.search(r"(\d+)千克|in (\d+) kilograms", user):
            assert answer == 1000 * int(next(x for x in m.groups() if x))
        elif m := re.search(r"原价(\d+)元，打(\d)折", user):
            assert answer * 10 == int(m[1]) * int(m[2])
        elif m := re.search(r"costs (\d+) dollars and is (\d+)% off", user):
            assert answer * 100 == int(m[1]) * (100 - int(m[2]))
        else:
            pytest.fail(f"unrecognised numeric task: {user}")
        checked += 1
    assert checked >= 40


# ----------------------------------------------------------------------------------------------
# demo_corpus.txt
# ----------------------------------------------------------------------------------------------


def test_corpus_covers_demo_texts():
    text = (RESOURCES / "demo_corpus.txt").read_text(encoding="utf-8")
    assert 50_000 <= len(text.encode("utf-8")) <= 500_000
    lines = set(text.splitlines())
    for rec in demo():
        for m in rec["messages"]:
            assert m["content"] in lines
    extra = len(text.splitlines()) - sum(len(r["messages"]) for r in demo())
    assert extra >= 200
    for ch in '{}[]":,0123456789':
        assert ch in text


# ----------------------------------------------------------------------------------------------
# general_probe.jsonl
# ----------------------------------------------------------------------------------------------


def test_probe_structure_and_balance():
    items = probe()
    assert len(items) == 300
    for item in items:
        assert set(item) == {"messages", "category"}
        assert [m["role"] for m in item["messages"]] == ["user", "assistant"]
        assert item["category"] in PROBE_CATEGORIES
        assert 0 < len(answer_of(item)) < 40
    counts = Counter(item["category"] for item in items)
    assert set(counts) == PROBE_CATEGORIES
    assert all(45 <= n <= 55 for n in counts.values()), counts
    zh = sum(has_chinese(item) for item in items) / len(items)
    assert zh >= 0.40
    assert 0.4 <= zh <= 0.6
    questions = [user_of(item) for item in items]
    assert len(questions) == len(set(questions))


def by_category(category: str) -> list[tuple[str, str]]:
    return [(user_of(i), answer_of(i)) for i in probe() if i["category"] == category]


def test_probe_arithmetic_answers_recomputed():
    for question, answer in by_category("arithmetic"):
        m = re.search(r"(?:计算：|What is )([\d+\-×÷() ]+?)(?: 等于多少|\?)", question)
        assert m, question
        expr = m[1].replace("×", "*").replace("÷", "/")
        assert re.fullmatch(r"[\d+\-*/() ]+", expr)
        value = eval(expr, {"__builtins__": {}})  # restricted to digits and operators by the regex above
        assert value == int(value)
        assert answer == str(int(value)), question


def test_probe_string_answers_recomputed():
    for question, answer in by_category("string"):
        if m := re.search(r"单词 (\w+) 的字母倒过来|letters of the word '(\w+)'", question):
            expected = (m[1] or m[2])[::-1]
        elif m := re.search(r"单词 (\w+) 有几个字母|letters are in the word '(\w+)'", question):
            expected = str(len(m[1] or m[2]))
        elif m := re.search(r"字母 (\w) 在单词 (\w+) 中|the letter '(\w)' appear in the word '(\w+)'", question):
            letter, word = (m[1], m[2]) if m[1] else (m[3], m[4])
            expected = str(word.count(letter))
        elif m := re.search(r"单词 (\w+) 全部改成大写|the word '(\w+)' in uppercase", question):
            expected = (m[1] or m[2]).upper()
        elif m := re.search(r"“(.+)”一共有几个汉字", question):
            assert all(CJK.match(ch) for ch in m[1])
            expected = str(len(m[1]))
        elif m := re.search(r"last letter of the word '(\w+)'", question):
            expected = m[1][-1]
        else:
            pytest.fail(f"unrecognised string task: {question}")
        assert answer == expected, question


def test_probe_multiple_choice():
    for question, answer in by_category("multiple_choice"):
        options = re.findall(r"^([ABCD])\. (.+)$", question, flags=re.M)
        assert [letter for letter, _ in options] == list("ABCD"), question
        assert answer in "ABCD" and len(answer) == 1
        values = [value for _, value in options]
        assert len(set(values)) == 4
        if all(v.isdigit() for v in values):
            numbers = [int(v) for v in values]
            target = max(numbers) if ("最大" in question or "largest" in question) else min(numbers)
            assert answer == "ABCD"[numbers.index(target)], question
    letters = Counter(answer for _, answer in by_category("multiple_choice"))
    assert len(letters) == 4, "correct option position varies"


def test_probe_logic_answers_recomputed():
    zh_days = ["星期一", "星期二", "星期三", "星期四", "星期五", "星期六", "星期日"]
    en_days = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
    for question, answer in by_category("logic"):
        if pairs := re.findall(r"(\w+?)比(\w+?)高|(\w+) is taller than (\w+)", question):
            pairs = [(a or c, b or d) for a, b, c, d in pairs]
            taller, shorter = {a for a, _ in pairs}, {b for _, b in pairs}
            ask_tallest = "最高" in question or "tallest" in question
            (expected,) = (taller - shorter) if ask_tallest else (shorter - taller)
        elif m := re.search(r"(?:数列|sequence) ([\d, ]+?)(?: 的|\?)", question):
            seq = [int(x) for x in m[1].split(", ")]
            steps = {b - a for a, b in zip(seq, seq[1:], strict=False)}
            assert len(steps) == 1
            expected = str(seq[-1] + steps.pop())
        elif m := re.search(r"今天是(星期.)，(\d)天后", question):
            expected = zh_days[(zh_days.index(m[1]) + int(m[2])) % 7]
        elif m := re.search(r"today is (\w+), what day is it in (\d) days", question):
            expected = en_days[(en_days.index(m[1]) + int(m[2])) % 7]
        elif m := re.search(r"(?:排列：|largest: )([\d, ]+?)[。.]", question):
            expected = ",".join(str(x) for x in sorted(int(x) for x in m[1].split(", ")))
        else:
            pytest.fail(f"unrecognised logic task: {question}")
        assert answer == expected, question


def test_probe_reading_answers_are_spans():
    for question, answer in by_category("reading"):
        passage = re.search(r"(?:短文：|Passage: )(.+)\n", question)
        assert passage, question
        assert answer in passage[1], question


def test_probe_commonsense_answers_are_short_and_instructed():
    for question, answer in by_category("commonsense"):
        assert "只回答" in question or "Answer with" in question
        assert len(answer) <= 12 and " " not in answer
