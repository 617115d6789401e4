"""Training options of issue 6 end to end: torch.compile, precision under ``auto``, and the "did it train" check."""

import io
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

from conftest import interrupted_copy
from tunelab.config.load import load_config
from tunelab.train.compile import compile_problem
from tunelab.train.run import run_training


def config_for(model: Path, data: Path, out: Path, *extra: str):
    return load_config(None, [
        f"model.name_or_path={model}", "model.dtype=fp32", f"data.datasets=[{{path: '{data}'}}]",
        f"train.output_dir={out}", "train.logging_steps=1", "train.save_steps=1000", "train.report_to=none",
        "train.learning_rate=3e-3", "train.per_device_train_batch_size=8", "train.lr_scheduler_type=constant",
        "method.lora.dropout=0.0", "data.cutoff_len=64", *extra,
    ])


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def _inductor_case():
    problem = compile_problem("inductor")
    # Inductor generates and builds C++ kernels: 30-60 s for the tiny model on a busy 2-core machine.
    marks = [pytest.mark.slow, *([pytest.mark.skip(reason=problem)] if problem else [])]
    return pytest.param("inductor", "padding_free", marks=marks, id="inductor-padding_free")


@pytest.mark.parametrize(("backend", "batching"), [("aot_eager", "padding_free"), ("aot_eager", "padded"),
                                                   _inductor_case()])
def test_torch_compile_gives_the_same_losses(tiny_model, arithmetic_file, tmp_path, backend, batching):
    from torch._dynamo.utils import counters
    from transformers import TrainerCallback

    class SeesCompiledLayers(TrainerCallback):
        def __init__(self) -> None:
            self.seen: list[bool] = []

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.seen.append(all(layer._compiled_call_impl is not None for layer in model.model.layers))

    common = ("method.name=full", "train.max_steps=6", f"data.batching={batching}")
    plain = run_training(config_for(tiny_model, arithmetic_file, tmp_path / "plain", *common))
    graphs_before = counters["stats"]["unique_graphs"]
    sees = SeesCompiledLayers()
    compiled = run_training(config_for(tiny_model, arithmetic_file, tmp_path / "compiled", *common,
                                       "train.torch_compile=true", f"train.torch_compile_backend={backend}"),
                            extra_callbacks=[sees])
    assert sees.seen == [True] * 6 and counters["stats"]["unique_graphs"] > graphs_before
    a, b = losses(plain.output_dir), losses(compiled.output_dir)
    assert len(a) == 6 and max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-4, (a, b)
    summary = compiled.summary
    assert summary["batching"] == batching
    # The first steps trace (and recompile once for dynamic lengths); that time is reported apart from the rates.
    assert summary["compile_s"] > 0 and "compile_s" not in plain.summary
    steady = summary["train_step_time_s"] - summary["compile_s"]
    assert summary["real_tokens_per_s"] == pytest.approx(summary["real_tokens"] / steady, rel=1e-2)
    layers = compiled.model.model.layers
    assert all(layer._compiled_call_impl is None for layer in layers)  # eager again after training


def test_auto_precision_on_a_bf16_cpu_trains_in_bf16(tiny_model, arithmetic_file, tmp_path, monkeypatch):
    from tunelab.models import load as model_load

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(model_load, "native_cpu_bf16", lambda: "AMX")
    output = io.StringIO()
    result = run_training(config_for(tiny_model, arithmetic_file, tmp_path / "run", "model.dtype=auto",
                                     "method.name=lora", "train.max_steps=2"), console=Console(file=output, width=200))
    reason = "auto: this CPU computes bf16 natively (AMX); bf16 autocast, trained weights kept in fp32"
    assert result.summary["precision"] == {"dtype": "bf16", "reason": reason}
    assert f"precision bf16: {reason}" in output.getvalue()
    assert {p.dtype for p in result.model.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for p in result.model.parameters() if p.requires_grad} == {torch.float32}
    assert "dtype: auto" in (result.output_dir / "config.yaml").read_text()  # decided again wherever it is read


def test_a_run_whose_gradients_are_all_zero_is_flagged(tiny_model, arithmetic_file, tmp_path):
    """A zero final-norm weight makes every logit 0 whatever the layers compute, so no gradient reaches the LoRA
    adapters inside them: the run "trains" with a constant loss and must be flagged, not reported as fine."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dead = tmp_path / "dead-end"
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        model.model.norm.weight.zero_()
    model.save_pretrained(dead)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(dead)
    output = io.StringIO()
    result = run_training(config_for(dead, arithmetic_file, tmp_path / "run", "method.name=lora", "train.max_steps=4"),
                          console=Console(file=output, width=200))
    checks = result.summary["did_it_train"]
    assert checks["grad_norm_above_zero"] is False and checks["parameters_changed"] is False
    assert checks["ok"] is False
    printed = output.getvalue()
    assert "did it train? every logged gradient norm was 0" in printed
    assert "did it train? no sampled trainable tensor changed" in printed


def test_master_weights_in_the_optimizer_train_bf16_weights_and_resume_exactly(tiny_model, arithmetic_file,
                                                                               tmp_path):
    import shutil

    from tunelab.errors import RunError
    from tunelab.train.master_weights import MASTER_FILE

    common = ("method.name=full", "model.dtype=bf16", "train.max_steps=6", "train.save_steps=3",
              "train.learning_rate=1e-3")
    mastered = ("train.master_weights=optimizer", *common)
    output = io.StringIO()
    whole = run_training(config_for(tiny_model, arithmetic_file, tmp_path / "whole", *mastered),
                         console=Console(file=output, width=200))
    assert "master weights optimizer:" in output.getvalue() and "(set by train.master_weights)" in output.getvalue()
    assert "stay bf16 in the model" in output.getvalue()
    assert whole.summary["master_weights"] == {"in": "optimizer", "reason": "set by train.master_weights"}
    assert {p.dtype for p in whole.model.parameters()} == {torch.bfloat16}
    assert (whole.output_dir / "checkpoint-3" / MASTER_FILE).is_file()
    assert whole.summary["did_it_train"]["ok"]
    # the masters are dropped with the run (their hooks removed): the weights take gradients again
    assert not any(hasattr(p, "tunelab_master") for p in whole.model.parameters())

    # fp32 weights under autocast compute the same steps up to bf16 rounding of the residual stream
    params = run_training(config_for(tiny_model, arithmetic_file, tmp_path / "params", *common))
    a, b = losses(whole.output_dir), losses(params.output_dir)
    assert len(a) == 6 and max(abs(x - y) for x, y in zip(a, b, strict=True)) < 2e-2, (a, b)
    assert a[-1] < a[0]

    partial = interrupted_copy(whole.output_dir, 3, tmp_path / "partial")
    resumed = run_training(config_for(tiny_model, arithmetic_file, partial, *mastered, "train.resume=true"))
    assert losses(partial) == a
    for (name, p), (_, q) in zip(whole.model.named_parameters(), resumed.model.named_parameters(), strict=True):
        assert torch.equal(p.cpu(), q.cpu()), name

    # the other way round (written with the masters, resumed with fp32 weights): the weights start from the masters
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    class WeightsAtStart(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.weights = {n: p.detach().clone() for n, p in model.named_parameters()}

    other_way = interrupted_copy(whole.output_dir, 3, tmp_path / "other-way")
    start = WeightsAtStart()
    run_training(config_for(tiny_model, arithmetic_file, other_way, *common, "train.resume=true"),
                 extra_callbacks=[start])
    saved = load_file(str(whole.output_dir / "checkpoint-3" / MASTER_FILE))
    assert saved and all(torch.equal(start.weights[name], value) for name, value in saved.items())

    # a checkpoint without its masters would resume from bf16-rounded weights: refused, not continued approximately
    (partial / "checkpoint-3" / MASTER_FILE).unlink()
    shutil.rmtree(partial / "checkpoint-6")
    with pytest.raises(RunError, match=f"has no {MASTER_FILE}"):
        run_training(config_for(tiny_model, arithmetic_file, partial, *mastered, "train.resume=true"))


def test_master_weights_refuse_fp32_before_the_model_loads(tiny_model, arithmetic_file, tmp_path, monkeypatch):
    from tunelab.errors import ConfigError
    from tunelab.train import run as run_module

    monkeypatch.setattr(run_module, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ConfigError, match="model.dtype resolved to fp32"):
        run_training(config_for(tiny_model, arithmetic_file, tmp_path / "run", "method.name=full",
                                "train.master_weights=optimizer", "train.max_steps=1"))


def test_master_weights_with_accumulation_an_eager_optimizer_state_and_no_clipping(tiny_model, arithmetic_file,
                                                                                   tmp_path):
    # Adagrad makes its state when it is built (moved to the masters); with max_grad_norm=0 the logged norm is
    # still the masters' (the bf16 weights hold no gradient at the step); 4 micro-batches are summed in fp32.
    result = run_training(config_for(
        tiny_model, arithmetic_file, tmp_path / "run", "method.name=full", "model.dtype=bf16",
        "train.master_weights=optimizer", "train.optim=adagrad", "train.max_grad_norm=0", "train.max_steps=3",
        "train.per_device_train_batch_size=2", "train.gradient_accumulation_steps=4"))
    rows = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    norms = [r["grad_norm"] for r in rows if "grad_norm" in r]
    assert len(norms) == 3 and all(n > 0 for n in norms), norms
    assert result.summary["did_it_train"]["parameters_changed"]


def _torchao_problem() -> str:
    import importlib.util

    if importlib.util.find_spec("torchao") is None:
        return "torchao is not installed"
    return compile_problem("inductor")


@pytest.mark.slow
@pytest.mark.skipif(bool(_torchao_problem()), reason=_torchao_problem() or "runs")
def test_torchao_8bit_adamw_trains_the_masters_and_resumes_exactly(tiny_model, arithmetic_file, tmp_path):

    common = ("method.name=full", "model.dtype=bf16", "train.master_weights=optimizer", "train.optim=adamw_torch_8bit",
              "train.max_steps=4", "train.save_steps=2", "train.learning_rate=1e-3")
    whole = run_training(config_for(tiny_model, arithmetic_file, tmp_path / "whole", *common))
    a = losses(whole.output_dir)
    assert len(a) == 4 and a[-1] < a[0] and whole.summary["did_it_train"]["ok"]
    saved = torch.load(whole.output_dir / "checkpoint-2" / "optimizer.pt", weights_only=False)  # written by this test
    kinds = {type(v).__name__ for entry in saved["state"].values() for v in entry.values()}
    assert "OptimState8bit" in kinds  # the larger tensors' moments are held in 8 bits
    partial = interrupted_copy(whole.output_dir, 2, tmp_path / "partial")
    run_training(config_for(tiny_model, arithmetic_file, partial, *common, "train.resume=true"))
    assert losses(partial) == a  # the 8-bit state (torchao's tensor subclass) survives the checkpoint
