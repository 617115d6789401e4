"""Offline fixtures: a tokenizer trained in a temp folder and tiny random Qwen2/Llama models saved there.

Everything is loaded back through ``from_pretrained``, the same path a user's real model takes.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tunelab.demo.tiny import save_tiny

ZH_EN = [
    "帮我把红色的卫衣加入购物车，要L码。",
    "Add two blue hoodies in size M to my cart.",
    "这款运动鞋还有货吗？",
    "What is the price of the black jacket?",
    "你好，请问今天发货吗？",
    '{"intent":"add_to_cart","params":{"color":"red","size":"L"}}',
]


def arithmetic_rows(n: int, seed: int = 0) -> list[dict]:
    """A learnable task: single-digit addition, half in Chinese."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        question = f"计算 {a} 加 {b}" if i % 2 else f"What is {a} plus {b}?"
        rows.append({"instruction": question, "input": "", "output": str(a + b)})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def corpus() -> list[str]:
    rows = arithmetic_rows(200)
    numbers = " ".join(str(i) for i in range(19))
    return ZH_EN * 20 + [json.dumps(r, ensure_ascii=False) for r in rows] + [numbers]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen2 model with a ChatML chat template in its tokenizer."""
    return save_tiny(tmp_path_factory.mktemp("qwen2"), corpus(), vocab_size=500, arch="qwen2")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("llama"), corpus(), vocab_size=500, arch="llama")


@pytest.fixture(scope="session")
def tokenizer(tiny_model: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture
def arithmetic_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "arith.jsonl", arithmetic_rows(96))
