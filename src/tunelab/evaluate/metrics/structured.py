"""JSON answers: lenient parsing, validity, and tool-call / slot-filling scores.

A reference such as ``{"intent": "add_to_cart", "params": {"product": "卫衣", "size": "L"}}`` is read as a tool call.
The spellings of common formats are accepted on both sides: ``name``, ``tool`` or ``function`` for the intent;
``arguments``, ``parameters``, ``args`` or ``slots`` for the parameters, which may be a JSON string as in OpenAI
tool calls; an OpenAI ``{"type": "function", "function": {...}}`` wrapper, a ``tool_calls`` list or a top-level list
of calls, of which only the first is scored. A reference without an intent (``{"name": "张三", "age": 30}``) is plain
structured output: its fields are scored the same way and ``intent_correct`` is ``None``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tunelab.evaluate.metrics.json_fields import compare_fields, count_statuses, flatten_fields
from tunelab.evaluate.metrics.normalize import normalize_text
from tunelab.evaluate.metrics.prf import precision_recall_f1

_INTENT_KEYS = ("intent", "name", "tool", "function")
_PARAMS_KEYS = ("params", "arguments", "parameters", "args", "slots")
_WHOLE_FENCE = re.compile(r"```[\w+-]*[^\S\n]*\n?(.*?)\n?\s*```", re.DOTALL)
_OPENING_BRACKET = re.compile(r"[{\[]")
_DECODER = json.JSONDecoder()

JsonContainer = dict[str, Any] | list[Any]


def parse_json_answer(text: str, *, lenient: bool = True) -> JsonContainer | None:
    """The JSON object or array in ``text``, or ``None`` if there is none.

    Strict (``lenient=False``): the whole text, optionally inside one ``` fence, must be an object or array.
    Lenient: otherwise the first fenced block that contains one wins, then the first ``{`` or ``[`` in the text
    from which an object or array parses; text around it is ignored. Scalars (``"yes"``, ``3``) never count.
    """
    stripped = text.strip()
    whole = _WHOLE_FENCE.fullmatch(stripped)
    found = _loads_container(whole.group(1) if whole else stripped)
    if found is not None or not lenient:
        return found
    for fenced in _WHOLE_FENCE.finditer(stripped):
        found = _first_container(fenced.group(1))
        if found is not None:
            return found
    return _first_container(stripped)


def _loads_container(text: str) -> JsonContainer | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, (dict, list)) else None


def _first_container(text: str) -> JsonContainer | None:
    for bracket in _OPENING_BRACKET.finditer(text):
        try:
            value, _ = _DECODER.raw_decode(text, bracket.start())
        except ValueError:
            continue
        return value if isinstance(value, (dict, list)) else None  # always true from { or [; tells the type checker
    return None


def json_valid(pred: str) -> float:
    """1.0 when :func:`parse_json_answer` finds an object or array in ``pred`` (leniently), else 0.0."""
    return float(parse_json_answer(pred) is not None)


@dataclass(frozen=True)
class ToolCall:
    """A JSON answer read as a call: ``intent`` is ``None`` for plain structured output."""

    intent: str | None
    params: dict[str, Any]
    arguments_valid: bool = True
    """False when the arguments were a string that is not a JSON object."""


def read_tool_call(answer: JsonContainer) -> ToolCall:
    """Read a parsed JSON answer as a :class:`ToolCall` (see the module docstring for the accepted shapes)."""
    if isinstance(answer, list):
        if answer and isinstance(answer[0], dict):
            return read_tool_call(answer[0])
        return ToolCall(None, {"$": answer})  # "$" names the root, as in JSONPath
    calls = answer.get("tool_calls")
    if isinstance(calls, list) and calls and isinstance(calls[0], dict):
        return read_tool_call(calls[0])
    if isinstance(answer.get("function"), dict):
        return read_tool_call(answer["function"])
    intent_key = next((key for key in _INTENT_KEYS if isinstance(answer.get(key), str)), None)
    params_key = next((key for key in _PARAMS_KEYS if key in answer), None)
    if intent_key is not None and params_key is not None:
        params, valid = _read_arguments(answer[params_key])
        return ToolCall(answer[intent_key], params, valid)
    if intent_key == "intent":
        # Flat NLU style {"intent": "book", "city": "北京"}: the other keys are the slots. Only for "intent":
        # a lone "name" is as likely an ordinary field ({"name": "张三", "age": 30}).
        return ToolCall(answer["intent"], {key: value for key, value in answer.items() if key != "intent"})
    return ToolCall(None, answer)


def _read_arguments(value: Any) -> tuple[dict[str, Any], bool]:
    if value is None or value == "":
        return {}, True
    if isinstance(value, str):
        value = _loads_container(value)
    return (value, True) if isinstance(value, dict) else ({}, False)


@dataclass(frozen=True)
class ToolCallScore:
    """How one predicted answer matches its reference call or object."""

    json_valid: bool
    """The prediction contained a JSON object or array, and its arguments (if a string) parsed as an object."""
    intent_correct: bool | None
    """``None`` when the reference has no intent (plain structured output)."""
    tp: int
    fp: int
    fn: int
    fields: dict[str, str]
    """Dotted field -> ``"correct"``, ``"wrong"``, ``"missing"`` (in the reference only) or ``"extra"``."""

    @property
    def param_f1(self) -> float:
        """F1 of this sample's fields; 1.0 when neither side has any."""
        return precision_recall_f1(self.tp, self.fp, self.fn)["f1"]


def score_tool_call(pred: str | JsonContainer, ref: str | JsonContainer) -> ToolCallScore:
    """Score a predicted call or JSON object against the reference.

    ``pred`` text is parsed leniently; ``ref`` text strictly, and a reference that is not a JSON object or array
    raises ``ValueError``. Field order never matters; see :func:`~json_fields.canonical_value` for value equality.
    Intents are compared after :func:`normalize_text`, so ``"Add_To_Cart "`` matches ``"add_to_cart"``: the metric
    measures whether the model chose the right action, not its spelling.
    """
    if isinstance(ref, str):
        ref_answer = parse_json_answer(ref, lenient=False)
        if ref_answer is None:
            raise ValueError(f"reference is not a JSON object or array: {ref[:80]!r}")
    else:
        ref_answer = ref
    ref_call = read_tool_call(ref_answer)
    pred_answer = parse_json_answer(pred) if isinstance(pred, str) else pred
    pred_call = read_tool_call(pred_answer) if pred_answer is not None else ToolCall(None, {}, arguments_valid=False)
    fields = compare_fields(flatten_fields(pred_call.params), flatten_fields(ref_call.params))
    tp, fp, fn = count_statuses(fields.values())
    return ToolCallScore(
        json_valid=pred_answer is not None and pred_call.arguments_valid,
        intent_correct=_same_intent(pred_call.intent, ref_call.intent),
        tp=tp,
        fp=fp,
        fn=fn,
        fields=fields,
    )


def _same_intent(pred: str | None, ref: str | None) -> bool | None:
    if ref is None:
        return None
    return pred is not None and normalize_text(pred) == normalize_text(ref)


def aggregate_tool_calls(scores: Sequence[ToolCallScore]) -> dict[str, Any]:
    """Corpus-level tool-call metrics.

    Keys: ``n``, ``json_valid_rate``, ``intent_accuracy`` (over samples whose reference has an intent),
    ``param_precision``, ``param_recall``, ``param_f1`` (micro: counts summed over all samples, so a sample with
    many fields weighs more), and ``per_field`` ``{field: {precision, recall, f1, support}}`` where ``support`` is
    the number of references that have the field. A rate with no samples to average is ``None``.
    """
    intents = [score.intent_correct for score in scores if score.intent_correct is not None]
    micro = precision_recall_f1(sum(s.tp for s in scores), sum(s.fp for s in scores), sum(s.fn for s in scores))
    statuses_by_field: dict[str, list[str]] = {}
    for score in scores:
        for field, status in score.fields.items():
            statuses_by_field.setdefault(field, []).append(status)
    return {
        "n": len(scores),
        "json_valid_rate": _mean([s.json_valid for s in scores]),
        "intent_accuracy": _mean(intents),
        "param_precision": micro["precision"] if scores else None,
        "param_recall": micro["recall"] if scores else None,
        "param_f1": micro["f1"] if scores else None,
        "per_field": {field: _field_metrics(statuses) for field, statuses in sorted(statuses_by_field.items())},
    }


def _field_metrics(statuses: list[str]) -> dict[str, float | int]:
    tp, fp, fn = count_statuses(statuses)
    return {**precision_recall_f1(tp, fp, fn), "support": tp + fn}


def _mean(flags: Sequence[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None
