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


def load_model(config: ModelConfig, path: str | None = None) -> Any:
    """A causal LM in the configured precision. fp16 weights stay fp32: fp16 is run as autocast with loss scaling."""
    from transformers import AutoModelForCausalLM

    dtype = resolve_dtype(config.dtype)
    kwargs: dict[str, Any] = {
        "dtype": torch.float32 if dtype == "fp16" else DTYPES[dtype],
        "trust_remote_code": config.trust_remote_code,
    }
    if config.attn_implementation is not None:
        check_attention(config.attn_implementation)
        kwargs["attn_implementation"] = config.attn_implementation
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
