"""Padding-free and packed batches: the same losses and gradients as padded batches, and no attention across samples.

Everything in fp32 on the tiny Qwen2 model, with mixed lengths, multi-turn samples and every kind of truncation.
"""

import json
import random
from pathlib import Path

import pytest
import torch
from rich.console import Console

from conftest import ZH_EN, write_jsonl
from tunelab.config.load import load_config
from tunelab.data.build import load_splits, tokenize_splits
from tunelab.data.collate import PaddedCollator
from tunelab.data.packing import FlatCollator, pack_rows, plan_batching
from tunelab.data.template import build_template
from tunelab.models.load import load_model, load_tokenizer
from tunelab.models.methods import apply_method
from tunelab.models.packed_attention import enable_padding_free
from tunelab.train.loss import lean_loss_unsupported, supervised_lm_loss
from tunelab.train.run import run_training

CUTOFF = 96


def mixed_rows(n: int, seed: int = 0) -> list[dict]:
    """1-3 exchanges of repeated zh/en shop sentences: 24-96 tokens, some cut (history, prompt and answer)."""
    rng = random.Random(seed)
    # an answer alone longer than the cutoff (about 120 tokens), so that one record has its answer cut
    rows = [{"messages": [{"role": "user", "content": ZH_EN[2]}, {"role": "assistant", "content": ZH_EN[0] * 40}]}]
    while len(rows) < n:
        turns = []
        for _ in range(rng.choice([1, 1, 2, 3])):
            turns.append({"role": "user", "content": rng.choice(ZH_EN) * rng.choice([1, 1, 2, 5])})
            turns.append({"role": "assistant", "content": rng.choice(ZH_EN) * rng.choice([1, 1, 3])})
        rows.append({"messages": turns})
    rng.shuffle(rows)
    return rows


@pytest.fixture(scope="module")
def mixed_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("mixed") / "mixed.jsonl", mixed_rows(24))


def config_for(model: Path, data: Path, out: Path, *extra: str):
    return load_config(None, [
        f"model.name_or_path={model}", "model.dtype=fp32", f"data.datasets=[{{path: '{data}'}}]",
        f"data.cutoff_len={CUTOFF}", f"data.cache_dir={out.parent / 'cache'}", f"train.output_dir={out}",
        "train.logging_steps=1", "train.save_steps=1000", "train.report_to=none", "train.learning_rate=3e-3",
        "train.lr_scheduler_type=constant", "method.lora.dropout=0.0", "method.lora.rank=4", *extra,
    ])


@pytest.fixture(scope="module")
def features(tiny_model: Path, mixed_file: Path) -> list[dict]:
    config = config_for(tiny_model, mixed_file, mixed_file.parent / "unused")
    tokenizer = load_tokenizer(config.model)
    data = tokenize_splits(load_splits(config.data), build_template(None, tokenizer), tokenizer, config.data)
    cut = data.stats["train"].truncated
    assert cut["history"] and cut["prompt"] and cut["answer"], cut  # the data exercises every truncation
    return [{"input_ids": e.input_ids, "labels": e.labels} for e in data.train]


def fresh_model(tiny_model: Path, method: str):
    config = config_for(tiny_model, Path("x.jsonl"), Path("out"), f"method.name={method}")
    model = apply_method(load_model(config.model), config.method)
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at zero, which would make every lora_A gradient zero on both paths
            torch.nn.init.normal_(param, std=0.05)
    return model


def loss_and_grads(model, batch: dict, lean: bool) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    items = (batch["labels"][..., 1:] != -100).sum()
    if lean:
        loss = supervised_lm_loss(model, {**batch, "use_cache": False}, items, chunk_rows=37)
    else:
        loss = model(**batch, use_cache=False, num_items_in_batch=items).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", ["full", "lora"])
def test_flat_batches_give_the_padded_loss_and_gradients(tiny_model, features, method):
    model = fresh_model(tiny_model, method)
    # the second batch is fully supervised, like text records: each sample's first token is a real label there
    batches = [features[:8], [{"input_ids": f["input_ids"], "labels": list(f["input_ids"])} for f in features[8:16]]]
    reference = [loss_and_grads(model, PaddedCollator(pad_token_id=0)(b), lean=False) for b in batches]
    assert enable_padding_free(model, CUTOFF).ok
    for batch, (ref_loss, ref_grads) in zip(batches, reference, strict=True):
        variants = {
            "flat + lean loss": loss_and_grads(model, FlatCollator()(batch), lean=True),
            "flat + model loss": loss_and_grads(model, FlatCollator()(batch), lean=False),
            "padded + lean loss": loss_and_grads(model, PaddedCollator(pad_token_id=0)(batch), lean=True),
            "packed rows + lean loss": loss_and_grads(model, FlatCollator()(pack_rows(batch, CUTOFF)), lean=True),
        }
        for name, (loss, grads) in variants.items():
            assert abs(loss - ref_loss) < 1e-5, (name, loss, ref_loss)
            worst = max((grads[n] - g).abs().max().item() for n, g in ref_grads.items())
            assert worst < 1e-5, (name, worst)


def test_no_token_attends_to_another_sample(tiny_model, features):
    def logits_of_others(model, samples: list[dict]) -> torch.Tensor:
        with torch.no_grad():
            batch = FlatCollator()(samples)
            out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                        cu_seq_lens_q=batch["cu_seq_lens_q"], cu_seq_lens_k=batch["cu_seq_lens_k"]).logits
        return out[0, len(samples[0]["input_ids"]):]

    samples = features[:4]
    same_length = [{"input_ids": [(t * 7 + 3) % 400 for t in samples[0]["input_ids"]]}, *samples[1:]]
    model = fresh_model(tiny_model, "full").eval()
    # transformers' own SDPA with the model's default use_cache=True: the second sample attends to the first
    stock = logits_of_others(model, samples) - logits_of_others(model, same_length)
    assert stock.abs().max() > 1e-3, "the detector must see contamination where it exists"

    assert enable_padding_free(model, CUTOFF).ok
    base = logits_of_others(model, samples)
    assert torch.equal(base, logits_of_others(model, same_length))
    # a first sample of another length: the others' logits move only by matmul rounding, never by attention
    other = [{"input_ids": samples[0]["input_ids"][:5]}, *samples[1:]]
    assert (logits_of_others(model, other) - base).abs().max() < 1e-5
    alone = model(input_ids=torch.tensor([samples[1]["input_ids"]])).logits[0]
    assert (base[: len(samples[1]["input_ids"])] - alone).abs().max() < 1e-5


def test_models_that_cannot_keep_samples_apart_fall_back_to_padded(tiny_model, monkeypatch):
    from transformers import AutoModelForCausalLM, Gemma2Config, Gemma2ForCausalLM

    sliding = AutoModelForCausalLM.from_pretrained(tiny_model, use_sliding_window=True, sliding_window=16,
                                                   layer_types=["sliding_attention"] * 2)
    plan, note = plan_batching("padding_free", sliding, CUTOFF)
    assert plan.mode == "padded"
    assert "sliding-window attention (16 tokens) shorter than the row length 96" in note
    assert "training on padded batches instead" in note

    softcapped = Gemma2ForCausalLM(Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                                head_dim=16, attn_implementation="eager"))
    assert "soft-capping" in plan_batching("packed", softcapped, CUTOFF)[1]
    assert "post-processes its logits (config.final_logit_softcapping=30.0)" in lean_loss_unsupported(softcapped)

    # an attention that ignores the sample boundaries is caught by the probe, and the model is left as it was
    import tunelab.models.packed_attention as packed_attention

    model = load_model(config_for(tiny_model, Path("x"), Path("y")).model)
    monkeypatch.setattr(packed_attention, "_sample_bounds", lambda kwargs, length: [0, length])
    plan, note = plan_batching("padding_free", model, CUTOFF)
    assert plan.mode == "padded" and "attention crosses samples" in note
    assert model.config._attn_implementation == "sdpa"


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_training_runs_match_step_for_step_with_accumulation(tiny_model, mixed_file, features, tmp_path, method):
    """Padded 8×1 and padding-free 4×2 over one epoch of 24 samples: the same 3 steps, losses and weights."""
    common = (f"method.name={method}", "train.num_train_epochs=1")
    padded = run_training(config_for(tiny_model, mixed_file, tmp_path / "padded", *common, "data.batching=padded",
                                     "train.per_device_train_batch_size=8"))
    console = Console(record=True, width=200)
    flat = run_training(config_for(tiny_model, mixed_file, tmp_path / "flat", *common,
                                   "train.per_device_train_batch_size=4", "train.gradient_accumulation_steps=2"),
                        console=console)
    printed = console.export_text()
    assert "batching padding_free: one flat row per batch" in printed
    assert "tokenized data cache hit" in printed  # the padded run tokenized the same data with the same settings
    a, b = losses(padded.output_dir), losses(flat.output_dir)
    assert len(a) == len(b) == 3
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-5, (a, b)
    # Weights after 3 AdamW steps: Adam divides by sqrt(v), so where a gradient is ~0 a rounding difference between
    # the two layouts' matmuls can still move a weight by a visible part of the learning rate (3e-3). Seen on an
    # H200 in fp32: 4.4e-5 at most; on CPU below 1e-5. Losses and gradients are held to 1e-5 above and in
    # test_flat_batches_give_the_padded_loss_and_gradients.
    for (name, p), (_, q) in zip(padded.model.named_parameters(), flat.model.named_parameters(), strict=True):
        if p.requires_grad:
            assert (p - q).abs().max() < 1e-4, name
    assert flat.model.config._attn_implementation == "sdpa"  # restored after training

    # the meter, on known counts: one epoch feeds every sample once
    stats = padded.summary["data"]["train"]
    for summary in (padded.summary, flat.summary):
        assert summary["real_tokens"] == summary["tokens_seen"] == stats["tokens"]
        assert summary["samples"] == 24 and summary["supervised_tokens_seen"] == stats["supervised_tokens"]
        assert summary["did_it_train"]["ok"] is True
    assert flat.summary["token_slots"] == stats["tokens"] and flat.summary["padding_efficiency"] == 1.0
    assert padded.summary["token_slots"] > stats["tokens"] and padded.summary["padding_efficiency"] < 1.0
    lengths = [len(f["input_ids"]) for f in features]
    assert flat.summary["mean_attention_context"] == pytest.approx(sum(n * n for n in lengths) / sum(lengths), 0.01)
    assert flat.summary["model_flops_per_token"] == padded.summary["model_flops_per_token"]
    assert 0 < flat.summary["mfu_measured_peak"] < 1 and flat.summary["real_tokens_per_s"] > 0


def test_packed_and_length_grouped_runs(tiny_model, mixed_file, tmp_path):
    packed = run_training(config_for(tiny_model, mixed_file, tmp_path / "packed", "method.name=full",
                                     "data.batching=packed", "train.per_device_train_batch_size=2",
                                     "train.max_steps=2"))
    summary = packed.summary
    assert summary["padding_efficiency"] == 1.0 and summary["samples"] > 2 * 2  # several samples per row
    assert summary["batching"] == "packed" and summary["did_it_train"]["parameters_changed"]
    # transformers sorts "megabatches" of up to 50 batches by length; 96 samples in batches of 4 make megabatches of 6
    more = write_jsonl(tmp_path / "more.jsonl", mixed_rows(96, seed=1))
    grouped = run_training(config_for(tiny_model, more, tmp_path / "grouped", "method.name=full",
                                      "data.batching=length_grouped", "train.per_device_train_batch_size=4",
                                      "train.max_steps=3"))
    # random batches of 4 from these 24-96-token samples are about 73% real tokens
    assert grouped.summary["batching"] == "length_grouped" and grouped.summary["padding_efficiency"] > 0.85
