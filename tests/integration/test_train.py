import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import interrupted_copy
from tunelab.config.load import load_config
from tunelab.errors import RunError
from tunelab.models.load import load_model
from tunelab.train.run import run_training


def config_for(model: Path, data: Path, out: Path, *extra: str):
    return load_config(None, [
        f"model.name_or_path={model}", "model.dtype=fp32", f"data.datasets=[{{path: '{data}'}}]",
        f"train.output_dir={out}",
        "train.logging_steps=1", "train.save_steps=1000", "train.report_to=none", "train.learning_rate=3e-3",
        "train.per_device_train_batch_size=8", "train.lr_scheduler_type=constant", "method.lora.dropout=0.0",
        *extra,
    ])


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("method", ["full", "freeze", "lora", "dora"])
def test_method_lowers_loss_and_updates_only_what_it_trains(tiny_model, arithmetic_file, tmp_path, method):
    config = config_for(tiny_model, arithmetic_file, tmp_path / "run", f"method.name={method}", "train.max_steps=24",
                        "method.freeze.trainable_layers=1", "method.lora.rank=8",
                        # the freeze run checks the switch; the others, that glibc's heap (in-process) is released
                        f"train.cpu_release_memory={method != 'freeze'}")
    before = snapshot(load_model(config.model))
    result = run_training(config)
    curve = losses(result.output_dir)
    assert sum(curve[-4:]) / 4 < sum(curve[:4]) / 4 - 0.3, curve
    changed = set()
    for name, param in result.model.named_parameters():
        plain = name.removeprefix("base_model.model.").replace(".base_layer", "")
        if plain in before and not torch.equal(param.detach().cpu(), before[plain]):
            changed.add(name)
    trainable = {name for name, p in result.model.named_parameters() if p.requires_grad}
    if method in ("lora", "dora"):
        assert not changed, f"base weights changed under {method}: {sorted(changed)[:3]}"
        assert trainable and all("lora_" in n for n in trainable)
        lora_b = [p for n, p in result.model.named_parameters() if "lora_B" in n]
        assert all(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: non-zero means it trained
        assert (result.output_dir / "adapter_model.safetensors").is_file()
    else:
        assert changed == trainable
        if method == "freeze":
            assert all(".layers.1." in n for n in changed)
        assert (result.output_dir / "model.safetensors").is_file()
    for name in ("config.yaml", "metrics.jsonl", "loss_curve.png", "summary.json", "test.jsonl",
                 "tokenizer_config.json"):
        assert (result.output_dir / name).is_file(), name
    summary = json.loads((result.output_dir / "summary.json").read_text())
    releases = summary["cpu_allocator"]["releases_before_largest_batch"]
    assert releases == 0 if method == "freeze" else releases >= 1, summary["cpu_allocator"]
    assert summary["steps"] == 24 and summary["supervised_tokens_seen"] > 0
    assert summary["tokens_seen"] > summary["supervised_tokens_seen"]


@pytest.mark.parametrize("method", [
    ("method.name=lora", "method.lora.dropout=0.1"),
    # peft's adapter file holds P-tuning's output embeddings only; the encoder (MLP) comes from its own file
    ("method.name=ptuning", "method.ptuning.num_virtual_tokens=4", "method.ptuning.encoder_hidden_size=16",
     "train.learning_rate=0.05"),
], ids=["lora", "ptuning"])
def test_resume_reproduces_the_uninterrupted_run(tiny_model, arithmetic_file, tmp_path, method):
    extra = (*method, "train.max_steps=10", "train.save_steps=4", "train.lr_scheduler_type=cosine",
             "train.warmup_ratio=0.2")
    whole = run_training(config_for(tiny_model, arithmetic_file, tmp_path / "a", *extra))
    # the interrupted run had also logged steps 5 and 6 before it died
    partial = interrupted_copy(whole.output_dir, 4, tmp_path / "b", logged_steps=6)
    run_training(config_for(tiny_model, arithmetic_file, partial, *extra, "train.resume=true"))
    a, b = losses(whole.output_dir), losses(partial)
    assert len(a) == len(b) == 10
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-5


def test_gradient_accumulation_matches_a_big_batch(tiny_model, arithmetic_file, tmp_path):
    common = ("method.name=full", "train.max_steps=2", "train.learning_rate=1e-3", "data.cutoff_len=64")
    big = run_training(config_for(tiny_model, arithmetic_file, tmp_path / "big", *common,
                                  "train.per_device_train_batch_size=8", "train.gradient_accumulation_steps=1"))
    small = run_training(config_for(tiny_model, arithmetic_file, tmp_path / "small", *common,
                                    "train.per_device_train_batch_size=1", "train.gradient_accumulation_steps=8"))
    for (name, p), (_, q) in zip(big.model.named_parameters(), small.model.named_parameters(), strict=True):
        assert torch.allclose(p.cpu(), q.cpu(), atol=1e-5), name
    assert abs(losses(big.output_dir)[0] - losses(small.output_dir)[0]) < 1e-5


def test_refuses_to_overwrite_and_needs_a_checkpoint_to_resume(tiny_model, arithmetic_file, tmp_path):
    out = tmp_path / "used"
    out.mkdir()
    (out / "something").write_text("x")
    with pytest.raises(RunError, match="is not empty; pass train.resume=true"):
        run_training(config_for(tiny_model, arithmetic_file, out, "train.max_steps=1"))
    with pytest.raises(RunError, match="no complete checkpoint-N folder"):
        run_training(config_for(tiny_model, arithmetic_file, out, "train.max_steps=1", "train.resume=true"))


def test_nonfinite_loss_stops_the_run(tiny_model, arithmetic_file, tmp_path):
    from transformers import AutoModelForCausalLM

    broken = tmp_path / "broken"
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    model.save_pretrained(broken)
    shutil.copy(tiny_model / "tokenizer.json", broken)
    shutil.copy(tiny_model / "tokenizer_config.json", broken)
    with pytest.raises(RunError, match="training loss became nan at step 1"):
        run_training(config_for(broken, arithmetic_file, tmp_path / "run", "train.max_steps=3", "method.name=full"))


def test_bf16_keeps_fp32_master_weights_for_trained_parameters(tiny_model, arithmetic_file, tmp_path, monkeypatch):
    from tunelab.train import run as run_module

    # train.master_weights=auto keeps the fp32 copies in the model where no CUDA GPU is seen (bf16 weights train
    # slower on a CPU); pinned to "no GPU" so that the test asks the same on a GPU machine
    monkeypatch.setattr(run_module.torch.cuda, "device_count", lambda: 0)
    result = run_training(config_for(tiny_model, arithmetic_file, tmp_path / "run", "model.dtype=bf16",
                                     "method.name=freeze", "method.freeze.trainable_layers=1", "train.max_steps=3"))
    dtypes = {p.dtype for p in result.model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in result.model.parameters() if not p.requires_grad}
    assert dtypes == {torch.float32} and frozen == {torch.bfloat16}
    assert all(torch.isfinite(torch.tensor(x)) for x in losses(result.output_dir))
    assert result.summary["master_weights"]["in"] == "params"
    assert result.summary["master_weights"]["reason"].startswith("auto: no CUDA GPU")


def test_auto_master_weights_on_one_gpu_keep_bf16_weights_with_fp32_copies(tiny_model, arithmetic_file, tmp_path,
                                                                          monkeypatch):
    from tunelab.train import run as run_module
    from tunelab.train.master_weights import MASTER_FILE, decide_master_weights

    # What `auto` decides on one CUDA GPU, run on this CPU: the wiring from the decision to the Trainer
    monkeypatch.setattr(run_module, "decide_master_weights",
                        lambda *a, **k: decide_master_weights(*a, **{**k, "cuda_devices": 1}))
    result = run_training(config_for(tiny_model, arithmetic_file, tmp_path / "run", "model.dtype=bf16",
                                     "method.name=full", "train.max_steps=2", "train.save_steps=2"))
    assert result.summary["master_weights"]["in"] == "optimizer"
    assert result.summary["master_weights"]["reason"].startswith("auto: bf16 on one CUDA GPU")
    assert {p.dtype for p in result.model.parameters()} == {torch.bfloat16}
    assert (result.output_dir / "checkpoint-2" / MASTER_FILE).is_file() and result.summary["did_it_train"]["ok"]
    lora = run_training(config_for(tiny_model, arithmetic_file, tmp_path / "lora", "model.dtype=bf16",
                                   "method.name=lora", "train.max_steps=1"))
    assert lora.summary["master_weights"]["in"] == "none"  # adapters are fp32: nothing to copy


def test_summary_reports_throughput(tiny_model, arithmetic_file, tmp_path):
    import io

    from rich.console import Console

    printed = io.StringIO()
    # logging_steps longer than the run: the first and last steps are logged all the same, so every check runs
    result = run_training(config_for(tiny_model, arithmetic_file, tmp_path / "run", "train.max_steps=6",
                                     "train.logging_steps=10"), console=Console(file=printed, width=300))
    summary = result.summary
    assert summary["tokens_per_s"] > 0 and summary["steady_tokens_per_s"] > 0
    assert 0 < summary["median_step_s"] <= summary["p90_step_s"]
    assert summary["train_step_time_s"] <= summary["wall_time_s"]
    assert summary["peak_cpu_rss_mb"] > 0
    assert (f"step time: median {summary['median_step_s']:.3g} s, p90 {summary['p90_step_s']:.3g} s after 3 warm-up "
            f"steps; peak memory: CPU RSS {summary['peak_cpu_rss_mb']:,.0f} MB") in printed.getvalue()
    checks = summary["did_it_train"]
    assert len(losses(result.output_dir)) == 2 and checks["unchecked"] == []
    assert checks["grad_norm_above_zero"] and checks["loss_fell"] is not None


def test_long_batch_checkpointing_says_what_it_does(tiny_model, arithmetic_file, tmp_path, monkeypatch):
    """The printed line matches what the trainer does: freeze counts only the trained layers, length_grouped
    estimates from transformers' order, and a launch that shards the layers (FSDP, DeepSpeed; simulated here by
    leaving no distributed type whole) drops the controller and says so."""
    import io

    from rich.console import Console

    import tunelab.train.trainer as trainer_module

    def run(name: str, *overrides: str) -> tuple[dict, str]:
        printed = io.StringIO()
        result = run_training(config_for(tiny_model, arithmetic_file, tmp_path / name, "train.max_steps=2",
                                         *overrides), console=Console(file=printed, width=400))
        return result.summary, printed.getvalue()

    layers = json.loads((tiny_model / "config.json").read_text())["num_hidden_layers"]
    frozen, printed = run("freeze", "method.name=freeze", "method.freeze.trainable_layers=1")
    assert frozen["long_batches"]["layers"] == 1 and f"last 1 of the {layers} decoder layers" in printed
    # a long tail (4% of rows): a quarter of random padded batches of 8 hold a long row, about one in ten of the
    # length-grouped ones (a mega-batch's long rows share its first batch)
    from conftest import arithmetic_rows, write_jsonl

    rows = arithmetic_rows(400) + [{"instruction": f"数一数 {i} " * 40, "input": "", "output": "1 2 3 " * 20}
                                   for i in range(16)]
    mixed = (f"data.datasets=[{{path: '{write_jsonl(tmp_path / 'mixed.jsonl', rows)}'}}]",
             "train.long_batch_percentile=85")
    grouped, printed = run("grouped", *mixed, "data.batching=length_grouped")
    padded, _ = run("padded", *mixed, "data.batching=padded")
    assert grouped["long_batches"]["reference_tokens"] < padded["long_batches"]["reference_tokens"] / 2
    monkeypatch.setattr(trainer_module, "_WHOLE_MODEL", ())
    sharded, printed = run("sharded")
    assert sharded["long_batches"] is None
    assert "long-batch checkpointing off: FSDP and DeepSpeed" in printed and "a batch over" not in printed


def test_skipped_records_go_to_rejects_and_test_split_is_never_trained_on(tiny_model, tmp_path):
    from conftest import arithmetic_rows, write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", arithmetic_rows(40))
    with data.open("a", encoding="utf-8") as handle:
        handle.write('{"instruction": "空的答案", "output": "  "}\nnot json at all\n')
    result = run_training(config_for(tiny_model, data, tmp_path / "run", "train.max_steps=2",
                                     "data.on_bad_record=skip", "data.test_size=5"))
    rejects = [json.loads(line) for line in (result.output_dir / "rejects.jsonl").read_text().splitlines()]
    assert [r["source"] for r in rejects] == [f"{data}:41", f"{data}:42"]
    assert "empty answer" in rejects[0]["reason"] and "invalid JSON" in rejects[1]["reason"]
    assert json.loads((result.output_dir / "summary.json").read_text())["data"]["train"]["samples"] == 35

    from tunelab.data.build import load_splits

    splits = load_splits(load_config(result.output_dir / "config.yaml").data)
    test_sources = {r.source for r in splits.test}
    written = {json.loads(line)["source"] for line in (result.output_dir / "test.jsonl").read_text().splitlines()}
    assert written == test_sources and len(test_sources) == 5
    assert not test_sources & {r.source for r in splits.train} and not test_sources & {r.source for r in
                                                                                         splits.validation}


def test_bf16_full_tuning_saves_bf16_weights(tiny_model, arithmetic_file, tmp_path):
    from safetensors import safe_open

    result = run_training(config_for(tiny_model, arithmetic_file, tmp_path / "run", "model.dtype=bf16",
                                     "method.name=full", "train.max_steps=2", "train.save_steps=2",
                                     "train.master_weights=params"))  # fp32 trained weights: checkpoints hold them
    with safe_open(result.output_dir / "model.safetensors", "pt") as final:
        assert {final.get_tensor(k).dtype for k in final.keys()} == {torch.bfloat16}  # noqa: SIM118 (safe_open is not iterable)
    with safe_open(result.output_dir / "checkpoint-2" / "model.safetensors", "pt") as checkpoint:
        assert {checkpoint.get_tensor(k).dtype for k in checkpoint.keys()} == {torch.float32}  # noqa: SIM118
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(result.output_dir)
    assert torch.equal(reloaded.lm_head.weight, reloaded.model.embed_tokens.weight)  # ties survive the re-save


@pytest.mark.parametrize("method", ["full", "lora", "freeze"])
def test_gradient_checkpointing_gives_the_same_losses(tiny_model, arithmetic_file, tmp_path, method):
    # freeze trains the last of the 2 layers: long batches recompute only among the layers that keep activations
    common = (f"method.name={method}", "train.max_steps=4", "method.lora.dropout=0.1",
              "method.freeze.trainable_layers=1")
    plain = run_training(config_for(tiny_model, arithmetic_file, tmp_path / "plain", *common,
                                    "train.checkpoint_long_batches=false"))
    saved = run_training(config_for(tiny_model, arithmetic_file, tmp_path / "ckpt", *common,
                                    "train.gradient_checkpointing=true"))
    # nearly every batch is "long" against the 5th percentile: layers recompute, with dropout, per batch
    long = run_training(config_for(tiny_model, arithmetic_file, tmp_path / "long", *common,
                                   "train.long_batch_percentile=5"))
    base = saved.model.get_base_model() if hasattr(saved.model, "get_base_model") else saved.model
    assert base.is_gradient_checkpointing
    assert plain.summary["long_batches"] is None and saved.summary["long_batches"] is None
    record = long.summary["long_batches"]
    layers = 1 if method == "freeze" else 2
    assert record["percentile"] == 5 and record["layers"] == layers and record["batches_recomputing"] >= 2
    assert 1 <= record["most_layers_recomputed"] <= layers
    # the layers obeyed their flags: each recomputing batch sent at least one layer through the checkpoint
    assert record["checkpointed_layer_calls"] >= record["batches_recomputing"]
    long_base = long.model.get_base_model() if hasattr(long.model, "get_base_model") else long.model
    assert not any(layer.gradient_checkpointing for layer in long_base.model.layers)  # left as it was
    a, b, c = losses(plain.output_dir), losses(saved.output_dir), losses(long.output_dir)
    assert len(a) == 4 and max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-5
    assert max(abs(x - y) for x, y in zip(a, c, strict=True)) < 1e-5
