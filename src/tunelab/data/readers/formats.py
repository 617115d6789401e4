"""Turning one raw row into the canonical ``Record``, for each supported dataset layout.

Layouts (``format`` in a dataset spec):

    alpaca       instruction, input?, output, system?, history? ([[user, assistant], ...]), label?
    sharegpt     conversations: [{from, value}, ...], system?
    messages     messages: [{role, content}, ...] (OpenAI chat format)
    preference   a prompt (prompt | messages | conversations | instruction+input) with chosen and rejected answers
    text         text (continued pre-training)

Any chat layout whose row has ``chosen``/``rejected`` is read as preference data. Parsing only checks and copies:
every problem raises ``DataError`` naming the exact field (``messages[2].role``, ``history[1][0]``), and a
whitespace-only string counts as empty. A ``null`` value counts as missing, since Parquet and JSON writers use it
for "absent".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

from tunelab.data.record import Record, Turn
from tunelab.errors import DataError

Row = dict[str, Any]
# A turn with the path of the field that set its role, so an ordering error can point at the offending message.
_PlacedTurn = tuple[Turn, str]

# What detection looks for, in order: the first key set fully present (and not null) names the format.
_SIGNATURES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("instruction", "output"), "alpaca"),
    (("chosen", "rejected"), "preference"),
    (("conversations",), "sharegpt"),
    (("messages",), "messages"),
    (("text",), "text"),
)


def detect_format(row: Row, source: str = "<row>") -> str:
    """Name the layout of ``row`` from its keys, or raise ``DataError`` listing the key sets looked for."""
    for keys, fmt in _SIGNATURES:
        if all(row.get(key) is not None for key in keys):
            return fmt
    wanted = ", ".join(f"{'+'.join(keys)} ({fmt})" for keys, fmt in _SIGNATURES)
    found = ", ".join(sorted(row)) or "none"
    raise DataError(source, None, f"cannot tell the format: expected one of {wanted}; found keys: {found}")


def parse_record(row: Row, fmt: str, source: str) -> Record:
    """Parse ``row`` laid out as ``fmt`` (``auto`` detects it) into a ``Record`` whose ``source`` is ``source``."""
    if fmt == "auto":
        fmt = detect_format(row, source)
    parser = _PARSERS.get(fmt)
    if parser is None:
        raise ValueError(f"unknown dataset format {fmt!r}; expected auto or one of {', '.join(_PARSERS)}")
    return parser(row, source)


def _is_preference(row: Row) -> bool:
    return row.get("chosen") is not None or row.get("rejected") is not None


# -- alpaca ----------------------------------------------------------------------------------------------------------


def _parse_alpaca(row: Row, source: str) -> Record:
    if _is_preference(row):
        return _parse_preference(row, source)
    turns = _alpaca_prompt(row, source)
    turns.append(Turn("assistant", _text(row.get("output"), source, "output", empty="empty answer")))
    return Record(
        turns=tuple(turns),
        system=_optional_text(row.get("system"), source, "system"),
        label=_label(row, source),
        source=source,
    )


def _alpaca_prompt(row: Row, source: str) -> list[Turn]:
    """History turns, then the user turn made of instruction and input."""
    instruction = _text(row.get("instruction"), source, "instruction", empty="empty instruction")
    extra = _optional_text(row.get("input"), source, "input")
    prompt = f"{instruction}\n\n{extra}" if extra is not None else instruction
    return [*_alpaca_history(row.get("history"), source), Turn("user", prompt)]


def _alpaca_history(history: Any, source: str) -> list[Turn]:
    if history is None:
        return []
    if not isinstance(history, list):
        raise DataError(source, "history", f"expected a list of [user, assistant] pairs, got {_type(history)}")
    turns = []
    for i, pair in enumerate(history):
        field = f"history[{i}]"
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            got = f"{len(pair)} items" if isinstance(pair, (list, tuple)) else _type(pair)
            raise DataError(source, field, f"expected a [user, assistant] pair, got {got}")
        turns.append(Turn("user", _text(pair[0], source, f"{field}[0]", empty="empty message")))
        turns.append(Turn("assistant", _text(pair[1], source, f"{field}[1]", empty="empty answer")))
    return turns


# -- sharegpt and messages: a list of role/content messages ----------------------------------------------------------


@dataclass(frozen=True)
class _MessageLayout:
    key: str
    role_key: str
    content_key: str
    roles: dict[str, str]
    """Accepted role names (in the order error messages list them) and what each means."""
    text_parts: bool
    """Whether content may be a list of ``{"type": "text", "text": ...}`` parts."""


SHAREGPT = _MessageLayout(
    key="conversations",
    role_key="from",
    content_key="value",
    roles={
        "human": "user",
        "user": "user",
        "gpt": "assistant",
        "assistant": "assistant",
        "model": "assistant",
        "system": "system",
    },
    text_parts=False,
)
MESSAGES = _MessageLayout(
    key="messages",
    role_key="role",
    content_key="content",
    roles={"system": "system", "user": "user", "assistant": "assistant"},
    text_parts=True,
)


def _parse_chat(layout: _MessageLayout) -> Callable[[Row, str], Record]:
    def parse(row: Row, source: str) -> Record:
        if _is_preference(row):
            return _parse_preference(row, source)
        system, turns = _read_messages(row, layout, layout.key, source)
        _check_order(turns, source, layout.key, last="assistant")
        return Record(
            turns=tuple(turn for turn, _ in turns),
            system=system,
            label=_label(row, source),
            source=source,
        )

    return parse


def _read_messages(row: Row, layout: _MessageLayout, field: str, source: str) -> tuple[str | None, list[_PlacedTurn]]:
    """The system prompt (a top-level ``system`` or a first system message) and the user/assistant turns."""
    messages = row.get(field)
    if messages is None:
        raise DataError(source, field, "missing")
    if not isinstance(messages, list):
        raise DataError(source, field, f"expected a list of messages, got {_type(messages)}")
    system = _optional_text(row.get("system"), source, "system")
    turns: list[_PlacedTurn] = []
    for i, message in enumerate(messages):
        path = f"{field}[{i}]"
        role, role_path = _message_role(message, layout, path, source)
        content_path = f"{path}.{layout.content_key}"
        if role != "system":
            empty = "empty answer" if role == "assistant" else "empty message"
            content = _message_content(message.get(layout.content_key), layout, content_path, source, empty)
            turns.append((Turn(role, content), role_path))  # type: ignore[arg-type]  # role is user or assistant
            continue
        if i != 0:
            raise DataError(source, role_path, "a system message is only allowed first")
        inline = _optional_text(message.get(layout.content_key), source, content_path)
        if system is not None and inline is not None and inline != system:
            raise DataError(source, "system", f"given both here and as {path}; keep one")
        system = system if system is not None else inline
    return system, turns


def _message_role(message: Any, layout: _MessageLayout, path: str, source: str) -> tuple[str, str]:
    if not isinstance(message, dict):
        keys = f"'{layout.role_key}' and '{layout.content_key}'"
        raise DataError(source, path, f"expected an object with {keys}, got {_type(message)}")
    role_path = f"{path}.{layout.role_key}"
    name = _text(message.get(layout.role_key), source, role_path, empty="empty role")
    role = layout.roles.get(name)
    if role is None:
        raise DataError(source, role_path, f"unknown role '{name}'; expected one of {', '.join(layout.roles)}")
    return role, role_path


def _message_content(value: Any, layout: _MessageLayout, path: str, source: str, empty: str) -> str:
    if layout.text_parts and isinstance(value, list):
        value = _join_text_parts(value, path, source)
    return _text(value, source, path, empty=empty)


def _join_text_parts(parts: list[Any], path: str, source: str) -> str:
    texts = []
    for i, part in enumerate(parts):
        part_path = f"{path}[{i}]"
        if not isinstance(part, dict):
            raise DataError(source, part_path, f"expected a content part object, got {_type(part)}")
        if part.get("type") != "text":
            raise DataError(source, f"{part_path}.type", f"only text parts are supported, got {part.get('type')!r}")
        texts.append(_text(part.get("text"), source, f"{part_path}.text", empty="empty text part"))
    # Parts are consecutive pieces of one message (that is how chat templates render them), so nothing goes between.
    return "".join(texts)


def _check_order(turns: list[_PlacedTurn], source: str, field: str, *, last: str) -> None:
    """Turns alternate user/assistant starting with the user and end with a ``last`` turn."""
    if not turns:
        raise DataError(source, field, "no user or assistant messages")
    first, first_path = turns[0]
    if first.role != "user":
        raise DataError(source, first_path, f"the first turn must be from the user, got {first.role}")
    for (before, _), (turn, path) in pairwise(turns):
        if turn.role == before.role:
            raise DataError(source, path, f"turns must alternate user/assistant: two {turn.role} turns in a row")
    final, final_path = turns[-1]
    if final.role != last:
        wanted = "an assistant answer" if last == "assistant" else "a user turn (the answers are chosen/rejected)"
        raise DataError(source, final_path, f"the last turn must be {wanted}, got {final.role}")


# -- preference ------------------------------------------------------------------------------------------------------


def _parse_preference(row: Row, source: str) -> Record:
    system, turns = _preference_prompt(row, source)
    return Record(
        turns=tuple(turns),
        system=system,
        kind="preference",
        chosen=_preference_answer(row.get("chosen"), source, "chosen"),
        rejected=_preference_answer(row.get("rejected"), source, "rejected"),
        label=_label(row, source),
        source=source,
    )


def _preference_prompt(row: Row, source: str) -> tuple[str | None, list[Turn]]:
    """The context both answers reply to, ending with a user turn."""
    prompt = row.get("prompt")
    if prompt is not None and not isinstance(prompt, list):
        text = _text(prompt, source, "prompt", empty="empty prompt")
        return _optional_text(row.get("system"), source, "system"), [Turn("user", text)]
    # A list-valued prompt is TRL's conversational layout: the prompt is itself a message list.
    candidates = (("prompt", MESSAGES), ("messages", MESSAGES), ("conversations", SHAREGPT))
    for field, layout in candidates:
        if row.get(field) is not None:
            system, placed = _read_messages(row, layout, field, source)
            _check_order(placed, source, field, last="user")
            return system, [turn for turn, _ in placed]
    if row.get("instruction") is not None:
        return _optional_text(row.get("system"), source, "system"), _alpaca_prompt(row, source)
    raise DataError(source, "prompt", "missing; give prompt, messages, conversations or instruction")


def _preference_answer(value: Any, source: str, field: str) -> str:
    """A string, or one assistant message (alone or in a one-item list) in either message layout."""
    if isinstance(value, list):
        if len(value) != 1:
            raise DataError(source, field, f"expected one assistant message, got a list of {len(value)}")
        value, field = value[0], f"{field}[0]"
    if isinstance(value, dict):
        layout = SHAREGPT if "from" in value else MESSAGES
        role, role_path = _message_role(value, layout, field, source)
        if role != "assistant":
            raise DataError(source, role_path, f"expected an assistant message, got {role}")
        path = f"{field}.{layout.content_key}"
        return _message_content(value.get(layout.content_key), layout, path, source, "empty answer")
    return _text(value, source, field, empty="empty answer")


# -- text ------------------------------------------------------------------------------------------------------------


def _parse_text(row: Row, source: str) -> Record:
    text = _text(row.get("text"), source, "text", empty="empty text")
    return Record(turns=(Turn("assistant", text),), kind="text", label=_label(row, source), source=source)


# -- field checks ----------------------------------------------------------------------------------------------------


def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _text(value: Any, source: str, field: str, *, empty: str) -> str:
    """A required, non-blank string, returned unchanged (whitespace is part of the training text)."""
    if value is None:
        raise DataError(source, field, "missing")
    if not isinstance(value, str):
        raise DataError(source, field, f"expected a string, got {_type(value)}")
    if not value.strip():
        raise DataError(source, field, empty)
    return value


def _optional_text(value: Any, source: str, field: str) -> str | None:
    """An optional string; blank means absent (an empty ``input`` or ``system`` column is common and harmless)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise DataError(source, field, f"expected a string, got {_type(value)}")
    return value if value.strip() else None


def _label(row: Row, source: str) -> str | None:
    value = row.get("label")
    # Classification labels are often numbered (0, 1, ...); they are kept as their text.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return _optional_text(value, source, "label")


_PARSERS: dict[str, Callable[[Row, str], Record]] = {
    "alpaca": _parse_alpaca,
    "sharegpt": _parse_chat(SHAREGPT),
    "messages": _parse_chat(MESSAGES),
    "preference": _parse_preference,
    "text": _parse_text,
}
