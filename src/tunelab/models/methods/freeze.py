"""Freeze tuning: only chosen decoder layers (and optionally embeddings/head) train."""

from __future__ import annotations

from typing import Any

import torch

from tunelab.config.schema import MethodConfig
from tunelab.errors import ConfigError


def decoder_layers(model: Any) -> torch.nn.ModuleList:
    """The stack of transformer blocks: the ModuleList whose length is the config's layer count."""
    count = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return module
    raise ConfigError("method.name: freeze cannot find the decoder layers of this architecture; use lora or full")


def chosen_layers(spec: int | list[int], total: int) -> list[int]:
    if isinstance(spec, int):
        if not 0 < spec <= total:
            raise ConfigError(f"method.freeze.trainable_layers: {spec} is not between 1 and {total} (the layer count)")
        return list(range(total - spec, total))
    picked = []
    for index in spec:
        if not -total <= index < total:
            raise ConfigError(f"method.freeze.trainable_layers: layer {index} does not exist (model has {total})")
        picked.append(index % total)
    return sorted(set(picked))


def apply_freeze(model: Any, config: MethodConfig) -> Any:
    settings = config.freeze
    layers = decoder_layers(model)
    for param in model.parameters():
        param.requires_grad_(False)
    for index in chosen_layers(settings.trainable_layers, len(layers)):
        for param in layers[index].parameters():
            param.requires_grad_(True)
    # With tied embeddings the input embedding and the head are one tensor: asking for either trains both.
    if settings.train_embeddings:
        model.get_input_embeddings().weight.requires_grad_(True)
    if settings.train_head:
        model.get_output_embeddings().weight.requires_grad_(True)
    return model
