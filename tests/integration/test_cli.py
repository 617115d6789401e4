"""The CLI as users run it: a subprocess, its exit code, its output and the files it writes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tunelab.train.allocator import plan_allocator

TUNELAB = [sys.executable, "-m", "tunelab.cli"]


def tunelab(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*TUNELAB, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env)


def write_config(path: Path, model: Path, data: Path, out: Path, **sections: str) -> Path:
    path.write_text(
        f"model: {{name_or_path: '{model}'}}\n"
        f"data: {{datasets: [{{path: '{data}'}}], test_size: 8, val_size: 4}}\n"
        f"method: {{name: lora, lora: {{rank: 4}}}}\n"
        f"train: {{output_dir: '{out}', max_steps: 6, logging_steps: 1, report_to: none, learning_rate: 0.003}}\n"
        f"eval: {{max_new_tokens: 8, fewshot_k: 2, probe_max_samples: 6}}\n",
        encoding="utf-8",
    )
    return path


def test_version_and_help():
    result = tunelab("--version")
    assert result.returncode == 0 and result.stdout.startswith("tunelab ")
    for command in (["train"], ["data", "preview"], ["data", "tokenize"], ["eval"], ["compare"], ["demo"]):
        shown = tunelab(*command, "--help")
        assert shown.returncode == 0 and "usage: tunelab" in shown.stdout, command


def test_bad_config_value_exits_2_before_loading_anything(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model: {name_or_path: /does/not/exist}\nmethod: {name: lorra}\n")
    result = tunelab("train", str(config))
    assert result.returncode == 2
    assert ("method.name: got 'lorra' (did you mean 'lora'?); allowed values: 'full', 'freeze', 'lora', 'dora', "
            "'qlora',") in result.stderr
    assert "Traceback" not in result.stderr
    typo = tunelab("train", str(config), "method.name=lora", "train.lerning_rate=1")
    assert typo.returncode == 2 and "did you mean 'train.learning_rate'" in typo.stderr


def test_bad_arguments_exit_2():
    assert tunelab("eval", "--model", "x").returncode == 2
    assert tunelab("frobnicate").returncode == 2
    # checked when the arguments are read, not after a model has loaded or a merge has run
    shard = tunelab("export", "--adapter", "no-run", "-o", "out", "--max-shard-size", "banana")
    assert shard.returncode == 2 and "--max-shard-size: expected a whole number and a unit" in shard.stderr
    device = tunelab("chat", "--model", "no-model", "--device", "cudaX")
    assert device.returncode == 2 and "--device: expected auto, cpu, cuda or cuda:N, got 'cudaX'" in device.stderr
    import torch

    if not torch.cuda.is_available():
        missing = tunelab("chat", "--model", "no-model", "--device", "cuda")
        assert missing.returncode == 2 and "no CUDA GPU is visible on this machine" in missing.stderr


def test_bad_data_names_file_line_and_field(tmp_path, tiny_model):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"instruction": "hi", "output": "ok"}\n{"instruction": "hi", "output": ""}\n', "utf-8")
    config = write_config(tmp_path / "c.yaml", tiny_model, data, tmp_path / "run")
    result = tunelab("data", "preview", str(config))
    assert result.returncode == 1
    assert f"{data}:2: output: empty answer" in result.stderr


def test_preview_and_tokenize(tmp_path, tiny_model, arithmetic_file):
    config = write_config(tmp_path / "c.yaml", tiny_model, arithmetic_file, tmp_path / "run")
    preview = tunelab("data", "preview", str(config), "--n", "2")
    assert preview.returncode == 0, preview.stderr
    assert preview.stdout.count("⟦") == 2 and "supervised" in preview.stdout and "tokens" in preview.stdout
    out = tmp_path / "tok.jsonl"
    tok = tunelab("data", "tokenize", str(config), "-o", str(out))
    assert tok.returncode == 0, tok.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 84  # 96 - 8 test - 4 validation
    assert all(-100 in r["labels"] and len(r["labels"]) == len(r["input_ids"]) for r in rows)
    assert all(r["source"].startswith(str(arithmetic_file) + ":") for r in rows)


def test_tokenize_adds_the_new_special_tokens_as_training_does(tmp_path, tiny_model):
    data = tmp_path / "calc.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"算 {i}+1", "output": f"<calc>{i}+1</calc> {i + 1}"},
                                       ensure_ascii=False) + "\n" for i in range(20)), "utf-8")
    config = write_config(tmp_path / "c.yaml", tiny_model, data, tmp_path / "run")
    config.write_text(config.read_text("utf-8").replace(
        "model: {", "model: {new_special_tokens: ['<calc>', '</calc>'], "), "utf-8")
    out = tmp_path / "tok.jsonl"
    tok = tunelab("data", "tokenize", str(config), "-o", str(out))
    assert tok.returncode == 0, tok.stderr
    from transformers import AutoTokenizer

    vocabulary = len(AutoTokenizer.from_pretrained(tiny_model))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all({vocabulary, vocabulary + 1} <= set(r["input_ids"]) for r in rows)  # one id each, as in training


def test_train_eval_compare_end_to_end(tmp_path, tiny_model, arithmetic_file):
    run = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", tiny_model, arithmetic_file, run)
    trained = tunelab("train", str(config), "eval.after_training=true", f"eval.embedding_model={tmp_path / 'none'}")
    assert trained.returncode == 0, trained.stderr
    assert "embedding_cosine left out" in trained.stderr
    for name in ("adapter_model.safetensors", "summary.json", "loss_curve.png", "eval/report/comparison.md",
                 "eval/report/comparison.html", "eval/base/predictions.jsonl", "eval/fewshot/metrics.json",
                 "eval/finetuned/metrics.json", "eval/probe/finetuned/metrics.json"):
        assert (run / name).is_file(), name
    summary = json.loads((run / "summary.json").read_text())
    # `tunelab train` restarted itself with the allocator train.cpu_allocator=auto plans here, and it is mapped
    planned = plan_allocator("auto")
    assert summary["cpu_allocator"]["name"] == planned.name, summary["cpu_allocator"]
    if planned.library is not None:
        assert summary["cpu_allocator"]["reason"] == "preloaded by tunelab (train.cpu_allocator=auto)"
    # train.cpu_release_memory: the first batch is the largest so far, so a release came before it at least
    releases = summary["cpu_allocator"]["releases_before_largest_batch"]
    assert releases == 0 if planned.name == "mimalloc" else releases >= 1, summary["cpu_allocator"]
    layers = json.loads((tiny_model / "config.json").read_text())["num_hidden_layers"]
    assert summary["lean_activation_layers"] == layers and "lean activations: " in trained.stderr
    # train.checkpoint_long_batches (default): its reference, printed and kept
    long = summary["long_batches"]
    assert long["layers"] == layers and long["percentile"] == 90 and long["reference_tokens"] > 0
    assert f"a batch over {long['reference_tokens']:,} token slots (p90" in trained.stderr
    again = tunelab("train", str(config))
    assert again.returncode == 1 and "is not empty" in again.stderr

    out = tmp_path / "ev"
    evaluated = tunelab("eval", "--model", str(tiny_model), "--adapter", str(run), "--data", str(run / "test.jsonl"),
                        "-o", str(out), "--max-new-tokens", "6", "--label", "tuned", "--answer-kind", "label",
                        "--exact-match", "strict")
    assert evaluated.returncode == 0, evaluated.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 8 and "exact_match" in metrics["overall"] and metrics["ref_loss"] > 0
    assert metrics["scoring"] == {"answer_kind": "label", "exact_match": "strict"}
    assert set(metrics["groups"]) == {"label"}
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert {"prompt", "reference", "prediction", "scores"} <= set(rows[0])

    compared = tunelab("compare", str(run / "eval" / "base"), str(out), "-o", str(tmp_path / "cmp"))
    assert compared.returncode == 0, compared.stderr
    assert "tuned" in (tmp_path / "cmp" / "comparison.md").read_text()


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_saves_a_checkpoint_and_resume_finishes(tmp_path, tiny_model, arithmetic_file):
    run = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", tiny_model, arithmetic_file, run)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([*TUNELAB, "train", str(config), "train.max_steps=100000", "train.save_steps=100000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "checkpoint saved" in stderr and "train.resume=true" in stderr
    checkpoints = sorted(run.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "trainer_state.json").is_file()
    stopped_at = int(checkpoints[0].name.split("-")[1])
    resumed = tunelab("train", str(config), "train.resume=true", f"train.max_steps={stopped_at + 2}")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((run / "summary.json").read_text())["steps"] == stopped_at + 2


def test_two_process_ddp_on_cpu(tmp_path, tiny_model, arithmetic_file):
    """torchrun (or accelerate launch) runs the same command on every rank; rank 0 alone writes the run files."""
    run = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", tiny_model, arithmetic_file, run)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "-m", "tunelab.cli", "train", str(config), "train.max_steps=3"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3
    assert summary["data"]["train"]["samples"] == 84 and (run / "adapter_model.safetensors").is_file()
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in logged if "loss" in e] == [1, 2, 3]  # written once, by rank 0
