"""Lenient JSON parsing, tool-call scoring and its aggregation."""

import json

import pytest

from tunelab.evaluate.metrics import aggregate_tool_calls, json_valid, parse_json_answer, score_tool_call
from tunelab.evaluate.metrics.json_fields import canonical_value, flatten_fields

REF = {"intent": "add_to_cart", "params": {"product": "卫衣", "size": "L", "qty": 2}}
REF_TEXT = json.dumps(REF, ensure_ascii=False)


# --- parsing -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"a": 1}', {"a": 1}),
        ("  [1, 2]\n", [1, 2]),
        ('```json\n{"a": 1}\n```', {"a": 1}),
        ('```\n{"a": 1}```', {"a": 1}),
        ('好的，结果如下：\n```json\n{"a": "北京"}\n```\n希望有帮助。', {"a": "北京"}),
        ('The answer is {"a": {"b": [1, 2]}} as requested.', {"a": {"b": [1, 2]}}),
        ('Note {not json} then {"a": 1}', {"a": 1}),
        # a fenced block wins over a bracket that parses earlier in the prose (a citation, here)
        ('See [1] below.\n```json\n{"a": 1}\n```', {"a": 1}),
    ],
)
def test_lenient_parse_finds_the_first_object_or_array(text, expected):
    assert parse_json_answer(text) == expected


@pytest.mark.parametrize("text", ["yes", "3", '"a string"', "null", '{"a": 1,', "{'a': 1}", ""])
def test_text_without_an_object_or_array_is_not_json(text):
    assert parse_json_answer(text) is None
    assert json_valid(text) == 0.0


def test_strict_parse_accepts_only_a_whole_answer():
    assert parse_json_answer('```json\n{"a": 1}\n```', lenient=False) == {"a": 1}
    assert parse_json_answer('The answer is {"a": 1}', lenient=False) is None
    assert json_valid('The answer is {"a": 1}') == 1.0


# --- value equality ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b"),
    [("3", 3), ("3.0", 3), (3.0, 3), ("３", 3), ("1e2", 100), (" L ", "l"), ("Ｌ", "L"), ("True", True),
     (["b", "a", "a"], ["a", "b", "a"]), (2**60 + 1, str(2**60 + 1)), ({"x": "1"}, {"x": 1.0})],
)  # fmt: skip
def test_equivalent_values_compare_equal(a, b):
    assert canonical_value(a) == canonical_value(b)


@pytest.mark.parametrize(
    ("a", "b"),
    [("3", 4), (["a", "b"], ["a", "b", "a"]), (2**60, 2**60 + 1), ("卫衣", "T恤"), (True, 1), (None, ""), ("3", [3])],
)
def test_different_values_compare_unequal(a, b):
    assert canonical_value(a) != canonical_value(b)


def test_nested_objects_flatten_to_dotted_keys():
    flat = flatten_fields({"address": {"city": "北京", "geo": {"lat": 1}}, "tags": ["a"], "empty": {}})
    assert flat == {"address.city": "北京", "address.geo.lat": 1, "tags": ["a"], "empty": {}}


# --- one tool call -------------------------------------------------------------------------------------------------


def test_exact_call_with_reordered_keys_is_fully_correct():
    pred = '{"params": {"qty": 2, "size": "L", "product": "卫衣"}, "intent": "add_to_cart"}'
    score = score_tool_call(pred, REF_TEXT)
    assert (score.json_valid, score.intent_correct) == (True, True)
    assert (score.tp, score.fp, score.fn) == (3, 0, 0)
    assert score.fields == {"product": "correct", "size": "correct", "qty": "correct"}
    assert score.param_f1 == 1.0


def test_openai_call_in_a_fence_with_string_arguments_numbers_as_strings_and_an_extra_key():
    arguments = json.dumps({"size": "ｌ", "qty": "2.0", "product": " 卫衣", "color": "黑"}, ensure_ascii=False)
    call = {"type": "function", "function": {"name": "add_to_cart", "arguments": arguments}}
    pred = f"好的，我来调用工具：\n```json\n{json.dumps(call, ensure_ascii=False)}\n```"
    score = score_tool_call(pred, REF_TEXT)
    assert (score.json_valid, score.intent_correct) == (True, True)
    assert score.fields == {"product": "correct", "size": "correct", "qty": "correct", "color": "extra"}
    # precision 3/4, recall 3/3 -> F1 = 2*3 / (2*3 + 1 + 0) = 6/7
    assert (score.tp, score.fp, score.fn) == (3, 1, 0)
    assert score.param_f1 == pytest.approx(6 / 7)


@pytest.mark.parametrize(
    "pred",
    [
        '{"name": "add_to_cart", "arguments": {"product": "卫衣", "size": "L", "qty": 2}}',
        '{"tool": "add_to_cart", "args": {"product": "卫衣", "size": "L", "qty": 2}}',
        '{"function": "add_to_cart", "parameters": {"product": "卫衣", "size": "L", "qty": 2}}',
        '{"intent": "add_to_cart", "slots": {"product": "卫衣", "size": "L", "qty": 2}}',
        '{"intent": "add_to_cart", "product": "卫衣", "size": "L", "qty": 2}',
        '{"tool_calls": [{"function": {"name": "add_to_cart", "arguments": "{\\"product\\": \\"卫衣\\", '
        '\\"size\\": \\"L\\", \\"qty\\": 2}"}}]}',
        '[{"name": "add_to_cart", "arguments": {"product": "卫衣", "size": "L", "qty": 2}}]',
    ],
)
def test_every_accepted_call_shape_scores_as_the_same_call(pred):
    score = score_tool_call(pred, REF_TEXT)
    assert (score.json_valid, score.intent_correct, score.tp, score.fp, score.fn) == (True, True, 3, 0, 0)


def test_wrong_value_is_a_false_positive_and_a_false_negative():
    pred = '{"intent": "add_to_cart", "params": {"product": "卫衣", "size": "XL"}}'
    score = score_tool_call(pred, REF)
    assert score.fields == {"product": "correct", "size": "wrong", "qty": "missing"}
    # tp 1, fp 1 (size), fn 2 (size, qty): F1 = 2 / (2 + 1 + 2) = 0.4
    assert (score.tp, score.fp, score.fn) == (1, 1, 2)
    assert score.param_f1 == pytest.approx(0.4)


def test_intent_is_compared_after_normalisation():
    pred = '{"intent": " Add_To_Cart", "params": {"product": "卫衣", "size": "L", "qty": 2}}'
    assert score_tool_call(pred, REF).intent_correct is True


def test_wrong_intent_is_scored_separately_from_the_parameters():
    score = score_tool_call('{"intent": "remove_from_cart", "params": {"product": "卫衣", "size": "L", "qty": 2}}', REF)
    assert score.intent_correct is False
    assert score.param_f1 == 1.0


def test_invalid_json_prediction_misses_everything():
    score = score_tool_call('{"intent": "add_to_cart", "params": {"product": "卫衣",', REF_TEXT)
    assert (score.json_valid, score.intent_correct) == (False, False)
    assert score.fields == {"product": "missing", "size": "missing", "qty": "missing"}
    assert (score.tp, score.fp, score.fn, score.param_f1) == (0, 0, 3, 0.0)


def test_arguments_string_that_is_not_json_makes_the_call_invalid():
    score = score_tool_call('{"name": "add_to_cart", "arguments": "{product: 卫衣}"}', REF_TEXT)
    assert score.json_valid is False
    assert score.intent_correct is True
    assert score.fn == 3


def test_nested_params_and_lists_as_multisets():
    ref = {"intent": "ship", "params": {"address": {"city": "北京", "zip": "100000"}, "items": ["a", "b", "a"]}}
    pred = {"intent": "ship", "params": {"items": ["b", "a", "a"], "address": {"zip": 100000, "city": "上海"}}}
    score = score_tool_call(pred, ref)
    assert score.fields == {"address.city": "wrong", "address.zip": "correct", "items": "correct"}
    pred["params"]["items"] = ["a", "b"]
    assert score_tool_call(pred, ref).fields["items"] == "wrong"


def test_plain_structured_output_has_no_intent():
    score = score_tool_call('{"age": "30", "name": "张三", "city": "北京"}', '{"name": "张三", "age": 30}')
    assert score.intent_correct is None
    assert score.fields == {"name": "correct", "age": "correct", "city": "extra"}


def test_call_without_parameters_on_both_sides_is_perfect():
    score = score_tool_call('{"name": "get_time", "arguments": "{}"}', '{"intent": "get_time", "params": {}}')
    assert (score.intent_correct, score.fields, score.param_f1) == (True, {}, 1.0)


def test_reference_that_is_not_json_raises():
    with pytest.raises(ValueError, match="reference is not a JSON object or array: 'add to cart'"):
        score_tool_call("{}", "add to cart")


# --- aggregation ---------------------------------------------------------------------------------------------------


def test_aggregate_is_micro_over_fields_with_per_field_scores():
    scores = [
        score_tool_call('{"intent": "add_to_cart", "params": {"product": "卫衣", "size": "L", "qty": 2}}', REF),
        score_tool_call('{"intent": "add_to_cart", "params": {"product": "卫衣", "size": "XL", "color": "红"}}', REF),
        score_tool_call("not json", REF),
        score_tool_call('{"name": "张三"}', {"name": "张三"}),
    ]
    result = aggregate_tool_calls(scores)
    # tp = 3 + 1 + 0 + 1 = 5; fp = 0 + 2 (size, color) + 0 + 0 = 2; fn = 0 + 2 (size, qty) + 3 + 0 = 5
    assert result["n"] == 4
    assert result["json_valid_rate"] == 0.75
    assert result["intent_accuracy"] == pytest.approx(2 / 3)  # the plain object has no intent
    assert result["param_precision"] == pytest.approx(5 / 7)
    assert result["param_recall"] == pytest.approx(5 / 10)
    assert result["param_f1"] == pytest.approx(10 / 17)
    assert list(result["per_field"]) == ["color", "name", "product", "qty", "size"]
    # size: correct, wrong, missing -> tp 1, fp 1, fn 2, support 3
    assert result["per_field"]["size"] == {"precision": 0.5, "recall": pytest.approx(1 / 3), "f1": 0.4, "support": 3}
    assert result["per_field"]["color"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    json.dumps(result, allow_nan=False)


def test_aggregate_of_nothing_has_no_rates():
    result = aggregate_tool_calls([])
    assert result == {
        "n": 0,
        "json_valid_rate": None,
        "intent_accuracy": None,
        "param_precision": None,
        "param_recall": None,
        "param_f1": None,
        "per_field": {},
    }
