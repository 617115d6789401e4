"""Prompt templates: a conversation -> text segments, each marked supervised (an answer) or not (context).

Training and inference both go through :meth:`Template.render`, and tokenization encodes segment by segment, so
the tokens a model sees for a prompt at inference are exactly the tokens it saw before that answer in training.
Two kinds: :class:`StringTemplate` (named formats and the user's custom one) and :class:`ChatTemplate`, which
wraps the tokenizer's own Jinja chat template and recovers the answer spans by rendering growing prefixes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from tunelab.config.schema import CustomTemplate
from tunelab.data.record import Turn
from tunelab.errors import ConfigError


@dataclass(frozen=True)
class Segment:
    text: str
    supervised: bool
    turn_index: int = -1
    """Index of the assistant turn a supervised segment answers (-1 for context)."""


class Template(Protocol):
    name: str

    def render(self, system: str | None, turns: Sequence[Turn], add_generation_prompt: bool = False) -> list[Segment]:
        """Segments of the conversation; with ``add_generation_prompt`` it ends with the text that cues an answer."""
        ...

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """Strings that end an answer at inference (the end-of-turn marker)."""
        ...


@dataclass(frozen=True)
class StringTemplate:
    name: str
    system: str
    user: str
    assistant: str
    generation_prompt: str = ""
    prefix: str = ""
    default_system: str | None = None
    stop: tuple[str, ...] = ()
    eos_token: str = ""
    bos_token: str = ""

    def render(self, system: str | None, turns: Sequence[Turn], add_generation_prompt: bool = False) -> list[Segment]:
        parts: list[Segment] = []
        context = self._fill(self.prefix, "")
        system_text = system if system is not None else self.default_system
        if system_text:
            context += self._fill(self.system, system_text)
        for index, turn in enumerate(turns):
            if turn.role == "user":
                context += self._fill(self.user, turn.content) + self._fill(self.generation_prompt, "")
            else:
                parts.append(Segment(context, False))
                parts.append(Segment(self._fill(self.assistant, turn.content), True, index))
                context = ""
        if add_generation_prompt or context:
            parts.append(Segment(context, False))
        return [p for p in parts if p.text or p.supervised]

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return tuple(s.replace("{eos}", self.eos_token) for s in self.stop if s.replace("{eos}", self.eos_token))

    def _fill(self, pattern: str, content: str) -> str:
        # str.replace, not str.format: user content may contain braces (JSON answers always do).
        return pattern.replace("{eos}", self.eos_token).replace("{bos}", self.bos_token).replace("{content}", content)


NAMED_TEMPLATES: dict[str, StringTemplate] = {
    "alpaca": StringTemplate(
        name="alpaca",
        prefix="{bos}",
        system="{content}\n\n",
        user="### Instruction:\n{content}\n\n",
        generation_prompt="### Response:\n",
        assistant="{content}{eos}\n\n",
        default_system="Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.",
        stop=("{eos}", "\n\n### Instruction:"),
    ),
    "chatml": StringTemplate(
        name="chatml",
        system="<|im_start|>system\n{content}<|im_end|>\n",
        user="<|im_start|>user\n{content}<|im_end|>\n",
        generation_prompt="<|im_start|>assistant\n",
        assistant="{content}<|im_end|>\n",
        stop=("<|im_end|>",),
    ),
    "qwen": StringTemplate(
        name="qwen",
        system="<|im_start|>system\n{content}<|im_end|>\n",
        user="<|im_start|>user\n{content}<|im_end|>\n",
        generation_prompt="<|im_start|>assistant\n",
        assistant="{content}<|im_end|>\n",
        default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
        stop=("<|im_end|>", "<|endoftext|>"),
    ),
    "llama3": StringTemplate(
        name="llama3",
        prefix="<|begin_of_text|>",
        system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
        user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
        generation_prompt="<|start_header_id|>assistant<|end_header_id|>\n\n",
        assistant="{content}<|eot_id|>",
        stop=("<|eot_id|>", "<|end_of_text|>"),
    ),
}
TEMPLATE_NAMES: tuple[str, ...] = (*sorted(NAMED_TEMPLATES), "custom")


class TemplateRefused(ValueError):
    """The tokenizer's chat template raised an error for a conversation (the tokenizer refuses its shape)."""


class ChatTemplate:
    """The tokenizer's own chat template, split into segments.

    A Jinja template renders whole conversations, so the answer spans are found by rendering growing prefixes:
    the prompt for answer *i* (``turns[:i]`` plus the generation prompt) must be a prefix of the rendering that
    includes answer *i*; the difference is the answer with its end-of-turn marker. Templates that rewrite
    earlier turns (some strip reasoning from history) break that property and are rejected with a message.
    """

    name = "tokenizer"

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def _apply(self, system: str | None, turns: Sequence[Turn], add_generation_prompt: bool) -> str:
        from jinja2 import TemplateError

        messages = ([{"role": "system", "content": system}] if system else []) + [t.to_dict() for t in turns]
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except TemplateError as error:  # e.g. raise_exception('System role not supported') inside the template
            raise TemplateRefused(str(error)) from None

    def render(self, system: str | None, turns: Sequence[Turn], add_generation_prompt: bool = False) -> list[Segment]:
        parts: list[Segment] = []
        done = ""
        for index, turn in enumerate(turns):
            if turn.role != "assistant":
                continue
            prompt = self._apply(system, turns[:index], add_generation_prompt=True)
            full = self._apply(system, turns[: index + 1], add_generation_prompt=False)
            if not prompt.startswith(done) or not full.startswith(prompt):
                raise ConfigError(
                    "the tokenizer's chat template rewrites earlier turns, so answer spans cannot be located; "
                    "set data.template to a named template (" + ", ".join(TEMPLATE_NAMES) + ")"
                )
            parts.append(Segment(prompt[len(done) :], False))
            parts.append(Segment(full[len(prompt) :], True, index))
            done = full
        if add_generation_prompt or not turns or turns[-1].role != "assistant":
            tail = self._apply(system, turns, add_generation_prompt=add_generation_prompt)
            parts.append(Segment(tail[len(done) :], False))
        return [p for p in parts if p.text or p.supervised]

    @property
    def stop_strings(self) -> tuple[str, ...]:
        eos = self.tokenizer.eos_token
        return (eos,) if eos else ()


def build_template(name: str | None, tokenizer: Any, custom: CustomTemplate | None = None) -> Template:
    """The template named by ``data.template``: ``None`` means the tokenizer's own, falling back to chatml."""
    eos = tokenizer.eos_token or ""
    bos = tokenizer.bos_token or ""
    if name is None:
        if getattr(tokenizer, "chat_template", None):
            return ChatTemplate(tokenizer)
        name = "chatml"
    if name == "custom":
        if custom is None:
            raise ConfigError("data.template: 'custom' needs a data.custom_template section")
        return StringTemplate(
            name="custom",
            system=custom.system,
            user=custom.user,
            assistant=custom.assistant,
            generation_prompt=custom.generation_prompt,
            default_system=custom.default_system,
            stop=("{eos}",),
            eos_token=eos,
            bos_token=bos,
        )
    if name not in NAMED_TEMPLATES:
        raise ConfigError(f"data.template: unknown template {name!r}; allowed values: {', '.join(TEMPLATE_NAMES)}")
    base = NAMED_TEMPLATES[name]
    return StringTemplate(**{**base.__dict__, "eos_token": eos, "bos_token": bos})
