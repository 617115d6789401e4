"""(IA)^3 through peft: learned per-channel scales of attention keys/values and feed-forward activations."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tunelab.config.schema import MethodConfig


def apply_ia3(model: Any, config: MethodConfig, new_token_ids: Sequence[int] = ()) -> Any:
    from peft import IA3Config, get_peft_model

    settings = config.ia3
    feedforward = settings.feedforward_modules
    if feedforward is None and isinstance(settings.target_modules, list):
        # peft's default feed-forward list would name modules outside the user's targets, which peft rejects.
        feedforward = []
    # target_modules None leaves the choice to peft's per-architecture defaults (k/v and the MLP down projection).
    return get_peft_model(model, IA3Config(
        task_type="CAUSAL_LM",
        target_modules=settings.target_modules,
        feedforward_modules=feedforward,
    ))
