"""Offline fixtures: a tokenizer trained in a temp folder and tiny random Qwen2/Llama models saved there.

Everything is loaded back through ``from_pretrained``, the same path a user's real model takes.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from tunelab.config.load import load_config
from tunelab.demo.tiny import save_tiny
from tunelab.train.run import run_training

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


def interrupted_copy(run_dir: Path, step: int, target: Path, logged_steps: int | None = None) -> Path:
    """``target`` as a run that died after writing ``checkpoint-{step}``: that checkpoint, and the first
    ``logged_steps`` lines of the run's metrics (default: ``step``; a run can log past its last checkpoint)."""
    target.mkdir()
    shutil.copytree(run_dir / f"checkpoint-{step}", target / f"checkpoint-{step}")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()[: step if logged_steps is None else logged_steps]
    (target / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return target


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


def shared_lora_run(tiny_model: Path, factory: pytest.TempPathFactory) -> Path:
    """The LoRA run that test_chat, test_export and test_serve share: the same folder and config in all three, so
    it is trained once per session. Named chatml template; after 45 steps it answers arithmetic with digits and stops
    (at 30 steps, with the tokenizer as trained, it still repeats a digit until the token limit)."""
    root = factory.getbasetemp() / "ship-lora"
    run = root / "run"
    if (run / "adapter_model.safetensors").is_file():
        return run
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    data = write_jsonl(root / "train.jsonl", arithmetic_rows(48))
    config = load_config(None, [
        f"model.name_or_path={tiny_model}", "model.dtype=fp32", f"data.datasets=[{{path: '{data}'}}]",
        f"train.output_dir={run}", "data.template=chatml", "train.learning_rate=1e-2", "method.name=lora",
        "method.lora.rank=4", "method.lora.dropout=0.0", "train.max_steps=45", "train.per_device_train_batch_size=8",
        "train.report_to=none", "train.save_steps=1000",
    ])
    return run_training(config).output_dir


def prompt_adapter_with_random_tokens(tiny_model: Path, method: str) -> torch.nn.Module:
    """A prompt-learning (or IA3) adapter on the tiny model whose trainable weights are pushed far from their
    initial values, so that the virtual tokens visibly change the outputs; in eval mode."""
    from tunelab.models.load import load_model
    from tunelab.models.methods import apply_method

    config = load_config(None, [f"model.name_or_path={tiny_model}", "model.dtype=fp32", f"method.name={method}",
                                "method.prefix.num_virtual_tokens=4", "method.ptuning.num_virtual_tokens=4",
                                "method.prompt_tuning.num_virtual_tokens=4", "method.ptuning.encoder_hidden_size=32"])
    torch.manual_seed(0)
    model = apply_method(load_model(config.model), config.method)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param))
    return model.eval()
