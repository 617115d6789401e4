"""`tunelab chat` as users run it: a subprocess with a conversation piped to its standard input."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import shared_lora_run
from tunelab.data.record import Record, Turn
from tunelab.evaluate.generate import GenerationSettings, generate_answers, load_for_eval
from tunelab.serve.chat import run_chat
from tunelab.serve.generation import SamplingOptions

QUESTIONS = ("What is 2 plus 3?", "计算 4 加 5", "What is 7 plus 1?")




@pytest.fixture(scope="module")
def chat_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_lora_run(tiny_model, tmp_path_factory)


def expected_answers(model: Path, run: Path, system: str | None) -> list[str]:
    """Non-streamed greedy answers from evaluation's generate_answers, with the history chat keeps."""
    loaded = load_for_eval(str(model), str(run))
    settings = GenerationSettings(max_new_tokens=16, batch_size=1)
    first = next(generate_answers(loaded, [Record((Turn("user", QUESTIONS[0]),), system)], settings))[1]
    history = (Turn("user", QUESTIONS[0]), Turn("assistant", first), Turn("user", QUESTIONS[1]))
    second = next(generate_answers(loaded, [Record(history, system)], settings))[1]
    # after /reset the third question is asked with no history
    third = next(generate_answers(loaded, [Record((Turn("user", QUESTIONS[2]),), system)], settings))[1]
    return [first, second, third]


def test_piped_conversation_streams_the_same_answers_as_generation(tiny_model, chat_run):
    conversation = f"{QUESTIONS[0]}\n{QUESTIONS[1]}\n/reset\n\n{QUESTIONS[2]}\n/exit\nnever asked\n"
    result = subprocess.run(
        [sys.executable, "-m", "tunelab.cli", "chat", "--model", str(tiny_model), "--adapter", str(chat_run),
         "--system", "You add numbers.", "--max-new-tokens", "16"],
        input=conversation, capture_output=True, text=True, timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"})
    assert result.returncode == 0, result.stderr[-2000:]
    want = expected_answers(tiny_model, chat_run, "You add numbers.")
    assert result.stdout.splitlines() == want
    assert all(want)  # the adapter answers every question
    assert "(history cleared)" in result.stderr and "template chatml" in result.stderr


def test_prompts_hold_the_history_until_reset_and_answers_stream(tiny_model, chat_run, monkeypatch):
    from tunelab.data.tokenize import encode_prompt
    from tunelab.serve import chat

    loaded = load_for_eval(str(tiny_model), str(chat_run))
    prompts: list[list[int]] = []
    pieces: list[str] = []
    real = chat.generate_stream

    def recording(model, tokenizer, ids, *args, **kwargs):
        prompts.append(list(ids))
        return real(model, tokenizer, ids, *args, **kwargs)

    class Recording(io.StringIO):
        def write(self, text: str) -> int:
            pieces.append(text)
            return super().write(text)

    monkeypatch.setattr(chat, "generate_stream", recording)
    output, notes = Recording(), io.StringIO()
    questions = io.StringIO(f"{QUESTIONS[0]}\n/help\n{QUESTIONS[1]}\n/reset\n{QUESTIONS[2]}\n")
    answers = run_chat(loaded, SamplingOptions(max_new_tokens=16), system="S", input=questions, output=output,
                       notes=notes, interactive=False)
    first, second, third = output.getvalue().splitlines()
    assert answers == 3
    turns = [Turn("user", QUESTIONS[0]), Turn("assistant", first), Turn("user", QUESTIONS[1])]
    assert prompts == [encode_prompt(loaded.template, loaded.tokenizer, "S", turns[:1]),
                       encode_prompt(loaded.template, loaded.tokenizer, "S", turns),
                       encode_prompt(loaded.template, loaded.tokenizer, "S", [Turn("user", QUESTIONS[2])])]
    assert "/reset" in notes.getvalue() and "(history cleared)" in notes.getvalue()
    assert len([p for p in pieces if p.strip()]) >= 2, pieces  # written piece by piece, not at the end


def test_long_history_drops_the_oldest_exchanges(tiny_model):
    from tunelab.serve.chat import Conversation

    loaded = load_for_eval(str(tiny_model))
    conversation = Conversation(None, [Turn("user", "x " * 200), Turn("assistant", "y " * 200)])
    ids, dropped = conversation.prompt_ids(loaded, "hi", budget=50)
    assert dropped == 1 and len(ids) <= 50
