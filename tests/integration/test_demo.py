"""`tunelab demo` plumbing on a smaller budget (the full demo trains for minutes; its settings are the module's)."""

import io

import pytest
from rich.console import Console

import tunelab.demo.run as demo
from tunelab.errors import RunError


def test_demo_runs_end_to_end_and_prints_the_before_after_table(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "TINY_MODEL", {"hidden_size": 64, "num_layers": 1, "num_heads": 4, "num_kv_heads": 2})
    monkeypatch.setattr(demo, "TINY_TRAINING", [
        "method.name=full", "train.learning_rate=3e-3", "train.max_steps=20", "train.per_device_train_batch_size=8",
        "data.cutoff_len=128", "eval.max_new_tokens=12", "eval.batch_size=32", "eval.probe_max_samples=8",
        "eval.max_samples=16",
    ])
    buffer = io.StringIO()
    assert demo.run_demo(tmp_path / "w", console=Console(file=buffer, width=200)) == 0
    out = buffer.getvalue()
    assert "before and after fine-tuning" in out and "base 3-shot" in out and "fine-tuned" in out
    assert "exact_match" in out and "reference loss" in out
    run = tmp_path / "w" / "run"
    for name in ("model.safetensors", "eval/report/comparison.md", "eval/report/comparison.html",
                 "eval/probe/base/metrics.json", "test.jsonl"):
        assert (run / name).is_file(), name
    # a second demo in the same folder replaces the first run instead of refusing
    assert demo.run_demo(tmp_path / "w", console=Console(file=io.StringIO())) == 0


def test_demo_refuses_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(RunError, match="was not made by tunelab demo"):
        demo.run_demo(tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_demo_on_a_given_model_uses_lora(tmp_path, monkeypatch, tiny_model):
    monkeypatch.setattr(demo, "REAL_TRAINING", [
        "method.name=lora", "method.lora.rank=4", "train.max_steps=4", "train.per_device_train_batch_size=8",
        "data.cutoff_len=128", "eval.max_new_tokens=8", "eval.max_samples=8", "eval.probe_max_samples=4",
    ])
    buffer = io.StringIO()
    assert demo.run_demo(tmp_path / "w", model=str(tiny_model), console=Console(file=buffer, width=200)) == 0
    run = tmp_path / "w" / "run"
    assert (run / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "w" / "tiny-model").exists()
    assert "LoRA fine-tuning of" in buffer.getvalue()
