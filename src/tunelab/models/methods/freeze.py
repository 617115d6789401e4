"""Freeze tuning: only chosen decoder layers, parameters matching name patterns, and optionally embeddings/head
train."""

from __future__ import annotations

import re
from collections.abc import Sequence
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
        if not 0 <= spec <= total:
            raise ConfigError(f"method.freeze.trainable_layers: {spec} is not between 0 and {total} (the layer count)")
        return list(range(total - spec, total))
    picked = []
    for index in spec:
        if not -total <= index < total:
            raise ConfigError(f"method.freeze.trainable_layers: layer {index} does not exist (model has {total})")
        picked.append(index % total)
    return sorted(set(picked))


def matching_parameters(model: Any, patterns: Sequence[str]) -> set[str]:
    """Names of the parameters any pattern is found in (``re.search``); a pattern matching nothing is an error."""
    names = [name for name, _ in model.named_parameters()]
    matched: set[str] = set()
    for pattern in patterns:
        hits = {name for name in names if re.search(pattern, name)}
        if not hits:
            raise ConfigError(f"method.freeze.trainable_patterns: {pattern!r} matches no parameter name; names look "
                              f"like {names[len(names) // 2]!r}")
        matched |= hits
    return matched


def apply_freeze(model: Any, config: MethodConfig, new_token_ids: Sequence[int] = ()) -> Any:
    """Freeze everything, then unfreeze the chosen layers, pattern matches, and embeddings/head when asked.

    New tokens (``model.new_special_tokens``) need trained embedding rows, so they unfreeze the whole input
    embedding and head (peft's row-wise trainable tokens exist for adapters only).
    """
    settings = config.freeze
    layers = decoder_layers(model)
    for param in model.parameters():
        param.requires_grad_(False)
    for index in chosen_layers(settings.trainable_layers, len(layers)):
        for param in layers[index].parameters():
            param.requires_grad_(True)
    chosen = matching_parameters(model, settings.trainable_patterns)
    for name, param in model.named_parameters():
        if name in chosen:
            param.requires_grad_(True)
    # With tied embeddings the input embedding and the head are one tensor: asking for either trains both.
    if settings.train_embeddings or new_token_ids:
        model.get_input_embeddings().weight.requires_grad_(True)
    if settings.train_head or new_token_ids:
        model.get_output_embeddings().weight.requires_grad_(True)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("method.freeze: nothing trains; set trainable_layers, trainable_patterns, "
                          "train_embeddings or train_head")
    return model
