"""Streaming generation for one prompt: text deltas as tokens arrive, stop strings, cancellation, token counts.

Shared by ``tunelab chat`` and ``tunelab serve``; it needs only torch and transformers.

Everything happens in one ``StoppingCriteria`` (:class:`TokenStream`), which ``generate`` calls once per new token
with all ids so far. It decodes the new token incrementally, holds back text that could be the start of a stop
string (so a client never sees half of ``<|im_end|>`` or ``### Instruction:``), and ends generation at a stop
string, at an end-of-turn token, or when another thread sets the cancel event (a client went away). Being a
stopping criterion, the decision takes effect on the same step -- a streamer is called after the criteria, one
token too late to stop on.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from tunelab.models.methods.prompt import generate_with_virtual_tokens, uses_virtual_tokens

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(frozen=True)
class SamplingOptions:
    max_new_tokens: int = 256
    temperature: float = 0.0
    """0 decodes greedily; above 0 samples at this temperature."""
    top_p: float = 1.0
    min_new_tokens: int = 0
    stop: tuple[str, ...] = ()
    """Extra stop strings; the template's end of turn and the end-of-sequence tokens always stop."""
    seed: int | None = None
    """Seeds this answer's own random generator in the batching engine (``None``: a fresh random seed)."""


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    """Tokens the model generated, the stop token included (what the compute was spent on)."""
    finish_reason: FinishReason


class IncrementalDetokenizer:
    """Token ids in, text deltas out, such that the deltas join to ``decode(all ids)``.

    Decoding one token alone is wrong for byte-level BPE (a character can span tokens) and for tokenizers that
    strip a leading space, so each step decodes a short window of recent ids and emits what it adds to the window
    without the new token; text ending in U+FFFD (an incomplete UTF-8 sequence) waits for the next token.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def add(self, token: int) -> str:
        self.ids.append(token)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix) :]
        return ""

    def rest(self) -> str:
        """Text still held back at the end (an incomplete character decodes as U+FFFD, as in a full decode)."""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix) :]


class StopStringBuffer:
    """Accumulates text; releases what cannot be part of a stop string and finds the first stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(dict.fromkeys(s for s in stops if s))
        self.longest = max((len(s) for s in self.stops), default=0)
        self.text = ""
        self.sent = 0
        self.stopped = False

    def push(self, delta: str) -> str:
        """Add ``delta``; return the text now safe to show. After a stop string, ``stopped`` is set and the text
        ends before it."""
        if self.stopped:
            return ""
        start = max(self.sent, len(self.text) - self.longest + 1)
        self.text += delta
        hits = [i for i in (self.text.find(s, max(start, 0)) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
            return self.flush()
        safe = len(self.text) - self._partial_stop_length()
        out = self.text[self.sent : safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        return out

    def flush(self) -> str:
        out = self.text[self.sent :]
        self.sent = len(self.text)
        return out

    def _partial_stop_length(self) -> int:
        """Length of the longest end of the text that a stop string starts with."""
        for k in range(min(self.longest - 1, len(self.text)), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0


class TokenStream(StoppingCriteria):
    """The per-token hook: decode, hold back possible stop strings, call ``on_text``, and decide to stop.

    ``generate`` calls it as a stopping criterion; the batching engine (:mod:`tunelab.serve.batching`) calls
    :meth:`step` for each row itself.
    """

    def __init__(
        self, tokenizer: Any, *, eos_ids: Sequence[int], stops: Sequence[str], max_new_tokens: int,
        cancel: threading.Event, on_text: Callable[[str], None],
    ) -> None:
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.buffer = StopStringBuffer(stops)
        self.eos_ids = frozenset(eos_ids)
        self.max_new_tokens = max_new_tokens
        self.cancel = cancel
        self.on_text = on_text
        self.tokens = 0
        self.finish_reason: FinishReason | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        done = self.finish_reason is not None or self.step(int(input_ids[0, -1]))
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]

    def step(self, token: int) -> bool:
        """Take the next generated token; True when the answer is over (``finish_reason`` says why)."""
        self.tokens += 1
        if token in self.eos_ids:
            return self.finish("stop")
        self._emit(self.buffer.push(self.detokenizer.add(token)))
        if self.buffer.stopped:
            return self.finish("stop")
        if self.cancel.is_set():
            return self.finish("cancelled")
        if self.tokens >= self.max_new_tokens:
            return self.finish("length")
        return False

    def finish(self, reason: FinishReason) -> bool:
        """End the answer for ``reason``, releasing the text held back (unless a stop string cut it)."""
        self.finish_reason = reason
        if reason != "stop" or not self.buffer.stopped:
            self._emit(self.buffer.push(self.detokenizer.rest()))
            if not self.buffer.stopped:
                self._emit(self.buffer.flush())
        return True

    def _emit(self, text: str) -> None:
        if text:
            self.on_text(text)

    @property
    def text(self) -> str:
        return self.buffer.text


@torch.no_grad()
def generate_stream(
    model: Any, tokenizer: Any, prompt_ids: Sequence[int], options: SamplingOptions, *, eos_ids: Sequence[int],
    stops: Sequence[str], cancel: threading.Event | None = None, on_text: Callable[[str], None] = lambda _: None,
) -> Completion:
    """Generate one answer to ``prompt_ids``, calling ``on_text`` with each piece of text as it is decided.

    Blocks until done; run it in a thread to serve several clients. ``cancel`` ends it early (``cancelled``).
    """
    stream = TokenStream(tokenizer, eos_ids=eos_ids, stops=stops, max_new_tokens=options.max_new_tokens,
                         cancel=cancel or threading.Event(), on_text=on_text)
    device = next(model.parameters()).device
    input_ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    sampling = options.temperature > 0
    # Prompt-learning adapters generate through their own path (see tunelab.models.methods.prompt).
    generate = partial(generate_with_virtual_tokens, model) if uses_virtual_tokens(model) else model.generate
    generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=options.max_new_tokens,
        min_new_tokens=options.min_new_tokens or None,
        do_sample=sampling,
        temperature=options.temperature if sampling else None,
        top_p=options.top_p if sampling else None,
        eos_token_id=list(eos_ids) or None,
        pad_token_id=tokenizer.pad_token_id,
        stopping_criteria=StoppingCriteriaList([stream]),
    )
    if stream.finish_reason is None:  # generate ended without a step reaching the criteria (max_new_tokens 0)
        stream.finish("length")
    assert stream.finish_reason is not None
    return Completion(text=stream.text, prompt_tokens=len(prompt_ids), completion_tokens=stream.tokens,
                      finish_reason=stream.finish_reason)


def place_model(model: Any, device: str = "auto") -> Any:
    """Move ``model`` to ``device``; ``auto`` is the first CUDA GPU when there is one, else the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device)
