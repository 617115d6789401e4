"""``tunelab chat``: a streaming terminal conversation with a model, prompted exactly as it was trained.

Each turn encodes the whole conversation so far with :func:`tunelab.data.tokenize.encode_prompt` (the template
code training used) and streams the answer as it is generated. ``/reset`` forgets the history, ``/exit`` (or end
of input) quits, Ctrl-C during an answer stops that answer. Answers go to ``output``; prompts and notes go to
``notes``, so piping a conversation in and the answers out works.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TextIO

from tunelab.data.record import Turn
from tunelab.data.tokenize import encode_prompt
from tunelab.evaluate.generate import LoadedModel, stop_token_ids
from tunelab.serve.generation import Completion, SamplingOptions, generate_stream

COMMANDS = {"/reset": "forget the conversation so far", "/exit": "quit (so does end of input)",
            "/help": "show these commands"}


@dataclass
class Conversation:
    system: str | None
    turns: list[Turn] = field(default_factory=list)

    def prompt_ids(self, loaded: LoadedModel, question: str, budget: int | None) -> tuple[list[int], int]:
        """Ids asking for the answer to ``question`` after the history, and how many old exchanges were dropped to
        fit ``budget`` tokens (the oldest go first, as in training's truncation)."""
        turns = [*self.turns, Turn("user", question)]
        dropped = 0
        while True:
            ids = encode_prompt(loaded.template, loaded.tokenizer, self.system, turns)
            if budget is None or len(ids) <= budget or len(turns) == 1:
                return ids, dropped
            turns = turns[2:]
            dropped += 1


def context_budget(model: Any, max_new_tokens: int) -> int | None:
    """Prompt tokens that leave room for ``max_new_tokens`` in the model's context (``None``: no known limit)."""
    limit = getattr(model.config, "max_position_embeddings", None)
    return None if limit is None else max(limit - max_new_tokens, 1)


def run_chat(
    loaded: LoadedModel, options: SamplingOptions, *, system: str | None, input: TextIO, output: TextIO,
    notes: TextIO, interactive: bool,
) -> int:
    """The conversation loop; returns the number of answers given."""
    conversation = Conversation(system)
    stops = (*loaded.template.stop_strings, *options.stop, loaded.tokenizer.pad_token or "")
    eos_ids = stop_token_ids(loaded, options.stop)
    budget = context_budget(loaded.model, options.max_new_tokens)
    answers = 0
    while True:
        if interactive:
            notes.write("you> ")
            notes.flush()
        line = input.readline()
        if not line:
            break
        question = line.rstrip("\r\n")
        command = question.strip()
        if not command:
            continue
        if command == "/exit":
            break
        if command == "/reset":
            conversation.turns.clear()
            notes.write("(history cleared)\n")
            continue
        if command.startswith("/") and " " not in command:  # a command, not a question
            unknown = "" if command in COMMANDS else f"unknown command {command}; "
            notes.write(unknown + "commands:\n" + "".join(f"  {name:<7} {what}\n" for name, what in COMMANDS.items()))
            continue
        ids, dropped = conversation.prompt_ids(loaded, question, budget)
        if dropped:
            notes.write(f"(the {dropped} oldest exchange(s) no longer fit the context and were left out)\n")
        completion = _answer(loaded, ids, options, eos_ids, stops, output, notes)
        if completion is None:
            continue
        conversation.turns += [Turn("user", question), Turn("assistant", completion.text.strip())]
        answers += 1
        if completion.finish_reason == "length":
            notes.write(f"(answer cut at {options.max_new_tokens} tokens; raise --max-new-tokens)\n")
    return answers


def _answer(
    loaded: LoadedModel, ids: list[int], options: SamplingOptions, eos_ids: list[int], stops: tuple[str, ...],
    output: TextIO, notes: TextIO,
) -> Completion | None:
    started = False

    def show(text: str) -> None:
        nonlocal started
        if not started:  # the answer as shown starts at its first visible character, as in evaluation
            text = text.lstrip()
            started = bool(text)
        output.write(text)
        output.flush()

    try:
        completion = generate_stream(loaded.model, loaded.tokenizer, ids, options, eos_ids=eos_ids, stops=stops,
                                     on_text=show)
    except KeyboardInterrupt:
        output.write("\n")
        notes.write("(answer interrupted; not kept in the history)\n")
        return None
    output.write("\n")
    output.flush()
    return completion
