"""Tuning methods: a registry keyed by ``method.name`` (a test checks it matches the schema's choices)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from tunelab.config.schema import MethodConfig, TunelabConfig
from tunelab.errors import ConfigError
from tunelab.models.methods.freeze import apply_freeze
from tunelab.models.methods.full import apply_full
from tunelab.models.methods.hybrid import HYBRID_BASE_DIR, apply_hybrid
from tunelab.models.methods.ia3 import apply_ia3
from tunelab.models.methods.lora import apply_lora
from tunelab.models.methods.prompt import apply_prefix, apply_prompt_tuning, apply_ptuning
from tunelab.models.methods.qlora import apply_qlora, check_qlora, quantization_config

METHODS: dict[str, Callable[[Any, MethodConfig, Sequence[int]], Any]] = {
    "full": apply_full,
    "freeze": apply_freeze,
    "lora": apply_lora,
    "dora": apply_lora,
    "qlora": apply_qlora,
    "prefix": apply_prefix,
    "ptuning": apply_ptuning,
    "prompt_tuning": apply_prompt_tuning,
    "ia3": apply_ia3,
    "hybrid": apply_hybrid,
}
ADAPTER_METHODS = frozenset({"lora", "dora", "qlora", "prefix", "ptuning", "prompt_tuning", "ia3"})
"""Methods whose run folder holds a peft adapter for the unchanged base model (``model.name_or_path``)."""
PROMPT_LEARNING_METHODS = frozenset({"prefix", "ptuning", "prompt_tuning"})
FROZEN_EMBEDDING_METHODS = PROMPT_LEARNING_METHODS | {"ia3"}
"""Methods that cannot train embedding rows, so cannot learn ``model.new_special_tokens``."""


def apply_method(model: Any, config: MethodConfig, new_token_ids: Sequence[int] = ()) -> Any:
    """Make ``model`` trainable as ``config.name`` says; ``new_token_ids`` are added tokens whose rows must train."""
    return METHODS[config.name](model, config, new_token_ids)


def check_method(config: TunelabConfig) -> None:
    """Method choices that cannot work, found before any model loads."""
    if config.method.name == "qlora":
        check_qlora(config.method)
    if config.model.new_special_tokens and config.method.name in FROZEN_EMBEDDING_METHODS:
        raise ConfigError(f"model.new_special_tokens: method {config.method.name} cannot train embeddings, so new "
                          "tokens would stay random; use lora, dora, qlora, full, freeze or hybrid")
    if config.method.name == "prefix" and config.train.gradient_checkpointing:
        raise ConfigError(PREFIX_RECOMPUTE)


def check_adapter_targets(model: Any, config: MethodConfig) -> None:
    """Adapter ``target_modules`` and ``modules_to_save`` that match no module of the loaded model, as a
    ``ConfigError`` before training starts. peft would raise its own error at ``get_peft_model`` (a traceback), and
    under hybrid only at the switch to LoRA, after the whole full fine-tuning phase."""
    from peft import IA3Config, LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    if config.name in ("lora", "dora", "qlora", "hybrid"):
        field, targets, to_save = "method.lora", config.lora.target_modules, list(config.lora.modules_to_save)
        matcher: Any = LoraConfig(target_modules=targets) if targets != "all-linear" else None
    elif config.name == "ia3" and config.ia3.target_modules is not None:
        field, targets, to_save = "method.ia3", config.ia3.target_modules, []
        matcher = IA3Config(target_modules=targets, feedforward_modules=[])
    else:
        return
    names = [name for name, _ in model.named_modules() if name]
    if matcher is not None and not any(check_target_module_exists(matcher, name) for name in names):
        linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                         if "Linear" in type(module).__name__})
        raise ConfigError(f"{field}.target_modules: {targets!r} matches no module of this model; its linear layers "
                          f"are named {', '.join(linear)}" + (" (or use all-linear)" if field == "method.lora" else ""))
    for wanted in to_save:
        if not any(name == wanted or name.endswith(f".{wanted}") for name in names):
            raise ConfigError(f"{field}.modules_to_save: {wanted!r} is not a module of this model (e.g. lm_head, "
                              "embed_tokens)")


PREFIX_RECOMPUTE = (
    "train.gradient_checkpointing: method prefix hands its virtual keys and values to every layer as a KV cache, "
    "which a layer's recompute in the backward pass would extend a second time; use ptuning or prompt_tuning "
    "(virtual tokens in the input), or leave checkpointing off"
)


def method_quantization(config: MethodConfig, load_dtype: torch.dtype) -> Any:
    """The bitsandbytes config the base loads with (QLoRA), else ``None``."""
    if config.name != "qlora":
        return None
    compute = config.qlora.compute_dtype
    return quantization_config(config, load_dtype if compute == "auto" else _compute_dtype(compute))


def _compute_dtype(name: str) -> torch.dtype:
    from tunelab.models.load import weight_dtype

    return torch.float16 if name == "fp16" else weight_dtype(name)


def finetuned_model(name: str, base_model: str, run_dir: Path) -> tuple[str, str | None]:
    """Where a finished run's model is: ``(model path, adapter path or None)`` for :func:`load_for_eval`."""
    if name in ADAPTER_METHODS:
        return base_model, str(run_dir)
    if name == "hybrid":
        return str(run_dir / HYBRID_BASE_DIR), str(run_dir)
    return str(run_dir), None


def keep_trainable_fp32(model: Any) -> Any:
    """Trainable weights in fp32, frozen ones in the load dtype: mixed precision with fp32 master weights.

    With bf16 weights, an AdamW update smaller than bf16's resolution near a weight's value (about 1/256 of it)
    is rounded away, so full or freeze tuning in pure bf16 silently stops learning at small learning rates.
    bf16/fp16 compute still happens under autocast.
    """
    for param in model.parameters():
        if param.requires_grad and param.dtype in (torch.bfloat16, torch.float16):
            param.data = param.data.float()
    return model


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


__all__ = [
    "ADAPTER_METHODS",
    "FROZEN_EMBEDDING_METHODS",
    "METHODS",
    "PROMPT_LEARNING_METHODS",
    "apply_method",
    "check_method",
    "count_parameters",
    "finetuned_model",
    "keep_trainable_fp32",
    "method_quantization",
]
