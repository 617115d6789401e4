"""Full fine-tuning: every weight trains."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tunelab.config.schema import MethodConfig


def apply_full(model: Any, config: MethodConfig, new_token_ids: Sequence[int] = ()) -> Any:
    for param in model.parameters():
        param.requires_grad_(True)
    return model
