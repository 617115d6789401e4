"""Tuning methods beyond LoRA: prompt learning, IA3, QLoRA, new tokens, RoPE scaling, and the method sweep."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from conftest import arithmetic_rows, prompt_adapter_with_random_tokens, write_jsonl
from tunelab.config.load import load_config
from tunelab.data.collate import PaddedCollator
from tunelab.errors import ConfigError
from tunelab.evaluate.generate import GenerationSettings, load_for_eval
from tunelab.evaluate.run_eval import evaluate_model, read_test_records
from tunelab.models.load import load_model, load_tokenizer
from tunelab.models.methods import apply_method
from tunelab.models.methods.prompt import generate_with_virtual_tokens
from tunelab.train.run import run_training

PEFT_METHODS = {
    # method -> (learning rate, extra overrides); prompt learning needs a far higher rate than LoRA
    "prefix": ("1e-1", ["method.prefix.num_virtual_tokens=8"]),
    "ptuning": ("1e-1", ["method.ptuning.num_virtual_tokens=8", "method.ptuning.encoder_hidden_size=32"]),
    "prompt_tuning": ("1e-1", ["method.prompt_tuning.num_virtual_tokens=8",
                               "method.prompt_tuning.init_text='What is the answer'"]),
    "ia3": ("1e-1", []),
}


def config_for(model: Path, data: Path, out: Path, *extra: str):
    return load_config(None, [
        f"model.name_or_path={model}", "model.dtype=fp32", f"data.datasets=[{{path: '{data}'}}]",
        f"train.output_dir={out}", "data.test_size=8",
        "train.logging_steps=1", "train.save_steps=1000", "train.report_to=none", "train.learning_rate=3e-3",
        "train.per_device_train_batch_size=8", "train.lr_scheduler_type=constant", "method.lora.dropout=0.0",
        *extra,
    ])


def fixed_batch(config, tokenizer) -> dict[str, torch.Tensor]:
    """The first 16 training samples as one padded batch."""
    from tunelab.data.build import load_splits, tokenize_splits
    from tunelab.data.template import build_template

    template = build_template(config.data.template, tokenizer, config.data.custom_template)
    examples = tokenize_splits(load_splits(config.data), template, tokenizer, config.data).train[:16]
    return PaddedCollator(pad_token_id=tokenizer.pad_token_id)(
        [{"input_ids": e.input_ids, "labels": e.labels} for e in examples])


class FixedSetLoss(TrainerCallback):
    """Answer loss on one fixed batch when training begins (adapters freshly initialised) and when it ends.

    Noise-free, unlike comparing logged losses of different batches; and measured on the initialised adapter, not
    the base, because prompt-learning adapters start random and already change the loss before any training.
    """

    def __init__(self, batch: dict[str, torch.Tensor]) -> None:
        self.batch = batch
        self.losses: list[float] = []

    def _measure(self, model) -> None:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            self.losses.append(float(model(**self.batch).loss))
        model.train(was_training)

    def on_train_begin(self, args, state, control, model=None, **kwargs) -> None:
        self._measure(model)

    def on_train_end(self, args, state, control, model=None, **kwargs) -> None:
        self._measure(model)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("method", sorted(PEFT_METHODS))
def test_peft_method_trains_saves_reloads_and_evaluates(tiny_model, arithmetic_file, tmp_path, method):
    lr, extra = PEFT_METHODS[method]
    config = config_for(tiny_model, arithmetic_file, tmp_path / "run", f"method.name={method}", "train.max_steps=8",
                        f"train.learning_rate={lr}", *extra)
    base = load_model(config.model)
    loss = FixedSetLoss(fixed_batch(config, load_tokenizer(config.model)))
    result = run_training(config, extra_callbacks=[loss])
    run = result.output_dir
    assert (run / "adapter_model.safetensors").is_file() and (run / "adapter_config.json").is_file()
    assert not (run / "model.safetensors").exists()
    before, after = loss.losses
    assert after < before - 0.05, (before, after)
    base_after = {n.replace(".base_layer", ""): p
                  for n, p in result.model.get_base_model().named_parameters() if not p.requires_grad}
    for name, param in base.named_parameters():  # the base model never changes
        assert torch.equal(base_after[name], param), name

    loaded = load_for_eval(str(tiny_model), str(run))
    with torch.no_grad():
        assert float(loaded.model(**loss.batch).loss) == pytest.approx(after, abs=1e-5)
    records = read_test_records(str(run / "test.jsonl"))[:4]
    metrics = evaluate_model(loaded, records, tmp_path / "eval", GenerationSettings(max_new_tokens=3, batch_size=4))
    assert metrics["n"] == 4 and metrics["ref_loss"] is not None
    assert (tmp_path / "eval" / "predictions.jsonl").is_file()


@pytest.mark.parametrize("method", ["prefix", "ptuning", "prompt_tuning"])
def test_virtual_token_generation_matches_a_full_forward_pass(tokenizer, tiny_model, method):
    """Batched, left-padded, KV-cached generation gives each row the logits of a forward pass of that row alone.

    peft's own ``generate`` fails this on transformers 5.2x (the prefix is dropped, or the prompt re-inserted at
    every step), which is why tunelab generates prompt-learning adapters itself.
    """
    model = prompt_adapter_with_random_tokens(tiny_model, method)
    prompts = [tokenizer.encode(text) for text in ("What is 3 plus 4? 计算 5 加 6", "hi", "计算 5 加")]
    batch = PaddedCollator(pad_token_id=tokenizer.pad_token_id, padding_side="left")(
        [{"input_ids": ids} for ids in prompts])
    steps = 5
    out = generate_with_virtual_tokens(
        model, batch["input_ids"], batch["attention_mask"], max_new_tokens=steps, min_new_tokens=steps,
        do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=None, output_logits=True,
        return_dict_in_generate=True)
    width = batch["input_ids"].shape[1]
    assert torch.equal(out.sequences[:, :width], batch["input_ids"])
    generated = torch.stack(out.logits, dim=1)
    for row, ids in enumerate(prompts):
        sequence = torch.tensor([ids + out.sequences[row, width:].tolist()])
        with torch.no_grad():
            logits = model(input_ids=sequence, attention_mask=torch.ones_like(sequence)).logits[0]
        logits = logits[-sequence.shape[1] :]  # prompt/P-tuning also return their virtual tokens' logits
        expected = logits[len(ids) - 1 : len(ids) - 1 + steps]
        assert torch.allclose(generated[row], expected, atol=1e-4), (method, row)


def test_generation_path_is_used_by_evaluation(tiny_model, tmp_path, monkeypatch):
    from tunelab.evaluate import generate as generate_module

    calls = []
    real = generate_module.generate_with_virtual_tokens
    monkeypatch.setattr(generate_module, "generate_with_virtual_tokens",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    config = load_config(None, [f"model.name_or_path={tiny_model}", "model.dtype=fp32", "method.name=prefix",
                                "method.prefix.num_virtual_tokens=4"])
    model = apply_method(load_model(config.model), config.method)
    loaded = load_for_eval(str(tiny_model))
    loaded.model = model
    records = read_test_records(str(write_jsonl(tmp_path / "q.jsonl", arithmetic_rows(2))))
    answers = list(generate_module.generate_answers(loaded, records, GenerationSettings(max_new_tokens=2)))
    assert len(answers) == 2 and calls


def test_new_tokens_train_only_their_rows_with_lora_and_reload(tiny_model, tokenizer, arithmetic_file, tmp_path):
    rows = [{"instruction": f"<calc>{r['instruction']}</calc>", "output": f"<num>{r['output']}"}
            for r in arithmetic_rows(64)]
    data = write_jsonl(tmp_path / "tagged.jsonl", rows)
    config = config_for(tiny_model, data, tmp_path / "run", "method.name=lora", "train.max_steps=4",
                        "model.new_special_tokens=['<calc>', '</calc>', '<num>']")
    result = run_training(config)
    run = result.output_dir
    loaded = load_for_eval(str(tiny_model), str(run))
    new_ids = loaded.tokenizer.convert_tokens_to_ids(["<calc>", "</calc>", "<num>"])
    assert loaded.tokenizer.encode("<calc>1</calc>")[0] == new_ids[0] and min(new_ids) >= len(tokenizer)
    deltas = {n: p for n, p in result.model.named_parameters() if "trainable_tokens_delta" in n}
    assert deltas and all(p.requires_grad and p.shape[0] == 3 and p.abs().sum() > 0 for p in deltas.values())
    trainable = {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert all("lora_" in n or "trainable_tokens_delta" in n for n in trainable)
    ids = torch.tensor([loaded.tokenizer.encode("<calc>What is 3 plus 4?</calc><num>7")])
    result.model.eval()
    with torch.no_grad():
        assert torch.allclose(result.model(input_ids=ids).logits, loaded.model(input_ids=ids).logits, atol=1e-5)


def test_new_tokens_need_a_method_that_trains_embeddings(tiny_model, arithmetic_file, tmp_path):
    config = config_for(tiny_model, arithmetic_file, tmp_path / "run", "method.name=prompt_tuning",
                        "model.new_special_tokens=['<calc>']")
    with pytest.raises(ConfigError, match="method prompt_tuning cannot train embeddings"):
        run_training(config)


def test_rope_scaling_reaches_the_trained_and_the_evaluated_model(tiny_model, arithmetic_file, tmp_path):
    config = config_for(tiny_model, arithmetic_file, tmp_path / "run", "method.name=lora", "train.max_steps=3",
                        "model.rope_scaling={type: linear, factor: 4.0}")
    result = run_training(config)
    rope = result.model.get_base_model().config.rope_parameters
    assert rope["rope_type"] == "linear" and rope["factor"] == 4.0
    assert result.summary["final_loss"] < result.summary["first_loss"]
    loaded = load_for_eval(str(tiny_model), str(result.output_dir))
    assert loaded.model.get_base_model().config.rope_parameters["factor"] == 4.0
    plain = load_for_eval(str(tiny_model))
    assert plain.model.config.rope_parameters["rope_type"] == "default"


def test_qlora_without_a_working_bitsandbytes_fails_before_loading(tmp_path, monkeypatch):
    from tunelab.models.methods import qlora

    missing = tmp_path / "no-model-here"  # loading it would fail with a ModelError: the check must come first
    config = config_for(missing, tmp_path / "data.jsonl", tmp_path / "run", "method.name=qlora")
    monkeypatch.setattr(qlora.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError) as err:
        run_training(config)
    message = str(err.value)
    assert "method.name: qlora needs bitsandbytes" in message and "pip install 'tunelab[gpu]'" in message
    assert "a CUDA GPU" in message and "not installed" in message

    monkeypatch.setattr(qlora.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(qlora.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(qlora, "_cpu_backend_problem", lambda config: "RuntimeError: no CPU kernels")
    with pytest.raises(ConfigError, match=r"no CUDA GPU here and bitsandbytes' CPU backend failed \(RuntimeError: "
                                          r"no CPU kernels\)"):
        run_training(config)


def _bitsandbytes_runs_here() -> bool:
    if importlib.util.find_spec("bitsandbytes") is None:
        return False
    from tunelab.config.schema import MethodConfig
    from tunelab.models.methods.qlora import check_qlora

    try:
        check_qlora(MethodConfig(name="qlora"))
    except ConfigError:
        return False
    return True


@pytest.mark.skipif(not _bitsandbytes_runs_here(), reason="bitsandbytes not installed or cannot run here")
def test_qlora_trains_when_bitsandbytes_runs(tiny_model, arithmetic_file, tmp_path):
    config = config_for(tiny_model, arithmetic_file, tmp_path / "run", "method.name=qlora", "train.max_steps=12")
    result = run_training(config)
    linear = result.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert type(linear).__name__ == "Linear4bit"
    assert result.summary["final_loss"] < result.summary["first_loss"]
    assert (result.output_dir / "adapter_model.safetensors").is_file()
    from rich.console import Console

    from tunelab.workflow import load_finetuned

    loaded = load_finetuned(config, Console(quiet=True))  # on the k-bit base it was trained against
    assert loaded.adapter_path == str(result.output_dir)
    assert type(loaded.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"


def test_qlora_fine_tuned_column_loads_the_base_as_trained(tmp_path, monkeypatch):
    """After-training evaluation measures QLoRA adapters on the base quantised as in training, LoRA on the plain one."""
    from rich.console import Console

    from tunelab import workflow

    calls = []
    monkeypatch.setattr(workflow, "load_for_eval", lambda *args, **kwargs: calls.append((args, kwargs)))
    for method, bits in (("qlora", 8), ("qlora", 4), ("lora", None)):
        config = load_config(None, [
            "model.name_or_path=base-model", "model.dtype=bf16", "data.datasets=[{path: d.jsonl}]",
            f"train.output_dir={tmp_path / 'run'}", f"method.name={method}", f"method.qlora.bits={bits or 4}"])
        workflow.load_finetuned(config, Console(quiet=True))
        args, kwargs = calls[-1]
        assert args == ("base-model", str(tmp_path / "run")) and kwargs["label"] == "fine-tuned"
        quantization = kwargs["quantization"]
        if bits is None:
            assert quantization is None
        elif bits == 8:
            assert quantization.load_in_8bit
        else:
            assert quantization.load_in_4bit and quantization.bnb_4bit_compute_dtype == torch.bfloat16


def test_sweep_trains_each_combination_on_one_split_and_compares_them(
    tiny_model, arithmetic_file, tmp_path, monkeypatch, capsys
):
    from tunelab import cli, sweep, workflow

    # Each run's `tunelab train` runs in this process instead of a fresh one: the same command line, minus the
    # Python start-up a subprocess would cost the test.
    monkeypatch.setattr(sweep, "train_in_subprocess", cli.main)

    def read_again(config):  # the few-shot pool comes from the run's own training split, not a second read
        raise AssertionError("after-training evaluation read the data files again")

    monkeypatch.setattr(workflow, "_training_pool", read_again)
    config = tmp_path / "sweep.yaml"
    config.write_text(
        f"model: {{name_or_path: '{tiny_model}', dtype: fp32}}\n"
        f"data: {{datasets: [{{path: '{arithmetic_file}'}}], val_size: 8, test_size: 6}}\n"
        "method: {lora: {dropout: 0.0}}\n"
        f"train: {{output_dir: '{tmp_path / 'sweep'}', max_steps: 4, logging_steps: 2, learning_rate: 3.0e-3,\n"
        "        per_device_train_batch_size: 8, report_to: none, save_steps: 1000}\n"
        "eval: {max_new_tokens: 3, fewshot_k: 0, forgetting_probe: false}\n", "utf-8")
    assert cli.main(["sweep", str(config), "train.seed=7", "--grid", "method.name=lora,ia3"]) == 0
    root = tmp_path / "sweep"
    rows = json.loads((root / "sweep.json").read_text())["runs"]
    assert [r["name"] for r in rows] == ["lora", "ia3"] and {r["status"] for r in rows} == {"ok"}
    for row in rows:
        assert row["trainable_parameters"] > 0 and row["peak_memory_mb"] > 0 and row["tokens_per_s"] > 0
        assert row["wall_time_s"] > 0 and row["validation_loss"] > 0 and row["test_loss"] > 0
        assert "exact_match" in row["metrics"]
    assert rows[0]["trainable_parameters"] != rows[1]["trainable_parameters"]
    assert (root / "lora" / "test.jsonl").read_text() == (root / "ia3" / "test.jsonl").read_text()
    assert load_config(root / "configs" / "ia3.yaml").train.seed == 7
    table = (root / "sweep.md").read_text()
    assert "| lora | ok |" in table and "| ia3 | ok |" in table and "exact_match" in table
    comparison = json.loads((root / "report" / "comparison.json").read_text())
    assert [c["label"] for c in comparison["columns"]] == ["base", "lora", "ia3"]
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert "| lora | ok |" in captured.out
    # The base column is generated by the first run only; the second copies it (same base, split and settings).
    assert out.count("base model columns reused") == 1 and len(list((root / "base-evals").iterdir())) == 1
    base_predictions = [(root / name / "eval" / "base" / "predictions.jsonl").read_text() for name in ("lora", "ia3")]
    assert base_predictions[0] == base_predictions[1]

    # Started again, finished runs are reused, not retrained.
    assert cli.main(["sweep", str(config), "train.seed=7", "--grid", "method.name=lora,ia3"]) == 0
    assert {r["status"] for r in json.loads((root / "sweep.json").read_text())["runs"]} == {"reused"}


def test_sweep_checks_every_combination_before_training(tmp_path, monkeypatch):
    from tunelab.models.methods import qlora
    from tunelab.sweep import parse_grid, plan_sweep

    monkeypatch.setattr(qlora.importlib.util, "find_spec", lambda name: None)
    overrides = [f"train.output_dir={tmp_path / 's'}", "model.name_or_path=org/model-a"]
    # every run is evaluated after training, so a sweep without a test split is refused before any run trains
    with pytest.raises(ConfigError, match="eval.after_training needs a held-out test split"):
        plan_sweep(None, overrides, ["method.name=lora,full"])
    overrides.append("data.test_size=0.1")
    with pytest.raises(ConfigError, match="sweep run qlora: method.name: qlora needs bitsandbytes"):
        plan_sweep(None, overrides, ["method.name=lora,qlora"])
    with pytest.raises(ConfigError, match="method.name: got 'lorra'"):
        plan_sweep(None, overrides, ["method.name=lora,lorra"])
    runs = plan_sweep(None, overrides, ["method.name=lora,full", "model.name_or_path=org/model-b,/m/c"])
    assert [r.name for r in runs] == ["lora_model-b", "lora_c", "full_model-b", "full_c"]
    assert runs[1].folder == tmp_path / "s" / "lora_c" and runs[1].config.model.name_or_path == "/m/c"
    assert all(r.config.eval.after_training for r in runs)
    with pytest.raises(ConfigError, match="expected KEY=V1,V2"):
        parse_grid(["method.name=lora,"])


def test_adapters_of_different_kinds_are_refused_before_loading(tmp_path):
    from tunelab.evaluate.generate import eval_columns

    for name, kind in (("a", "LORA"), ("b", "IA3"), ("c", "LORA")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(json.dumps({"peft_type": kind}))
    assert [c.name for c in eval_columns([f"a={tmp_path / 'a'}", f"c={tmp_path / 'c'}"], base=True)] == [
        "base", "a", "c"]
    with pytest.raises(ConfigError, match=r"adapters of different kinds cannot share one base model \(a: LORA, b: "
                                          r"IA3\); evaluate each kind in its own `tunelab eval`"):
        eval_columns([f"a={tmp_path / 'a'}", f"b={tmp_path / 'b'}"], base=False)


def test_base_column_cache_key_changes_with_what_the_columns_depend_on(tiny_model, tmp_path):
    from tunelab.data.record import Record, Turn
    from tunelab.workflow import base_columns_key

    def key(*extra: str, question: str = "1+1=") -> str:
        config = load_config(None, [f"model.name_or_path={tiny_model}", "data.datasets=[{path: d.jsonl}]",
                                    f"train.output_dir={tmp_path / 'run'}", *extra])
        records = [Record(turns=(Turn("user", question), Turn("assistant", "2")))]
        return base_columns_key(config, records, records, [], None)

    same = key()
    assert key() == same and key(f"train.output_dir={tmp_path / 'other'}", "method.name=ia3") == same
    changed = [key("eval.max_new_tokens=9"), key("data.template=chatml"), key(question="一加一="),
               key("eval.fewshot_k=1"), key("model.dtype=bf16")]
    assert same not in changed and len(set(changed)) == len(changed)
