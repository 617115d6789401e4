"""Hybrid: full fine-tuning for the first ``method.hybrid.full_fraction`` of the optimizer steps, then LoRA.

At the switch the fully tuned weights become the frozen base (saved once to ``hybrid-base/`` in the run folder)
and LoRA adapters from ``method.lora`` are attached to it. This module holds the model side; the two training
phases are driven by :mod:`tunelab.train.hybrid`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from tunelab.config.schema import MethodConfig
from tunelab.errors import RunError
from tunelab.models.methods.full import apply_full
from tunelab.models.methods.lora import apply_lora

HYBRID_BASE_DIR = "hybrid-base"
"""Folder in the run folder holding the fully tuned weights the LoRA phase trains on (and the final adapter's base)."""


def apply_hybrid(model: Any, config: MethodConfig, new_token_ids: Sequence[int] = ()) -> Any:
    """The first phase is full fine-tuning: every weight trains."""
    return apply_full(model, config, new_token_ids)


def switch_step(full_fraction: float, max_steps: int) -> int:
    """The optimizer step after which LoRA takes over: at least one step of each phase."""
    if max_steps < 2:
        raise RunError(f"method.name: hybrid needs at least 2 optimizer steps (one full, one LoRA); this run has "
                       f"{max_steps}")
    return min(max(1, round(full_fraction * max_steps)), max_steps - 1)


def attach_lora_to_full(model: Any, config: MethodConfig, *, base_dtype: torch.dtype, seed: int) -> Any:
    """Freeze the fully tuned ``model`` (cast back to ``base_dtype``, its load precision) and add LoRA adapters.

    The adapters are initialised under their own seed, so a run resumed at the switch draws the same initial
    ``lora_A`` as the uninterrupted one, whatever the global random state is at that moment.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    model.to(base_dtype)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return apply_lora(model, config.model_copy(update={"name": "lora"}))
