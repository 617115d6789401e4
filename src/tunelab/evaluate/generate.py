"""Load a model (base, base + adapter, or a run folder) and generate answers in batches.

Prompts are encoded by :func:`tunelab.data.tokenize.encode_prompt`, the same code that laid out training
samples, so the fine-tuned model is asked exactly the way it was taught. Batches are left-padded so every row's
answer starts right after its prompt, and ``generate`` uses the KV cache.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from tunelab.config.schema import CustomTemplate, ModelConfig
from tunelab.data.collate import PaddedCollator
from tunelab.data.record import Record
from tunelab.data.template import Template, build_template
from tunelab.data.tokenize import IGNORE_INDEX, encode_prompt, tokenize_record
from tunelab.errors import ModelError
from tunelab.models.load import load_model, load_tokenizer


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    template: Template
    label: str
    model_path: str
    adapter_path: str | None


@dataclass
class GenerationSettings:
    max_new_tokens: int = 256
    batch_size: int = 8
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()


def resolve_adapter(path: str | None) -> Path | None:
    """An adapter folder, or a run folder that holds one at its top level."""
    if path is None:
        return None
    folder = Path(path)
    if (folder / "adapter_config.json").is_file():
        return folder
    raise ModelError(f"--adapter {path}: no adapter_config.json there (expected an adapter or a LoRA run folder)")


def run_template_settings(folder: Path | None) -> tuple[str | None, CustomTemplate | None]:
    """The template a run trained with, read from its saved config.yaml (``(None, None)`` when absent)."""
    if folder is None or not (folder / "config.yaml").is_file():
        return None, None
    data = (yaml.safe_load((folder / "config.yaml").read_text("utf-8")) or {}).get("data", {})
    custom = data.get("custom_template")
    return data.get("template"), CustomTemplate(**custom) if custom else None


def load_for_eval(
    model_path: str, adapter: str | None = None, *, template: str | None = None, dtype: str = "auto",
    label: str | None = None, trust_remote_code: bool = False, custom_template: CustomTemplate | None = None,
) -> LoadedModel:
    adapter_dir = resolve_adapter(adapter)
    model_dir = Path(model_path)
    config = ModelConfig(name_or_path=model_path, dtype=dtype, trust_remote_code=trust_remote_code)
    tokenizer_source = adapter_dir if adapter_dir and (adapter_dir / "tokenizer_config.json").is_file() else None
    tokenizer = load_tokenizer(config if tokenizer_source is None else config.model_copy(
        update={"name_or_path": str(tokenizer_source)}))
    model = load_model(config)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    run_name, custom = run_template_settings(adapter_dir or (model_dir if model_dir.is_dir() else None))
    chosen = template if template is not None else run_name
    custom = custom_template or custom
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        template=build_template(chosen, tokenizer, custom),
        label=label or (adapter_dir.name if adapter_dir else model_dir.name or model_path),
        model_path=model_path,
        adapter_path=str(adapter_dir) if adapter_dir else None,
    )


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def stop_token_ids(loaded: LoadedModel) -> list[int]:
    """EOS plus every stop string that is a single token (e.g. <|im_end|>), so generation ends at the turn's end."""
    ids = {loaded.tokenizer.eos_token_id} if loaded.tokenizer.eos_token_id is not None else set()
    for text in loaded.template.stop_strings:
        encoded = loaded.tokenizer.encode(text, add_special_tokens=False)
        if len(encoded) == 1:
            ids.add(encoded[0])
    return sorted(ids)


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    cut = min((text.find(s) for s in stops if s and s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


@torch.no_grad()
def generate_answers(
    loaded: LoadedModel, prompts: Sequence[Record], settings: GenerationSettings, *, desc: str = "generate"
) -> Iterator[tuple[int, str]]:
    """Yield ``(index, answer)`` for each prompt record (its final answer, if any, is not shown to the model)."""
    tokenizer = loaded.tokenizer
    model = loaded.model
    stops = tuple(settings.stop) + loaded.template.stop_strings
    eos_ids = stop_token_ids(loaded)
    collator = PaddedCollator(pad_token_id=tokenizer.pad_token_id, padding_side="left")
    device = next(model.parameters()).device
    bar = tqdm(total=len(prompts), desc=desc, unit="sample", dynamic_ncols=True)
    index = 0
    for batch in _batches(prompts, settings.batch_size):
        features = [{"input_ids": encode_prompt(loaded.template, tokenizer, r.system, r.prompt_turns)} for r in batch]
        inputs = collator(features)
        output = model.generate(
            input_ids=inputs["input_ids"].to(device),
            attention_mask=inputs["attention_mask"].to(device),
            max_new_tokens=settings.max_new_tokens,
            do_sample=settings.do_sample,
            temperature=settings.temperature if settings.do_sample else None,
            top_p=settings.top_p if settings.do_sample else None,
            eos_token_id=eos_ids or None,
            pad_token_id=tokenizer.pad_token_id,
        )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        for row in new_tokens:
            text = tokenizer.decode(row, skip_special_tokens=False)
            text, _ = cut_at_stop(text, stops + (tokenizer.pad_token or "",))
            yield index, text.strip()
            index += 1
        bar.update(len(batch))
    bar.close()


@torch.no_grad()
def reference_losses(
    loaded: LoadedModel, records: Sequence[Record], cutoff_len: int, batch_size: int
) -> list[float | None]:
    """Mean cross-entropy (nats/token) of each record's final answer given its prompt; ``None`` if nothing is left."""
    tokenizer = loaded.tokenizer
    model = loaded.model
    device = next(model.parameters()).device
    collator = PaddedCollator(pad_token_id=tokenizer.pad_token_id)
    out: list[float | None] = []
    for batch in _batches(records, batch_size):
        examples = [tokenize_record(r, loaded.template, tokenizer, cutoff_len, "last_turn") for r in batch]
        kept = [e for e in examples if e is not None]
        losses = iter(_per_sample_loss(model, collator, kept, device) if kept else [])
        out.extend(next(losses) if e is not None else None for e in examples)
    return out


def _per_sample_loss(model: Any, collator: PaddedCollator, examples: list, device: Any) -> list[float]:
    batch = collator([{"input_ids": e.input_ids, "labels": e.labels} for e in examples])
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    labels = batch["labels"].to(device)[:, 1:]
    logits = logits[:, :-1].float()
    token_loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(labels.shape)
    counts = (labels != IGNORE_INDEX).sum(dim=1).clamp(min=1)
    return [float(v) for v in (token_loss.sum(dim=1) / counts).tolist()]


def mean_loss(losses: Sequence[float | None]) -> tuple[float | None, float | None]:
    """(mean reference loss, its perplexity) over the samples that have one."""
    values = [v for v in losses if v is not None]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    return mean, math.exp(min(mean, 50.0))
