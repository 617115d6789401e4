"""QLoRA: the frozen base loaded in 4-bit (NF4/FP4) or 8-bit through bitsandbytes, LoRA adapters on top.

:func:`check_qlora` runs before anything loads: bitsandbytes must be installed, and either a CUDA GPU is present
or the installed bitsandbytes' CPU backend (bitsandbytes >= 0.46) really quantises here. It tries a round trip on a
small tensor instead of trusting version numbers.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Any

import torch

from tunelab.config.schema import MethodConfig
from tunelab.errors import ConfigError
from tunelab.models.methods.lora import apply_lora

NEEDS = "method.name: qlora needs bitsandbytes and a CUDA GPU (pip install 'tunelab[gpu]')"


def check_qlora(config: MethodConfig) -> str:
    """Fail with what is missing, or say where quantised layers will run (``"cuda"`` or ``"cpu"``)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"{NEEDS}; bitsandbytes is not installed. Without a GPU, use method.name=lora")
    if torch.cuda.is_available():
        return "cuda"
    problem = _cpu_backend_problem(config)
    if problem is not None:
        raise ConfigError(f"{NEEDS}; there is no CUDA GPU here and bitsandbytes' CPU backend failed ({problem}). "
                          "Use method.name=lora on this machine")
    return "cpu"


def _cpu_backend_problem(config: MethodConfig) -> str | None:
    """``None`` when a quantise/dequantise round trip works on CPU with the configured settings, else the error."""
    try:
        import bitsandbytes.functional as bnb_functional

        sample = torch.randn(64, 64)
        if config.qlora.bits == 4:
            packed, state = bnb_functional.quantize_4bit(sample, quant_type=config.qlora.quant_type)
            restored = bnb_functional.dequantize_4bit(packed, state)
        else:
            packed, scales, _ = bnb_functional.int8_vectorwise_quant(sample.half())
            restored = bnb_functional.int8_vectorwise_dequant(packed, scales)
        if not torch.allclose(restored.float(), sample, atol=1.0):
            return "the round trip of a test tensor gave wrong values"
    except Exception as exc:  # any failure means "cannot run here"; the message names it
        return f"{type(exc).__name__}: {exc}"
    return None


def quantization_config(config: MethodConfig, compute_dtype: torch.dtype) -> Any:
    from transformers import BitsAndBytesConfig

    settings = config.qlora
    if settings.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=settings.quant_type,
        bnb_4bit_use_double_quant=settings.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def apply_qlora(model: Any, config: MethodConfig, new_token_ids: Sequence[int] = ()) -> Any:
    """Freeze the k-bit base, keep its other weights in their load dtype, and add LoRA adapters.

    Not peft's ``prepare_model_for_kbit_training``: it casts every non-quantised weight (embeddings, norms, head)
    to fp32, which makes the whole residual stream fp32 and doubles activation memory — measured on an H200 at a
    Qwen2.5-1.5B shape, QLoRA then peaked at 52.8 GB against LoRA's 40.1 GB. Norms already compute in fp32
    internally, and the adapters are fp32 (``keep_trainable_fp32``), so nothing needs the upcast.
    """
    for param in model.parameters():  # the non-quantised weights stay in the load dtype (model.dtype)
        param.requires_grad_(False)
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()  # gradient checkpointing on a frozen embedding needs a grad-requiring input
    _keep_training_layout_on_cpu(model)
    return apply_lora(model, config, new_token_ids)


def _keep_training_layout_on_cpu(model: Any) -> None:
    """Workaround (bitsandbytes 0.50 CPU backend): keep 4-bit weights in their trainable layout.

    On CPUs with AVX512-BF16, the first forward pass in eval mode without gradients (an evaluation, or a probe
    before training) repacks ``Linear4bit`` weights into an inference-only layout for good; the next training
    step then fails with "a view of a leaf Variable that requires grad is being used in an in-place operation".
    The flag below is what bitsandbytes checks before repacking.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
