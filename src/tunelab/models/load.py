"""Load tokenizers and causal LMs the way users' real models load: ``from_pretrained`` on a hub id or folder."""

from __future__ import annotations

from typing import Any

import torch

from tunelab.config.schema import ModelConfig
from tunelab.errors import ConfigError, ModelError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_dtype(name: str) -> str:
    """``auto`` -> bf16 on a GPU that supports it, else fp32; fp16 needs CUDA (its loss scaling is CUDA-only)."""
    if name == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    if name == "fp16" and not torch.cuda.is_available():
        raise ConfigError("model.dtype: fp16 training needs a CUDA GPU; on CPU use fp32 or bf16")
    return name


def load_tokenizer(config: ModelConfig) -> Any:
    from transformers import AutoTokenizer

    if not config.name_or_path:
        raise ConfigError("model.name_or_path: required (a hub id or a local folder)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(config.name_or_path, trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.name_or_path: cannot load a tokenizer from {config.name_or_path!r}: {exc}") from None
    if tokenizer.pad_token is None:
        # Padding positions are masked out of attention and loss, so reusing EOS as pad changes nothing learned.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def weight_dtype(name: str) -> torch.dtype:
    """The precision weights are loaded in. fp16 weights stay fp32: fp16 runs as autocast with HF's loss scaling."""
    dtype = resolve_dtype(name)
    return torch.float32 if dtype == "fp16" else DTYPES[dtype]


def load_model(config: ModelConfig, path: str | None = None, *, quantization: Any = None) -> Any:
    """A causal LM in the configured precision (``quantization``: a BitsAndBytesConfig for QLoRA)."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {
        "dtype": weight_dtype(config.dtype),
        "trust_remote_code": config.trust_remote_code,
    }
    if config.attn_implementation is not None:
        check_attention(config.attn_implementation)
        kwargs["attn_implementation"] = config.attn_implementation
    if config.rope_scaling is not None:
        kwargs["rope_parameters"] = rope_parameters(config)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    source = path or config.name_or_path
    try:
        return AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load a causal LM from {source!r}: {exc}") from None


def check_attention(name: str | None) -> None:
    """Fail before anything loads when the chosen attention kernel cannot run here."""
    if name == "flash_attention_2":
        import importlib.util

        if not torch.cuda.is_available():
            raise ConfigError("model.attn_implementation: flash_attention_2 needs a CUDA GPU; use sdpa or eager")
        if importlib.util.find_spec("flash_attn") is None:
            raise ConfigError(
                "model.attn_implementation: flash_attention_2 needs the flash-attn package "
                "(pip install 'tunelab[gpu]'); use sdpa otherwise"
            )


def rope_parameters(config: ModelConfig) -> dict[str, Any]:
    """The checkpoint's RoPE parameters with ``model.rope_scaling`` applied; checked before any weights load.

    Only the checkpoint's config.json is read. transformers 5 keeps RoPE settings in ``config.rope_parameters``
    (``rope_type``, ``factor``, ``rope_theta``); a model without one has no rotary embedding to scale.
    """
    from transformers import AutoConfig

    assert config.rope_scaling is not None
    try:
        model_config = AutoConfig.from_pretrained(config.name_or_path, trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.name_or_path: cannot read the config of {config.name_or_path!r}: {exc}") from None
    current = getattr(model_config.get_text_config(), "rope_parameters", None)
    if not isinstance(current, dict) or "rope_theta" not in current:
        raise ConfigError(f"model.rope_scaling: {model_config.model_type} models have no rotary position "
                          "embedding to scale; remove model.rope_scaling")
    kind = current.get("rope_type", "default")
    if kind not in ("default", config.rope_scaling.type):
        raise ConfigError(f"model.rope_scaling: this checkpoint already uses {kind!r} RoPE scaling; stacking "
                          f"{config.rope_scaling.type!r} on it is not supported")
    return {**current, "rope_type": config.rope_scaling.type, "factor": config.rope_scaling.factor}


def add_new_tokens(tokenizer: Any, tokens: list[str]) -> list[int]:
    """Add ``model.new_special_tokens`` to the tokenizer; the ids of those that were not in it already."""
    if not tokens:
        return []
    before = len(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": list(tokens)}, replace_extra_special_tokens=False)
    return [i for i in tokenizer.convert_tokens_to_ids(list(tokens)) if i >= before]


def match_vocabulary(model: Any, tokenizer: Any, seed: int = 0) -> Any:
    """Grow the embeddings (and head) to the tokenizer when it has tokens the checkpoint lacks.

    New rows start from a normal distribution with the old embeddings' mean and covariance (transformers'
    ``mean_resizing``), drawn under ``seed`` so a resumed run and evaluation get the same rows.
    """
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    return model
