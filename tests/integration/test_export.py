"""`tunelab export`: merge, cast, shard, write and verify; the result loads in plain transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import arithmetic_rows, shared_lora_run, write_jsonl
from tunelab.config.load import load_config
from tunelab.data.record import Record, Turn
from tunelab.data.template import NAMED_TEMPLATES, build_template
from tunelab.errors import ConfigError, ModelError, RunError
from tunelab.evaluate.generate import GenerationSettings, generate_answers, load_for_eval
from tunelab.export import check_chat_template, export_model, jinja_chat_template
from tunelab.train.run import run_training

QUESTIONS = ["What is 2 plus 3?", "计算 4 加 5", "What is 9 plus 9?"]

# Runs in a fresh interpreter with no tunelab import: the export must stand on transformers alone.
PLAIN = """
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, questions = sys.argv[1], json.loads(sys.argv[2])
tokenizer = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder)
answers = []
for q in questions:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answers.append(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
assert not any(name.startswith("tunelab") for name in sys.modules)
print(json.dumps({"answers": answers, "dtype": str(model.dtype)}))
"""


def train(model: Path, root: Path, method: str, *extra: str) -> Path:
    data = write_jsonl(root / "train.jsonl", arithmetic_rows(48))
    config = load_config(None, [
        f"model.name_or_path={model}", "model.dtype=fp32", f"data.datasets=[{{path: '{data}'}}]",
        f"train.output_dir={root / method}", f"method.name={method}", "method.lora.rank=4",
        "method.lora.dropout=0.0", "train.per_device_train_batch_size=8", "train.report_to=none",
        "train.save_steps=1000", *extra,
    ])
    return run_training(config).output_dir


@pytest.fixture(scope="module")
def lora_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_lora_run(tiny_model, tmp_path_factory)




def tunelab_answers(model: Path, run: Path) -> list[str]:
    loaded = load_for_eval(str(model), str(run), dtype="fp32")
    records = [Record((Turn("user", q),)) for q in QUESTIONS]
    return [a for _, a in generate_answers(loaded, records, GenerationSettings(max_new_tokens=12))]


def test_lora_export_round_trip_in_plain_transformers(tiny_model, lora_run, tmp_path):
    out = tmp_path / "merged"
    result = subprocess.run(
        [sys.executable, "-m", "tunelab.cli", "export", "--adapter", str(lora_run), "-o", str(out), "--dtype",
         "fp32", "--max-shard-size", "150KB"],
        capture_output=True, text=True, timeout=180, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "merge (merged fp32 vs base + adapter): max |Δlogit|" in result.stderr
    assert "(tolerance " in result.stderr and "all 27 tensors identical bit for bit" in result.stderr
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded
    assert not any("lora" in name for name in index["weight_map"])
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [2]  # <|im_end|>, the tiny tokenizer's end of turn and eos
    assert "<|im_start|>assistant" in (out / "chat_template.jinja").read_text()
    manifest = json.loads((out / "tunelab_export.json").read_text())
    assert manifest["complete"] and all(c["passed"] for c in manifest["checks"])

    plain = subprocess.run([sys.executable, "-c", PLAIN, str(out), json.dumps(QUESTIONS, ensure_ascii=False)],
                           capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert plain.returncode == 0, plain.stderr[-3000:]
    exported = json.loads(plain.stdout.splitlines()[-1])
    assert exported["dtype"] == "torch.float32"
    want = tunelab_answers(tiny_model, lora_run)
    assert exported["answers"] == want and all(want), want


def test_full_run_exports_in_bf16_shards(tiny_model, tmp_path):
    from safetensors import safe_open

    run = train(tiny_model, tmp_path, "full", "train.max_steps=2")
    report = export_model(str(run), str(tmp_path / "out"), dtype="bf16", max_shard_size="100KB", log=lambda _: None)
    assert report.kind == "model"
    assert report.shards > 1 and [c.name.split(" ")[0] for c in report.checks] == ["reload", "precision"]
    assert report.checks[0].passed and not report.checks[1].required
    for shard in (tmp_path / "out").glob("model-*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}  # noqa: SIM118 (not a dict)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    # The run trained with the tokenizer's own chat template, which is kept as it was.
    assert report.chat_template.startswith("the tokenizer's own chat template")


def test_a_wrong_merge_fails_the_export_and_writes_nothing(tiny_model, lora_run, tmp_path, monkeypatch):
    from peft.tuners.lora import LoraModel

    real = LoraModel.merge_and_unload

    def sloppy(self, *args, **kwargs):
        merged = real(self, *args, **kwargs)
        with torch.no_grad():
            merged.model.layers[0].self_attn.q_proj.weight.mul_(1.5)  # a merge that scaled something wrongly
        return merged

    monkeypatch.setattr(LoraModel, "merge_and_unload", sloppy)
    with pytest.raises(ModelError, match=r"failed verification: merge .* max \|Δlogit\| .* FAILED"):
        export_model(str(lora_run), str(tmp_path / "out"), dtype="fp32", log=lambda _: None)
    assert not (tmp_path / "out").exists()


def test_dora_merges_within_tolerance(tiny_model, tmp_path):
    run = train(tiny_model, tmp_path, "dora", "train.max_steps=3", "train.learning_rate=3e-2")
    report = export_model(str(run), str(tmp_path / "out"), dtype="fp32", log=lambda _: None)
    merge = report.checks[0]
    assert merge.name.startswith("merge") and merge.passed and merge.max_abs_diff is not None
    assert merge.max_abs_diff <= merge.tolerance and merge.top1_agreement == 1.0


def test_bad_export_arguments_say_what_is_wrong(tiny_model, lora_run, tmp_path):
    with pytest.raises(ModelError, match="neither adapter_config.json nor config.json"):
        export_model(str(tmp_path), str(tmp_path / "out"))
    with pytest.raises(ConfigError, match="--base: only for adapters"):
        export_model(str(tiny_model), str(tmp_path / "out"), base=str(tiny_model))
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("x")
    with pytest.raises(RunError, match="not empty"):
        export_model(str(lora_run), str(tmp_path / "used"))
    with pytest.raises(ConfigError, match="allowed values: bf16, fp16, fp32"):
        export_model(str(lora_run), str(tmp_path / "out"), dtype="int8")
    prompt = tmp_path / "prompt"
    prompt.mkdir()
    (prompt / "adapter_config.json").write_text('{"peft_type": "PROMPT_TUNING"}')
    with pytest.raises(ModelError, match="PROMPT_TUNING adapter adds virtual tokens"):
        export_model(str(prompt), str(tmp_path / "out"))


def test_public_surface_is_sorted():
    from tunelab import export, serve

    for package in (export, serve):
        assert package.__all__ == sorted(package.__all__)
        assert all(hasattr(package, name) for name in package.__all__)


@pytest.mark.parametrize("name", sorted(NAMED_TEMPLATES))
def test_named_templates_as_jinja_render_what_tunelab_renders(tokenizer, name):
    template = build_template(name, tokenizer)
    copy = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    copy.chat_template = jinja_chat_template(template)
    assert check_chat_template(template, copy) >= 4
    conversation = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "{a}"}]
    whole = "".join(s.text for s in template.render(None, [Turn("user", "q"), Turn("assistant", "{a}")]))
    assert copy.apply_chat_template(conversation, tokenize=False) == whole
