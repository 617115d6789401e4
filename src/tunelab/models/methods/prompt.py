"""Prompt-learning methods through peft: prefix tuning, P-tuning and prompt tuning; and their generation.

All three keep the model frozen and learn ``num_virtual_tokens`` extra positions in front of every sample:
prefix tuning learns a key/value pair per layer, P-tuning learns input embeddings produced by a small encoder,
prompt tuning learns the input embeddings directly.

Generation does not go through ``PeftModel.generate``: since transformers renamed the model's cache argument from
``past_key_values`` to ``cache`` (5.2x; the old name is a deprecated alias), peft 0.21 puts the virtual tokens where
generation no longer looks, so prefix tuning generates without its prefix and prompt/P-tuning re-insert their prompt
at every decoding step. :func:`generate_with_virtual_tokens` does what training does instead, and tests check that its
batched, left-padded, KV-cached logits equal a full forward pass of each sample alone.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch

from tunelab.config.schema import MethodConfig


def apply_prefix(model: Any, config: MethodConfig, new_token_ids: Sequence[int] = ()) -> Any:
    from peft import PrefixTuningConfig, get_peft_model

    settings = config.prefix
    return get_peft_model(model, PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=settings.num_virtual_tokens,
        prefix_projection=settings.prefix_projection,
        encoder_hidden_size=settings.encoder_hidden_size,
    ))


def apply_ptuning(model: Any, config: MethodConfig, new_token_ids: Sequence[int] = ()) -> Any:
    from peft import PromptEncoderConfig, get_peft_model

    settings = config.ptuning
    return get_peft_model(model, PromptEncoderConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=settings.num_virtual_tokens,
        encoder_hidden_size=settings.encoder_hidden_size,
        encoder_reparameterization_type=settings.encoder_type,
        encoder_num_layers=settings.encoder_num_layers,
        encoder_dropout=settings.encoder_dropout,
    ))


def apply_prompt_tuning(model: Any, config: MethodConfig, new_token_ids: Sequence[int] = ()) -> Any:
    from peft import PromptTuningConfig, get_peft_model

    settings = config.prompt_tuning
    init: dict[str, Any] = {"prompt_tuning_init": "RANDOM"}
    if settings.init_text is not None:
        # peft loads a tokenizer from this path to embed the text; the model's own folder holds the one it uses.
        init = {"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": settings.init_text,
                "tokenizer_name_or_path": model.config.name_or_path}
    return get_peft_model(model, PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=settings.num_virtual_tokens, **init,
    ))


def uses_virtual_tokens(model: Any) -> bool:
    """True for a peft model whose active adapter is a prompt-learning one (and is not disabled)."""
    config = getattr(model, "active_peft_config", None)
    return bool(config is not None and config.is_prompt_learning and not getattr(model, "_adapters_disabled", False))


@torch.no_grad()
def generate_with_virtual_tokens(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any
) -> Any:
    """``model.generate`` for a prompt-learning adapter: the same layout as training, batched and KV-cached.

    Returns ``input_ids`` followed by the new tokens, like ``generate`` (or its output object, when asked).
    ``num_virtual_tokens`` placeholder ids go in front of each row and the attention mask covers them, so positions
    are counted as in training (the virtual tokens take positions 0..V-1, a row's first real token V) and left
    padding stays masked. Prefix tuning gets its learned keys/values as a pre-filled cache for the placeholders;
    prompt and P-tuning get their learned embeddings as the placeholders' input embeddings.
    """
    from peft import PeftType

    peft_config = model.active_peft_config
    virtual = peft_config.num_virtual_tokens
    batch = input_ids.shape[0]
    # The placeholders' ids are never embedded (prefix: already in the cache; prompt: replaced by inputs_embeds).
    placeholder_id = kwargs.get("pad_token_id") or 0
    placeholders = torch.full((batch, virtual), placeholder_id, dtype=input_ids.dtype, device=input_ids.device)
    ids = torch.cat([placeholders, input_ids], dim=1)
    mask = torch.cat([torch.ones_like(placeholders, dtype=attention_mask.dtype), attention_mask], dim=1)
    base = model.get_base_model()
    if peft_config.peft_type == PeftType.PREFIX_TUNING:
        cache_argument = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
        kwargs[cache_argument] = model.get_prompt(batch)
        output = base.generate(input_ids=ids, attention_mask=mask, **kwargs)
    else:
        embeds = model.word_embeddings(input_ids)
        prompts = model.get_prompt(batch_size=batch).to(embeds.dtype)
        output = base.generate(input_ids=ids, inputs_embeds=torch.cat([prompts, embeds], dim=1),
                               attention_mask=mask, **kwargs)
    if hasattr(output, "sequences"):  # return_dict_in_generate=True: the same object, placeholders dropped
        output.sequences = output.sequences[:, virtual:]
        return output
    return output[:, virtual:]
