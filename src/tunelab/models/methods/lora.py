"""LoRA and DoRA adapters through peft (QLoRA and the second phase of hybrid reuse :func:`apply_lora`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tunelab.config.schema import MethodConfig


def apply_lora(model: Any, config: MethodConfig, new_token_ids: Sequence[int] = ()) -> Any:
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
        modules_to_save=list(settings.modules_to_save) or None,
        trainable_token_indices=trainable_token_indices(model, new_token_ids) if new_token_ids else None,
    )
    return get_peft_model(model, peft_config)


def trainable_token_indices(model: Any, token_ids: Sequence[int]) -> dict[str, list[int]]:
    """peft's row-wise trainable tokens for new tokens: only their rows of the embedding (and head) train.

    With tied embeddings one entry covers both; an untied head needs its own, or the model could read the new
    tokens but never learn to write them.
    """
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()
    names = {id(module): name.rsplit(".", 1)[-1] for name, module in model.named_modules()}
    indices = {names[id(embedding)]: list(token_ids)}
    if head is not None and head.weight is not embedding.weight:
        indices[names[id(head)]] = list(token_ids)
    return indices
