import pytest

from tunelab.config.schema import CustomTemplate
from tunelab.data.record import Record, Turn
from tunelab.data.template import NAMED_TEMPLATES, build_template
from tunelab.data.tokenize import IGNORE_INDEX, TokenizeStats, encode_prompt, tokenize_record
from tunelab.errors import ConfigError

MULTI = Record(
    system="你是购物助手。",
    turns=(
        Turn("user", "你好"),
        Turn("assistant", "你好！请问要买什么？"),
        Turn("user", "Add two red hoodies, size L"),
        Turn("assistant", '{"intent":"add_to_cart","params":{"color":"red","quantity":2,"size":"L"}}'),
    ),
    source="t.jsonl:1",
)
TEMPLATE_CHOICES = [None, "chatml", "qwen", "llama3", "alpaca"]


def supervised_text(example, tokenizer) -> list[str]:
    """Decode each run of supervised tokens."""
    runs, current = [], []
    for token, label in zip(example.input_ids, example.labels, strict=True):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


@pytest.mark.parametrize("name", TEMPLATE_CHOICES)
def test_supervised_tokens_decode_to_exactly_the_answers(tokenizer, name):
    template = build_template(name, tokenizer)
    example = tokenize_record(MULTI, template, tokenizer, cutoff_len=1024)
    runs = supervised_text(example, tokenizer)
    answers = [t.content for t in MULTI.turns if t.role == "assistant"]
    assert len(runs) == 2
    for run, answer in zip(runs, answers, strict=True):
        assert run.startswith(answer)
        end_marker = run[len(answer):]
        # the end-of-turn marker is supervised too, so the model learns to stop
        assert end_marker.strip(), f"no end-of-turn marker after the answer in {run!r}"
        assert any(stop in end_marker for stop in template.stop_strings)


def test_prompt_and_padding_are_never_supervised(tokenizer):
    template = build_template(None, tokenizer)
    example = tokenize_record(MULTI, template, tokenizer, cutoff_len=1024)
    prompt = encode_prompt(template, tokenizer, MULTI.system, MULTI.turns[:1])
    assert all(label == IGNORE_INDEX for label in example.labels[: len(prompt)])
    assert example.labels[len(prompt)] != IGNORE_INDEX


@pytest.mark.parametrize("name", TEMPLATE_CHOICES)
def test_inference_prompt_is_identical_to_training_prefix(tokenizer, name):
    template = build_template(name, tokenizer)
    example = tokenize_record(MULTI, template, tokenizer, cutoff_len=1024)
    prompt = encode_prompt(template, tokenizer, MULTI.system, MULTI.prompt_turns)
    assert example.input_ids[: len(prompt)] == prompt
    first_answer_position = len(prompt)
    assert example.labels[first_answer_position] != IGNORE_INDEX
    assert all(label == IGNORE_INDEX for label in example.labels[len(prompt) - 5 : len(prompt)])


def test_tokenizer_chat_template_matches_chatml(tokenizer):
    own = build_template(None, tokenizer)
    chatml = build_template("chatml", tokenizer)
    assert own.name == "tokenizer"
    assert own.render(MULTI.system, MULTI.turns) == chatml.render(MULTI.system, MULTI.turns)


def test_named_templates_render_expected_text(tokenizer):
    alpaca = build_template("alpaca", tokenizer)
    text = "".join(s.text for s in alpaca.render("sys", (Turn("user", "hi"), Turn("assistant", "yo"))))
    assert text == f"sys\n\n### Instruction:\nhi\n\n### Response:\nyo{tokenizer.eos_token}\n\n"
    llama = build_template("llama3", tokenizer)
    text = "".join(s.text for s in llama.render(None, (Turn("user", "hi"),), add_generation_prompt=True))
    assert text == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    qwen = build_template("qwen", tokenizer)
    assert qwen.render(None, (Turn("user", "x"),))[0].text.startswith("<|im_start|>system\nYou are Qwen")


def test_custom_template_and_braces_in_content(tokenizer):
    custom = CustomTemplate(user="### instruction\n{content}\n\n", generation_prompt="### response\n",
                            assistant="{content}{eos}\n")
    template = build_template("custom", tokenizer, custom)
    segments = template.render(None, (Turn("user", "给我 {json}"), Turn("assistant", '{"a": 1}')))
    assert segments[0].text == "### instruction\n给我 {json}\n\n### response\n"
    assert segments[1].text == '{"a": 1}' + tokenizer.eos_token + "\n"


def test_unknown_template_lists_choices(tokenizer):
    with pytest.raises(ConfigError, match="allowed values: alpaca, chatml, llama3, qwen, custom"):
        build_template("vicuna", tokenizer)
    assert set(NAMED_TEMPLATES) == {"alpaca", "chatml", "llama3", "qwen"}


def test_last_turn_only(tokenizer):
    template = build_template(None, tokenizer)
    example = tokenize_record(MULTI, template, tokenizer, cutoff_len=1024, train_on="last_turn")
    runs = supervised_text(example, tokenizer)
    assert len(runs) == 1 and runs[0].startswith(MULTI.turns[-1].content)


def test_truncation_drops_history_before_touching_the_answer(tokenizer):
    template = build_template(None, tokenizer)
    full = tokenize_record(MULTI, template, tokenizer, cutoff_len=4096)
    last_only = Record(system=MULTI.system, turns=MULTI.turns[2:])
    needed = len(tokenize_record(last_only, template, tokenizer, cutoff_len=4096).input_ids)
    assert needed < len(full.input_ids)
    example = tokenize_record(MULTI, template, tokenizer, cutoff_len=needed)
    assert example.truncation == "history"
    assert supervised_text(example, tokenizer)[0].startswith(MULTI.turns[-1].content)


def test_truncation_shortens_the_prompt_then_keeps_the_answer_whole(tokenizer):
    template = build_template(None, tokenizer)
    long_prompt = Record(turns=(Turn("user", "帮我把红色的卫衣加入购物车，要L码。" * 30), Turn("assistant", "好的")))
    answer_only = tokenize_record(Record(turns=(Turn("user", "x"), Turn("assistant", "好的"))), template, tokenizer,
                                  cutoff_len=4096)
    cutoff = len(answer_only.input_ids) + 20
    example = tokenize_record(long_prompt, template, tokenizer, cutoff_len=cutoff)
    assert example.truncation == "prompt"
    assert len(example.input_ids) <= cutoff
    assert supervised_text(example, tokenizer)[0].startswith("好的")
    assert tokenizer.decode(example.input_ids).startswith("<|im_start|>user\n帮我")  # framing intact


def test_answer_cut_last_and_empty_answers_dropped_and_counted(tokenizer):
    template = build_template(None, tokenizer)
    long_answer = Record(turns=(Turn("user", "hi"), Turn("assistant", "你好" * 200)))
    prompt_len = len(encode_prompt(template, tokenizer, None, long_answer.prompt_turns))
    cut = tokenize_record(long_answer, template, tokenizer, cutoff_len=prompt_len + 5)
    assert cut.truncation == "answer" and cut.supervised_tokens == 5
    stats = TokenizeStats()
    long_system = Record(system="系统提示" * 300, turns=(Turn("user", "hi"), Turn("assistant", "ok")))
    dropped = tokenize_record(long_system, template, tokenizer, cutoff_len=16)
    stats.add(dropped)
    stats.add(cut)
    assert dropped is None
    assert stats.dropped_no_answer == 1 and stats.kept == 1 and stats.truncated["answer"] == 1
    assert "1 dropped" in stats.describe()


def test_text_records_are_fully_supervised_with_eos(tokenizer):
    template = build_template(None, tokenizer)
    record = Record(turns=(Turn("assistant", "纯文本 plain text"),), kind="text")
    example = tokenize_record(record, template, tokenizer, cutoff_len=64)
    assert example.labels == example.input_ids
    assert example.input_ids[-1] == tokenizer.eos_token_id


def test_a_preference_record_trains_sft_on_its_chosen_answer(tokenizer, tmp_path):
    import json

    from tunelab.config.schema import DataConfig
    from tunelab.data.build import load_splits

    template = build_template(None, tokenizer)
    preference = Record(turns=(Turn("user", "推荐一本书"),), kind="preference", chosen="《红楼梦》", rejected="不知道",
                        source="p.jsonl:1")
    example = tokenize_record(preference, template, tokenizer, cutoff_len=1024)
    assert example is not None and supervised_text(example, tokenizer)[0].startswith("《红楼梦》")
    assert "不知道" not in tokenizer.decode(example.input_ids)

    rows = [{"prompt": f"问题{i}", "chosen": f"好答案{i}", "rejected": f"坏答案{i}"} for i in range(6)]
    path, chat = tmp_path / "pref.jsonl", tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    chat.write_text(json.dumps({"instruction": "你好", "output": "你好！"}, ensure_ascii=False) + "\n", "utf-8")
    splits = load_splits(DataConfig(datasets=[{"path": str(path)}, {"path": str(chat)}], val_size=0, test_size=0.3))
    assert [m["preference_as_chosen"] for m in splits.mix] == [6, 0]
    every = [*splits.train, *splits.test]
    assert len(every) == 7 and all(r.kind == "chat" for r in every)
    assert {r.answer for r in every} == {*(f"好答案{i}" for i in range(6)), "你好！"}  # test answers are the chosen


def test_a_chat_template_that_refuses_a_record_is_a_data_error_naming_it(tiny_model):
    from transformers import AutoTokenizer

    from tunelab.errors import DataError

    strict = AutoTokenizer.from_pretrained(tiny_model)  # a copy: the session's tokenizer keeps its template
    strict.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                            "{{ raise_exception('System role not supported') }}{% endif %}"
                            "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                            "{% if add_generation_prompt %}assistant: {% endif %}")
    template = build_template(None, strict)
    plain = Record(turns=(Turn("user", "你好"), Turn("assistant", "你好！")), source="d.jsonl:3")
    assert tokenize_record(plain, template, strict, cutoff_len=64) is not None
    with pytest.raises(DataError, match=r"^d\.jsonl:7: messages: the tokenizer's chat template refuses this "
                                        r"conversation: System role not supported"):
        tokenize_record(Record(turns=plain.turns, system="你是助手", source="d.jsonl:7"), template, strict, 64)


def test_a_shortened_chinese_question_never_ends_in_a_broken_character(tokenizer):
    # Rare characters are byte-level tokens in the tiny tokenizer: a cut can fall inside one character.
    record = Record(turns=(Turn("user", "龘靐齉爨" * 30), Turn("assistant", "好的")))
    template = build_template("chatml", tokenizer)
    shortened = [tokenize_record(record, template, tokenizer, cutoff) for cutoff in range(30, 60)]
    assert any(e.truncation == "prompt" for e in shortened)
    assert all("\ufffd" not in tokenizer.decode(e.input_ids) for e in shortened)


@pytest.mark.parametrize("name", [None, "chatml", "alpaca"])
def test_dropping_old_exchanges_keeps_as_many_as_fit(tokenizer, name):
    # The fewest oldest exchanges are dropped (found by bisection): the same as dropping one at a time until the
    # rest fits, which was cubic in the number of turns.
    import random

    from tunelab.data.tokenize import _encode

    template = build_template(name, tokenizer)
    rng = random.Random(0)
    for _ in range(12):
        turns = []
        for i in range(rng.randint(2, 9)):
            turns += [Turn("user", f"问题{i} " + "这款运动鞋还有货吗？" * rng.randint(1, 4)),
                      Turn("assistant", f"回答{i} " + "好的" * rng.randint(1, 6))]
        record = Record(turns=tuple(turns), system="你是客服。")
        full = len(_encode(record.system, turns, template, tokenizer, "all_turns").input_ids)
        cutoff = rng.randint(full // 4, full)
        expected = list(turns)  # the one-at-a-time reference
        while (len(_encode(record.system, expected, template, tokenizer, "all_turns").input_ids) > cutoff
               and sum(t.role == "user" for t in expected) > 1):
            expected = expected[[i for i, t in enumerate(expected) if t.role == "user"][1]:]
        got = tokenize_record(record, template, tokenizer, cutoff)
        reference = _encode(record.system, expected, template, tokenizer, "all_turns")
        if len(reference.input_ids) <= cutoff:  # fits after dropping: the same tokens
            assert got.input_ids == reference.input_ids
            assert got.truncation == ("history" if expected != turns else "none")
