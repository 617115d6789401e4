"""Tuning methods: a registry keyed by ``method.name`` (a test checks it matches the schema's choices)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from tunelab.config.schema import MethodConfig
from tunelab.models.methods.freeze import apply_freeze
from tunelab.models.methods.full import apply_full
from tunelab.models.methods.lora import apply_lora

METHODS: dict[str, Callable[[Any, MethodConfig], Any]] = {
    "full": apply_full,
    "freeze": apply_freeze,
    "lora": apply_lora,
    "dora": apply_lora,
}
ADAPTER_METHODS = frozenset({"lora", "dora"})


def apply_method(model: Any, config: MethodConfig) -> Any:
    return METHODS[config.name](model, config)


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


__all__ = ["ADAPTER_METHODS", "METHODS", "apply_method", "count_parameters", "keep_trainable_fp32"]
