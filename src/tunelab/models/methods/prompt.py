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


def cache_argument(model: Any) -> str:
    """The name under which ``model.forward`` takes its KV cache (``cache`` since transformers 5.2x)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def virtual_token_inputs(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, Any]:
    """Inputs for the base model's forward that put the active prompt-learning adapter in front of every row.

    The attention mask gets ``num_virtual_tokens`` ones in front, so positions are counted as in training (the
    virtual tokens take positions 0..V-1, a row's first real token V) and left padding stays masked. Prefix tuning
    adds its learned keys/values as a pre-filled cache (under :func:`cache_argument`) beside ``input_ids``; prompt
    and P-tuning replace ``input_ids`` by ``inputs_embeds``: the learned embeddings, then the rows' own.
    """
    from peft import PeftType

    peft_config = model.active_peft_config
    batch = input_ids.shape[0]
    ones = torch.ones(batch, peft_config.num_virtual_tokens, dtype=attention_mask.dtype, device=attention_mask.device)
    mask = torch.cat([ones, attention_mask], dim=1)
    if peft_config.peft_type == PeftType.PREFIX_TUNING:
        return {"input_ids": input_ids, "attention_mask": mask,
                cache_argument(model.get_base_model()): model.get_prompt(batch)}
    embeds = model.word_embeddings(input_ids)
    prompts = model.get_prompt(batch_size=batch).to(embeds.dtype)
    return {"inputs_embeds": torch.cat([prompts, embeds], dim=1), "attention_mask": mask}


@torch.no_grad()
def generate_with_virtual_tokens(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any
) -> Any:
    """``model.generate`` for a prompt-learning adapter: the same layout as training, batched and KV-cached.

    Returns ``input_ids`` followed by the new tokens, like ``generate`` (or its output object, when asked). The
    inputs are :func:`virtual_token_inputs`; ``generate`` also wants an id for every position (it reads the new
    ones past the cache), so ``num_virtual_tokens`` placeholder ids go in front of each row.
    """
    virtual = model.active_peft_config.num_virtual_tokens
    inputs = virtual_token_inputs(model, input_ids, attention_mask)
    # The placeholders' ids are never embedded (prefix: already in the cache; prompt: replaced by inputs_embeds).
    placeholder_id = kwargs.get("pad_token_id") or 0
    placeholders = torch.full((input_ids.shape[0], virtual), placeholder_id, dtype=input_ids.dtype,
                              device=input_ids.device)
    inputs["input_ids"] = torch.cat([placeholders, input_ids], dim=1)
    output = model.get_base_model().generate(**inputs, **kwargs)
    if hasattr(output, "sequences"):  # return_dict_in_generate=True: the same object, placeholders dropped
        output.sequences = output.sequences[:, virtual:]
        return output
    return output[:, virtual:]
