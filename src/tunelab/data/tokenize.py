"""Record -> token ids and labels, the one tokenization path of training, preview and inference.

Each template segment is encoded on its own (no special tokens added: templates carry their own markers), so a
prompt encodes to the same ids whether it precedes an answer in training or is fed alone at inference.
Labels are ``IGNORE_INDEX`` on context and ids on answers (end-of-turn marker included).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from tunelab.data.record import Record, Turn
from tunelab.data.template import Segment, Template, TemplateRefused
from tunelab.errors import DataError

IGNORE_INDEX = -100
# How many extra tokens to cut from a too-long prompt per retry: decoding a cut token sequence and re-encoding it
# can merge or split a few tokens at the cut, so the fit is confirmed by re-rendering, not assumed.
_PROMPT_CUT_SLACK = 4


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    source: str
    truncation: str = "none"
    """none | history | prompt | answer: the deepest cut truncation had to make."""

    @property
    def supervised_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


@dataclass
class TokenizeStats:
    samples: int = 0
    kept: int = 0
    dropped_no_answer: int = 0
    truncated: dict[str, int] = field(default_factory=lambda: {"history": 0, "prompt": 0, "answer": 0})
    tokens: int = 0
    supervised_tokens: int = 0

    def add(self, example: Example | None) -> None:
        self.samples += 1
        if example is None:
            self.dropped_no_answer += 1
            return
        self.kept += 1
        self.tokens += len(example.input_ids)
        self.supervised_tokens += example.supervised_tokens
        if example.truncation != "none":
            self.truncated[example.truncation] += 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "kept": self.kept,
            "dropped_no_supervised_tokens": self.dropped_no_answer,
            "truncated": dict(self.truncated),
            "tokens": self.tokens,
            "supervised_tokens": self.supervised_tokens,
        }

    def describe(self) -> str:
        cut = ", ".join(f"{n} {kind}" for kind, n in self.truncated.items() if n) or "none"
        return (
            f"{self.kept}/{self.samples} samples kept, {self.dropped_no_answer} dropped with no answer left after "
            f"truncation; truncated: {cut}; {self.tokens} tokens, {self.supervised_tokens} supervised"
        )


def encode_segments(tokenizer: Any, segments: Sequence[Segment], supervise: set[int] | None = None) -> Example:
    """Concatenate per-segment encodings; ``supervise`` limits loss to those assistant turn indices."""
    input_ids: list[int] = []
    labels: list[int] = []
    for segment in segments:
        ids = tokenizer.encode(segment.text, add_special_tokens=False)
        input_ids.extend(ids)
        keep = segment.supervised and (supervise is None or segment.turn_index in supervise)
        labels.extend(ids if keep else [IGNORE_INDEX] * len(ids))
    return Example(input_ids=input_ids, labels=labels, source="")


def encode_prompt(template: Template, tokenizer: Any, system: str | None, turns: Sequence[Turn]) -> list[int]:
    """Ids of a prompt that asks for the next answer: the inference twin of :func:`tokenize_record`."""
    return encode_segments(tokenizer, template.render(system, turns, add_generation_prompt=True)).input_ids


def tokenize_record(
    record: Record, template: Template, tokenizer: Any, cutoff_len: int, train_on: str = "all_turns"
) -> Example | None:
    """Tokenize one record for training, or ``None`` when no supervised token survives truncation.

    Truncation order (the answer is what the model learns, so it is cut last): drop the oldest exchanges, then
    shorten the last user message from its end when that makes the whole answer fit, else cut the answer's tail.
    A record the tokenizer's chat template refuses is a ``DataError`` naming it.
    """
    try:
        return _tokenize_record(record, template, tokenizer, cutoff_len, train_on)
    except TemplateRefused as error:
        raise DataError(record.source, "messages", f"the tokenizer's chat template refuses this conversation: "
                        f"{error}; pick another data.template (e.g. chatml) or change the record") from None


def _tokenize_record(record: Record, template: Template, tokenizer: Any, cutoff_len: int, train_on: str
                     ) -> Example | None:
    if record.kind == "text":
        return _tokenize_text(record, tokenizer, cutoff_len)
    record = record.as_sft()
    turns, example, dropped = _fit_history(record.system, list(record.turns), template, tokenizer, train_on,
                                           cutoff_len)
    truncation = "history" if dropped else "none"
    # Shorten the question only when that lets the whole answer fit; otherwise keep it and cut the answer's tail,
    # since an answer to an erased question teaches nothing.
    prompt_can_make_room = len(example.input_ids) > cutoff_len and len(
        _encode(record.system, _with_last_user(turns, ""), template, tokenizer, train_on).input_ids) <= cutoff_len
    for _ in range(4 if prompt_can_make_room else 0):
        excess = len(example.input_ids) - cutoff_len
        if excess <= 0:
            break
        shorter = _shorten_last_user(turns, tokenizer, excess + _PROMPT_CUT_SLACK)
        if shorter is None:
            break
        turns = shorter
        truncation = "prompt"
        example = _encode(record.system, turns, template, tokenizer, train_on)
    if len(example.input_ids) > cutoff_len:
        truncation = "answer"
        example = replace(example, input_ids=example.input_ids[:cutoff_len], labels=example.labels[:cutoff_len])
    example.source = record.source
    example.truncation = truncation
    return example if example.supervised_tokens else None


def _encode(system: str | None, turns: list[Turn], template: Template, tokenizer: Any, train_on: str) -> Example:
    last_answer = max((i for i, t in enumerate(turns) if t.role == "assistant"), default=-1)
    supervise = {last_answer} if train_on == "last_turn" else None
    return encode_segments(tokenizer, template.render(system, turns), supervise)


def _fit_history(system: str | None, turns: list[Turn], template: Template, tokenizer: Any, train_on: str,
                 cutoff_len: int) -> tuple[list[Turn], Example, bool]:
    """Drop the fewest oldest exchanges that bring the example within ``cutoff_len``, keeping the last user turn
    whatever it costs: ``(turns, example, whether any were dropped)``.

    Found by bisection over how many to drop (fewer turns never encode longer): every encoding renders the whole
    conversation, once per answer with a chat template, so dropping one exchange at a time was cubic in the turns
    (200 exchanges: 29 s for one record)."""
    starts = [i for i, t in enumerate(turns) if t.role == "user"]
    encoded: dict[int, Example] = {}

    def dropping(k: int) -> Example:  # k oldest exchanges dropped
        if k not in encoded:
            encoded[k] = _encode(system, turns[starts[k]:] if k else turns, template, tokenizer, train_on)
        return encoded[k]

    if len(dropping(0).input_ids) <= cutoff_len or len(starts) <= 1:
        return turns, dropping(0), False
    low, high = 1, len(starts) - 1  # the fewest drops that fit lie in [low, high]; high is the last resort
    while low < high:
        middle = (low + high) // 2
        if len(dropping(middle).input_ids) <= cutoff_len:
            high = middle
        else:
            low = middle + 1
    return turns[starts[low]:], dropping(low), True


def _shorten_last_user(turns: list[Turn], tokenizer: Any, cut: int) -> list[Turn] | None:
    index = max(i for i, t in enumerate(turns) if t.role == "user")
    ids = tokenizer.encode(turns[index].content, add_special_tokens=False)
    if not ids:
        return None
    keep = max(len(ids) - cut, 0)
    # A cut between the bytes of one character (Chinese in byte-level BPE) decodes to U+FFFD: leave it out.
    content = tokenizer.decode(ids[:keep]).rstrip("\ufffd") if keep else ""
    if content == turns[index].content:
        return None
    return _with_last_user(turns, content)


def _with_last_user(turns: list[Turn], content: str) -> list[Turn]:
    index = max(i for i, t in enumerate(turns) if t.role == "user")
    return [*turns[:index], Turn("user", content), *turns[index + 1 :]]


def _tokenize_text(record: Record, tokenizer: Any, cutoff_len: int) -> Example:
    ids = tokenizer.encode(record.turns[0].content, add_special_tokens=False)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    truncation = "answer" if len(ids) > cutoff_len else "none"
    ids = ids[:cutoff_len]
    return Example(input_ids=ids, labels=list(ids), source=record.source, truncation=truncation)
