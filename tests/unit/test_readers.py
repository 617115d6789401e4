"""Data readers: every layout parses to the expected record, every bad input names its file, line and field."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from tunelab.config.schema import DatasetSpec
from tunelab.data.readers import (
    Reject,
    detect_format,
    load_records,
    parse_record,
    read_rows,
    write_rejects,
)
from tunelab.data.record import Record, Turn
from tunelab.errors import DataError


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def load(path: Path, fmt: str = "auto", on_bad_record: str = "error"):
    return load_records(DatasetSpec(path=str(path), format=fmt), on_bad_record)


def error_message(path: Path, fmt: str = "auto") -> str:
    with pytest.raises(DataError) as caught:
        load(path, fmt)
    return str(caught.value)


# -- each layout parses to the expected record -----------------------------------------------------------------------


def test_alpaca_with_input_system_history_and_label():
    row = {
        "instruction": "把这句话翻译成英文",
        "input": "今天天气很好",
        "output": "The weather is nice today.",
        "system": "你是翻译助手",
        "history": [["你好", "你好！有什么可以帮你？"]],
        "label": 1,
    }
    assert parse_record(row, "alpaca", "d.json:3") == Record(
        turns=(
            Turn("user", "你好"),
            Turn("assistant", "你好！有什么可以帮你？"),
            Turn("user", "把这句话翻译成英文\n\n今天天气很好"),
            Turn("assistant", "The weather is nice today."),
        ),
        system="你是翻译助手",
        label="1",
        source="d.json:3",
    )


def test_alpaca_blank_input_is_left_out_of_the_prompt():
    record = parse_record({"instruction": "Say hi", "input": "  ", "output": "hi"}, "alpaca", "d:1")
    assert record.turns == (Turn("user", "Say hi"), Turn("assistant", "hi"))
    assert record.system is None


def test_alpaca_with_chosen_and_rejected_is_preference():
    row = {"instruction": "2+2?", "input": "", "chosen": "4", "rejected": "5"}
    assert parse_record(row, "alpaca", "d:1") == Record(
        turns=(Turn("user", "2+2?"),), kind="preference", chosen="4", rejected="5", source="d:1"
    )


def test_sharegpt_with_system_message_and_chinese_text():
    row = {
        "conversations": [
            {"from": "system", "value": "简洁回答"},
            {"from": "human", "value": "中国的首都是哪里？"},
            {"from": "gpt", "value": "北京。"},
            {"from": "user", "value": "人口呢？"},
            {"from": "model", "value": "约两千万。"},
        ]
    }
    assert parse_record(row, "sharegpt", "c.jsonl:7") == Record(
        turns=(
            Turn("user", "中国的首都是哪里？"),
            Turn("assistant", "北京。"),
            Turn("user", "人口呢？"),
            Turn("assistant", "约两千万。"),
        ),
        system="简洁回答",
        source="c.jsonl:7",
    )


def test_messages_joins_text_parts():
    row = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "there"}]},
            {"role": "assistant", "content": "Hi."},
        ]
    }
    assert parse_record(row, "messages", "m:1") == Record(
        turns=(Turn("user", "Hello, there"), Turn("assistant", "Hi.")), system="Be brief.", source="m:1"
    )


def test_text_is_one_assistant_turn():
    assert parse_record({"text": "春眠不觉晓"}, "text", "t:1") == Record(
        turns=(Turn("assistant", "春眠不觉晓"),), kind="text", source="t:1"
    )


def test_preference_with_prompt_string():
    row = {"prompt": "哪个更好？", "chosen": "这个", "rejected": "那个", "system": "s"}
    assert parse_record(row, "preference", "p:1") == Record(
        turns=(Turn("user", "哪个更好？"),), system="s", kind="preference", chosen="这个", rejected="那个", source="p:1"
    )


def test_preference_with_message_context_and_answers_as_messages():
    row = {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Joke?"},
        ],
        "chosen": {"role": "assistant", "content": "A pun."},
        "rejected": [{"from": "gpt", "value": "No."}],
    }
    record = parse_record(row, "auto", "p:2")
    assert record.kind == "preference"
    assert record.turns == (Turn("user", "Hi"), Turn("assistant", "Hello"), Turn("user", "Joke?"))
    assert (record.chosen, record.rejected) == ("A pun.", "No.")


def test_detect_format_for_each_layout():
    assert detect_format({"instruction": "a", "input": "", "output": "b"}) == "alpaca"
    assert detect_format({"conversations": []}) == "sharegpt"
    assert detect_format({"messages": []}) == "messages"
    assert detect_format({"prompt": "a", "chosen": "b", "rejected": "c"}) == "preference"
    assert detect_format({"text": "a", "id": 3}) == "text"


# -- file layouts and line numbers -----------------------------------------------------------------------------------


def test_json_array_sources_are_the_lines_where_objects_start(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(
        '[\n  {"text": "one"},\n\n  {\n    "text": "two\\nlines"\n  },   {"text": "three"}\n]\n', encoding="utf-8"
    )
    result = load(path)
    assert [r.source for r in result.records] == [f"{path}:2", f"{path}:4", f"{path}:6"]
    assert [r.turns[0].content for r in result.records] == ["one", "two\nlines", "three"]


def test_json_file_holding_json_lines_is_read_row_by_row(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('{"text": "a"}\n{"text": "b"}\n', encoding="utf-8")
    assert [source for source, _ in read_rows(path)] == [f"{path}:1", f"{path}:2"]


def test_jsonl_skips_blank_lines_and_keeps_line_numbers(tmp_path):
    path = tmp_path / "d.ndjson"
    path.write_text('{"text": "a"}\n\n   \n{"text": "b"}\n', encoding="utf-8")
    assert [source for source, _ in read_rows(path)] == [f"{path}:1", f"{path}:4"]


def test_csv_rows_lines_and_empty_cells(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('instruction,input,output\n写诗,,"第一行\n第二行"\n\nSay hi,,hi\n', encoding="utf-8")
    rows = list(read_rows(path))
    assert rows == [
        (f"{path}:2", {"instruction": "写诗", "output": "第一行\n第二行"}),
        (f"{path}:5", {"instruction": "Say hi", "output": "hi"}),
    ]
    assert load(path).records[0].turns == (Turn("user", "写诗"), Turn("assistant", "第一行\n第二行"))


def test_an_unclosed_csv_quote_is_an_error_not_a_cell_that_swallows_the_file(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('instruction,output\n问1,"答1\n问2,答2\n问3,答3\n', encoding="utf-8")
    assert error_message(path) == (f"{path}:2: -: invalid CSV: unexpected end of data (a quoted cell that starts "
                                   "in this row is never closed)")
    bad_quote = tmp_path / "q.csv"
    bad_quote.write_text('instruction,output\nq1,"a"b\nq2,a2\n', encoding="utf-8")
    loaded = load(bad_quote, on_bad_record="skip")
    assert [r.source for r in loaded.records] == [f"{bad_quote}:3"]  # the reader goes on after a bad row
    assert [r.source for r in loaded.rejects] == [f"{bad_quote}:2"]


def test_parquet_round_trip(tmp_path):
    path = tmp_path / "d.parquet"
    rows = [
        {
            "conversations": [{"from": "human", "value": f"问题{i}"}, {"from": "gpt", "value": f"回答{i}"}],
            "system": None,
        }
        for i in range(3)
    ]
    rows[1]["system"] = "系统"
    pd.DataFrame(rows).to_parquet(path)
    # A null cell is a missing key, exactly as an empty CSV cell is.
    assert "system" not in next(iter(read_rows(path)))[1]
    result = load(path)
    assert result.format == "sharegpt"
    assert [r.source for r in result.records] == [f"{path}:1", f"{path}:2", f"{path}:3"]
    assert result.records[2].turns == (Turn("user", "问题2"), Turn("assistant", "回答2"))
    assert [r.system for r in result.records] == [None, "系统", None]


def test_utf8_bom_is_stripped(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes("text\n你好\n".encode("utf-8-sig"))
    assert list(read_rows(path)) == [(f"{path}:2", {"text": "你好"})]


def test_gbk_file_is_decoded(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes('{"instruction": "介绍一下长城", "output": "长城是中国古代的军事防御工程。"}\n'.encode("gbk"))
    record = load(path).records[0]
    assert record.turns[0].content == "介绍一下长城"
    assert record.answer == "长城是中国古代的军事防御工程。"


def test_bytes_neither_utf8_nor_gbk_name_the_offset(tmp_path):
    path = tmp_path / "d.jsonl"
    data = '{"text": "café"}\n'.encode("latin-1")
    path.write_bytes(data)
    offset = data.index(0xE9)  # "é" in Latin-1; followed by '"' it is not a GBK pair either
    assert error_message(path) == (
        f"{path}:1: not valid UTF-8 (or GBK) text: byte 0xe9 at offset {offset}; re-save the file as UTF-8"
    )


def test_a_utf8_chinese_file_with_one_stray_byte_is_an_error_not_gbk_mojibake(tmp_path):
    # UTF-8 Chinese often decodes as GBK too; one Latin-1 byte must not turn every line into mojibake.
    good = '{"instruction": "你好", "output": "世界你好"}\n'.encode()
    data = good * 3 + b'{"instruction": "caf\xe9s", "output": "ok"}\n' + good
    path = tmp_path / "d.jsonl"
    path.write_bytes(data)
    assert data.decode("gbk")  # the trap: the whole file is valid GBK
    assert error_message(path) == (
        f"{path}:4: not valid UTF-8: byte 0xe9 at offset {data.index(0xE9)} (1 undecodable byte in a file that "
        "is otherwise UTF-8); fix or remove it"
    )


# -- every bad-input kind, with its exact message ----------------------------------------------------------------------


def test_malformed_json_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "no end}\n', encoding="utf-8")
    assert error_message(path) == f"{path}:2: -: invalid JSON: Unterminated string starting at (column 10)"


def test_broken_json_array_stops_with_its_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n {"text": "a"}\n {"text": "b"}\n]\n', encoding="utf-8")
    assert error_message(path) == f"{path}:3: -: invalid JSON: expected ',' or ']' after an array element"


def test_missing_field(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c"}])
    assert error_message(path) == f"{path}:2: output: missing"


def test_wrong_type(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": 42}]}])
    assert error_message(path) == f"{path}:1: messages[0].content: expected a string, got int"


def test_empty_answer(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": " \n\t"}])
    assert error_message(path, "alpaca") == f"{path}:1: output: empty answer"


def test_unknown_role(tmp_path):
    conversation = [
        {"from": "human", "value": "q"},
        {"from": "gpt", "value": "a"},
        {"from": "human", "value": "q"},
        {"from": "bot", "value": "a"},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", [{"conversations": conversation}])
    assert error_message(path) == (
        f"{path}:1: conversations[3].from: "
        "unknown role 'bot'; expected one of human, user, gpt, assistant, model, system"
    )


def test_turns_that_do_not_alternate(tmp_path):
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "user", "content": "d"},
        {"role": "assistant", "content": "e"},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": messages}])
    assert (
        error_message(path)
        == f"{path}:1: messages[3].role: turns must alternate user/assistant: two user turns in a row"
    )


def test_conversation_ending_with_the_user(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "a"}]}])
    assert error_message(path) == f"{path}:1: messages[0].role: the last turn must be an assistant answer, got user"


def test_system_message_after_the_first(tmp_path):
    messages = [
        {"role": "user", "content": "a"},
        {"role": "system", "content": "s"},
        {"role": "assistant", "content": "b"},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": messages}])
    assert error_message(path) == f"{path}:1: messages[1].role: a system message is only allowed first"


def test_history_entry_that_is_not_a_pair(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b", "history": [["u", "v"], ["u"]]}])
    assert error_message(path) == f"{path}:1: history[1]: expected a [user, assistant] pair, got 1 items"


def test_undetectable_format_lists_what_it_looked_for(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "a", "answer": "b"}])
    assert error_message(path) == (
        f"{path}:1: cannot tell the format: expected one of instruction+output (alpaca), chosen+rejected (preference), "
        "conversations (sharegpt), messages (messages), text (text); found keys: answer, question"
    )


def test_row_that_is_not_an_object(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('["a", "b"]\n', encoding="utf-8")
    assert error_message(path) == f"{path}:1: -: expected a JSON object, got list"


def test_unknown_extension(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("hello\n", encoding="utf-8")
    assert (
        error_message(path)
        == f"{path}: unsupported file type '.txt'; supported: .csv, .json, .jsonl, .ndjson, .parquet"
    )


def test_file_not_found_names_the_path_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert error_message(Path("data") / "missing.jsonl") == f"{Path('data') / 'missing.jsonl'}: file not found"
    with pytest.raises(DataError, match=r"^\./data/train\.jsonl: file not found$"):
        load_records(DatasetSpec(path="./data/train.jsonl"), "error")


def test_empty_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n\n", encoding="utf-8")
    assert error_message(path) == f"{path}: the file holds no records"


# -- loading: format choice, skip mode and the rejects file ----------------------------------------------------------


def test_explicit_format_overrides_detection(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [{"text": "plain", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}],
    )
    assert load(path).format == "messages"
    result = load(path, "text")
    assert result.format == "text"
    assert result.records[0].kind == "text"


def test_detection_uses_the_first_good_row(tmp_path):
    # Row 1 fits no layout; row 2 looks like alpaca but is broken, so it must not decide the format either.
    rows = [{"foo": 1}, {"instruction": "a", "output": ""}, {"text": "a"}, {"text": "b"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    result = load(path, on_bad_record="skip")
    assert result.format == "text"
    assert [r.source for r in result.records] == [f"{path}:3", f"{path}:4"]
    assert [r.source for r in result.rejects] == [f"{path}:1", f"{path}:2"]


def test_skip_mode_counts_rejects_and_writes_each_with_its_reason(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [
        '{"instruction": "好", "output": "好的"}',
        "{not json",
        '{"instruction": "a", "output": ""}',
        '{"instruction": "b", "output": 3}',
        '{"instruction": "c", "output": "d"}',
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = load(path, on_bad_record="skip")
    assert [r.source for r in result.records] == [f"{path}:1", f"{path}:5"]
    assert result.rejects == [
        Reject(f"{path}:2", "-: invalid JSON: Expecting property name enclosed in double quotes (column 2)", None),
        Reject(f"{path}:3", "output: empty answer", {"instruction": "a", "output": ""}),
        Reject(f"{path}:4", "output: expected a string, got int", {"instruction": "b", "output": 3}),
    ]

    out = tmp_path / "run" / "rejects.jsonl"
    write_rejects(out, result.rejects)
    text = out.read_text(encoding="utf-8")
    written = [json.loads(line) for line in text.splitlines()]
    assert written == [{"source": r.source, "reason": r.reason, "raw": r.raw} for r in result.rejects]

    with pytest.raises(DataError, match=r":2: -: invalid JSON"):
        load(path, on_bad_record="error")


def test_rejects_file_keeps_non_ascii_text_readable(tmp_path):
    out = tmp_path / "rejects.jsonl"
    write_rejects(out, [Reject("d.jsonl:1", "output: missing", {"instruction": "你好"})])
    assert '"instruction": "你好"' in out.read_text(encoding="utf-8")
