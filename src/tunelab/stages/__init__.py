"""Training stages: a registry keyed by ``train.stage`` (a test checks it matches the schema's choices)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tunelab.stages.sft import build_sft_trainer

STAGES: dict[str, Callable[..., Any]] = {"sft": build_sft_trainer}

__all__ = ["STAGES"]
