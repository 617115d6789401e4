"""LoRA and DoRA adapters through peft."""

from __future__ import annotations

from typing import Any

from tunelab.config.schema import MethodConfig


def apply_lora(model: Any, config: MethodConfig) -> Any:
    from peft import LoraConfig, get_peft_model

    settings = config.lora
    peft_config = LoraConfig(
        task_type="CAUSAL_LM",
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        use_dora=config.name == "dora",
        use_rslora=settings.use_rslora,
    )
    return get_peft_model(model, peft_config)
