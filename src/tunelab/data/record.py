"""The canonical record every input format is parsed into.

A record is a conversation: an optional system prompt and alternating user/assistant turns. Preference data adds
``chosen``/``rejected`` (alternative final assistant answers), classification data a ``label``; plain text for
continued pre-training is a single assistant turn with ``kind == "text"`` so the same tokenization path applies.
``source`` is ``file:line`` so every later error can point back at the input.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

Role = Literal["user", "assistant"]
ROLES: tuple[str, ...] = ("user", "assistant")
RecordKind = Literal["chat", "text", "preference"]


@dataclass(frozen=True)
class Turn:
    role: Role
    content: str

    def to_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True)
class Record:
    turns: tuple[Turn, ...]
    system: str | None = None
    kind: RecordKind = "chat"
    chosen: str | None = None
    rejected: str | None = None
    label: str | None = None
    source: str = "<memory>"
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def prompt_turns(self) -> tuple[Turn, ...]:
        """Every turn before the final assistant answer (the context the model answers)."""
        if self.turns and self.turns[-1].role == "assistant":
            return self.turns[:-1]
        return self.turns

    @property
    def answer(self) -> str | None:
        """The final assistant answer: the reference an evaluation compares against."""
        if self.turns and self.turns[-1].role == "assistant":
            return self.turns[-1].content
        return None

    def as_sft(self) -> Record:
        """What supervised fine-tuning learns from this record: a preference record becomes its prompt answered by
        the chosen answer (the rejected one is for preference training); any other record is itself."""
        if self.kind != "preference" or self.chosen is None:
            return self
        return replace(self, turns=(*self.turns, Turn("assistant", self.chosen)), kind="chat", chosen=None,
                       rejected=None)

    def to_messages(self) -> list[dict[str, str]]:
        """OpenAI-style messages, system first when present."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [t.to_dict() for t in self.turns]

    def to_json(self) -> dict[str, Any]:
        """A JSON object in OpenAI ``messages`` format that reads back to an equal record."""
        out: dict[str, Any] = {"messages": self.to_messages()}
        for name in ("chosen", "rejected", "label"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.kind == "text":
            out = {"text": self.turns[0].content}
        return out
