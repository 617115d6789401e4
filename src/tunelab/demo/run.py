"""``tunelab demo``: the whole path on bundled data, offline, in a few minutes on a laptop CPU.

Without ``--model`` it builds a tiny Qwen2-architecture model from random weights and a tokenizer trained on
the bundled corpus. A model that starts from random weights knows no language, so the demo trains it with full
fine-tuning (adapters on a random base would only learn to steer noise) at a high learning rate for several
epochs. With ``--model`` it fine-tunes a real model with LoRA, the method such a user would pick first.
"""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tunelab.config.load import load_config
from tunelab.demo.tiny import save_tiny
from tunelab.errors import RunError
from tunelab.train.run import run_training
from tunelab.workflow import evaluate_after_training

MARKER = ".tunelab-demo"
DEMO_DATA = "demo_sft.jsonl"
TINY_MODEL = {"hidden_size": 256, "num_layers": 4, "num_heads": 8, "num_kv_heads": 2, "intermediate_size": 682}
TINY_TRAINING = [
    "method.name=full", "train.learning_rate=2e-3", "train.num_train_epochs=12", "train.warmup_ratio=0.05",
    "train.per_device_train_batch_size=16", "train.weight_decay=0.01", "data.cutoff_len=256",
    "eval.max_new_tokens=64", "eval.batch_size=32", "eval.probe_max_samples=60",
]
REAL_TRAINING = [
    "method.name=lora", "method.lora.rank=16", "method.lora.alpha=32", "train.learning_rate=2e-4",
    "train.num_train_epochs=2", "train.per_device_train_batch_size=4", "data.cutoff_len=512",
    "eval.max_new_tokens=96", "eval.batch_size=8", "eval.probe_max_samples=100",
]
SHOWN_METRICS = ("exact_match", "intent_correct", "param_f1", "json_valid", "correct", "rougeL", "bleu")


def prepare_workdir(workdir: Path) -> None:
    """A fresh demo folder; an existing one is reused only if an earlier demo made it."""
    if workdir.exists() and any(workdir.iterdir()) and not (workdir / MARKER).exists():
        raise RunError(f"--workdir {workdir} exists and was not made by tunelab demo; choose an empty folder")
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / MARKER).write_text("made by tunelab demo; safe to delete\n", "utf-8")
    shutil.rmtree(workdir / "run", ignore_errors=True)


def bundled(name: str) -> Path:
    return Path(str(resources.files("tunelab.resources").joinpath(name)))


def run_demo(workdir: Path, *, model: str | None = None, console: Console | None = None) -> int:
    console = console or Console(stderr=True)
    prepare_workdir(workdir)
    data = workdir / DEMO_DATA
    shutil.copyfile(bundled(DEMO_DATA), data)
    if model is None:
        console.print("[bold]demo[/]: building a tiny Qwen2-architecture model (random weights) and training a "
                      "tokenizer on the bundled corpus")
        corpus = bundled("demo_corpus.txt").read_text("utf-8").splitlines()
        model = str(save_tiny(workdir / "tiny-model", corpus, vocab_size=3000, **TINY_MODEL))
        console.print("method: full fine-tuning, lr 2e-3, 12 epochs: a randomly initialised model has to learn "
                      "everything from the task data, which adapters on a frozen random base cannot do")
        training = TINY_TRAINING
    else:
        console.print(f"[bold]demo[/]: LoRA fine-tuning of {model}")
        training = REAL_TRAINING
    config = load_config(None, [
        f"model.name_or_path={model}", f"data.datasets=[{{path: '{data.as_posix()}'}}]", "data.test_size=0.1",
        "data.val_size=0.05", f"train.output_dir={(workdir / 'run').as_posix()}", "train.logging_steps=10",
        "train.eval_steps=100", "train.save_steps=100000", "eval.after_training=true", "eval.fewshot_k=3",
        *training,
    ])
    result = run_training(config, console)
    evaluate_after_training(config, console, result.train_records)
    print_table(console, result.output_dir / "eval")
    console.print(f"run folder: {result.output_dir}; report: {result.output_dir / 'eval' / 'report' / 'comparison.md'}")
    return 0


def print_table(console: Console, eval_dir: Path) -> None:
    columns = [d for d in (eval_dir / "base", eval_dir / "fewshot", eval_dir / "finetuned") if d.is_dir()]
    metrics = [json.loads((d / "metrics.json").read_text("utf-8")) for d in columns]
    table = Table(title="held-out test split: before and after fine-tuning")
    table.add_column("metric")
    for m in metrics:
        table.add_column(m["label"], justify="right")
    for name in SHOWN_METRICS:
        if any(name in m["overall"] for m in metrics):
            table.add_row(name, *(_fmt(m["overall"].get(name)) for m in metrics))
    table.add_row("reference loss", *(_fmt(m.get("ref_loss")) for m in metrics))
    console.print(table)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
