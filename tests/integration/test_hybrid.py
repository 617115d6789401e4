"""``method.name: hybrid``: full fine-tuning, then LoRA on the fully tuned weights; the switch, and resume across it."""

from __future__ import annotations

import gc
import json
import shutil
import weakref
from pathlib import Path

import torch
from transformers import TrainerCallback

from tunelab.config.load import load_config
from tunelab.evaluate.generate import load_for_eval
from tunelab.models.load import load_model
from tunelab.models.methods import finetuned_model
from tunelab.train.run import run_training


def config_for(model: Path, data: Path, out: Path, *extra: str):
    return load_config(None, [
        f"model.name_or_path={model}", "model.dtype=fp32", f"data.datasets=[{{path: '{data}'}}]",
        f"train.output_dir={out}", "method.name=hybrid", "train.logging_steps=1", "train.save_steps=1000",
        "train.report_to=none", "train.learning_rate=3e-3", "train.per_device_train_batch_size=8",
        "train.lr_scheduler_type=cosine", "train.warmup_ratio=0.2", "method.lora.dropout=0.0", *extra,
    ])


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in metrics(run_dir) if "loss" in r]


def expected_learning_rates(steps: int, warmup: int, peak: float) -> list[float]:
    """The rate each step of one cosine schedule over the whole run uses (what HF logs at that step)."""
    from transformers import get_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=warmup, num_training_steps=steps)
    rates = []
    for _ in range(steps):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return rates


class PhaseOneOptimizerFreed(TrainerCallback):
    """At the LoRA phase's start, phase 1's optimizer (its moments, and any fp32 master weights) must be gone."""

    def __init__(self) -> None:
        self.phase_one: list[weakref.ref] = []
        self.freed: bool | None = None

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        if not self.phase_one:
            inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper around the torch optimizer
            self.phase_one = [weakref.ref(inner), *(weakref.ref(t) for g in inner.param_groups for t in g["params"])]
            return
        gc.collect()
        self.freed = all(ref() is None for ref in self.phase_one)


def test_switch_happens_at_its_step_then_only_adapters_train(tiny_model, arithmetic_file, tmp_path):
    config = config_for(tiny_model, arithmetic_file, tmp_path / "run", "train.max_steps=6",
                        "method.hybrid.full_fraction=0.5")
    original = {name: p.detach().clone() for name, p in load_model(config.model).named_parameters()}
    freed = PhaseOneOptimizerFreed()
    result = run_training(config, extra_callbacks=[freed])
    assert freed.freed is False  # phase 1 trained the model's own fp32 weights, which phase 2 keeps (frozen)
    assert freed.phase_one[0]() is None  # but its optimizer, with its moments, is gone
    run = result.output_dir

    switches = [r for r in metrics(run) if r.get("event") == "hybrid_switch"]
    assert [s["step"] for s in switches] == [3] and result.summary["hybrid"]["switch_step"] == 3
    assert switches[0]["trainable_parameters"] < switches[0]["full_phase_trainable_parameters"]
    assert (run / "checkpoint-3" / "model.safetensors").is_file()  # phase 1's last checkpoint holds full weights

    # Phase 1 changed every weight; phase 2 changed none of them, only the adapters.
    switched = {name: p for name, p in load_model(config.model, str(run / "hybrid-base")).named_parameters()}
    assert all(not torch.equal(switched[name], p) for name, p in original.items())
    frozen = {n.replace(".base_layer", ""): p for n, p in result.model.get_base_model().named_parameters()
              if not p.requires_grad}
    assert frozen.keys() == switched.keys()
    assert all(torch.equal(frozen[name], switched[name]) for name in switched)
    trainable = {n: p for n, p in result.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.abs().sum() > 0 for n, p in trainable.items() if "lora_B" in n)

    # One learning-rate schedule across both phases, continued from the global step.
    logged = [r["learning_rate"] for r in metrics(run) if "loss" in r]
    assert len(logged) == 6
    assert max(abs(a - b) for a, b in zip(logged, expected_learning_rates(6, 2, 3e-3), strict=True)) < 1e-9
    assert len(losses(run)) == 6 and result.summary["steps"] == 6

    # The artefact: the adapter at the top, the full weights it applies to in hybrid-base/.
    assert (run / "adapter_model.safetensors").is_file() and not (run / "hybrid-switch").exists()
    model_path, adapter_path = finetuned_model("hybrid", str(tiny_model), run)
    loaded = load_for_eval(model_path, adapter_path)
    ids = torch.tensor([loaded.tokenizer.encode("What is 3 plus 4?")])
    result.model.eval()
    with torch.no_grad():
        assert torch.allclose(result.model(input_ids=ids).logits, loaded.model(input_ids=ids).logits, atol=1e-5)


def test_resume_across_the_switch_reproduces_the_uninterrupted_run(tiny_model, arithmetic_file, tmp_path):
    extra = ("train.max_steps=4", "method.hybrid.full_fraction=0.5", "train.save_steps=1",
             "train.save_total_limit=20", "method.lora.dropout=0.1")
    whole = run_training(config_for(tiny_model, arithmetic_file, tmp_path / "whole", *extra)).output_dir
    assert [r["step"] for r in metrics(whole) if r.get("event") == "hybrid_switch"] == [2]
    expected = losses(whole)
    assert len(expected) == 4

    # before the switch (full weights), at it (phase 1's last checkpoint), after it (adapter on hybrid-base/)
    for checkpoint in ("checkpoint-1", "checkpoint-2", "checkpoint-3"):
        partial = tmp_path / f"from-{checkpoint}"
        partial.mkdir()
        shutil.copytree(whole / checkpoint, partial / checkpoint)
        if checkpoint == "checkpoint-3":
            shutil.copytree(whole / "hybrid-base", partial / "hybrid-base")
        shutil.copy(whole / "metrics.jsonl", partial / "metrics.jsonl")  # later entries are dropped on resume
        run_training(config_for(tiny_model, arithmetic_file, partial, *extra, "train.resume=true"))
        resumed = losses(partial)
        assert len(resumed) == 4, checkpoint
        assert max(abs(a - b) for a, b in zip(expected, resumed, strict=True)) < 1e-5, (checkpoint, expected, resumed)
        assert [r["step"] for r in metrics(partial) if r.get("event") == "hybrid_switch"] == [2]


def test_switch_under_two_process_ddp(tiny_model, arithmetic_file, tmp_path):
    """Each rank switches its own replica; rank 0 alone writes hybrid-base/, the switch checkpoint and the log."""
    import os
    import subprocess
    import sys

    run = tmp_path / "run"
    config = tmp_path / "c.yaml"
    config.write_text(
        f"model: {{name_or_path: '{tiny_model}', dtype: fp32}}\n"
        f"data: {{datasets: [{{path: '{arithmetic_file}'}}], test_size: 8, val_size: 0}}\n"
        "method: {name: hybrid, hybrid: {full_fraction: 0.5}, lora: {rank: 4, dropout: 0.0}}\n"
        f"train: {{output_dir: '{run}', max_steps: 4, logging_steps: 1, report_to: none, learning_rate: 0.003,"
        " per_device_train_batch_size: 4, save_steps: 1000}\n", encoding="utf-8")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "-m", "tunelab.cli", "train", str(config)],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["step"] for r in metrics(run) if r.get("event") == "hybrid_switch"] == [2]
    assert [r["step"] for r in metrics(run) if "loss" in r] == [1, 2, 3, 4]  # one writer
    assert (run / "hybrid-base" / "model.safetensors").is_file() and (run / "hybrid-base" / "config.json").is_file()
    assert (run / "adapter_model.safetensors").is_file() and not (run / "hybrid-switch").exists()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["hybrid"]["switch_step"] == 2


def test_hybrid_with_master_weights_in_the_optimizer_switches_and_resumes(tiny_model, arithmetic_file, tmp_path):
    """Phase 1 trains bf16 weights with fp32 masters; the LoRA phase (fp32 adapters) needs none; resume is exact."""
    from tunelab.train.master_weights import MASTER_FILE

    extra = ("train.max_steps=4", "method.hybrid.full_fraction=0.5", "train.save_steps=1", "model.dtype=bf16",
             "train.save_total_limit=20", "train.master_weights=optimizer")
    freed = PhaseOneOptimizerFreed()
    result = run_training(config_for(tiny_model, arithmetic_file, tmp_path / "whole", *extra), extra_callbacks=[freed])
    assert freed.freed  # phase 1's optimizer and its fp32 masters (the tensors it updated) are gone
    whole = result.output_dir
    assert [r["step"] for r in metrics(whole) if r.get("event") == "hybrid_switch"] == [2]
    assert (whole / "checkpoint-1" / MASTER_FILE).is_file() and not (whole / "checkpoint-3" / MASTER_FILE).exists()
    assert all(p.dtype == torch.float32 for n, p in result.model.named_parameters() if p.requires_grad)
    expected = losses(whole)
    for checkpoint in ("checkpoint-1", "checkpoint-3"):
        partial = tmp_path / f"from-{checkpoint}"
        partial.mkdir()
        shutil.copytree(whole / checkpoint, partial / checkpoint)
        if checkpoint == "checkpoint-3":
            shutil.copytree(whole / "hybrid-base", partial / "hybrid-base")
        shutil.copy(whole / "metrics.jsonl", partial / "metrics.jsonl")
        run_training(config_for(tiny_model, arithmetic_file, partial, *extra, "train.resume=true"))
        assert losses(partial) == expected, checkpoint
