"""Tuning methods: a registry keyed by ``method.name`` (a test checks it matches the schema's choices)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


__all__ = ["ADAPTER_METHODS", "METHODS", "apply_method", "count_parameters"]
