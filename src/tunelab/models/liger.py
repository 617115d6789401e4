"""``train.liger_kernel``: Liger's Triton kernels for RMSNorm, SwiGLU and RoPE in a loaded model (CUDA only).

Why: on a GPU these elementwise steps run as several memory-bound kernels each (RMSNorm alone: cast, square, mean,
rsqrt, two multiplies) and keep their intermediates for the backward pass. Liger fuses each into one kernel and
recomputes the cheap parts in the backward, so steps are shorter and activation memory smaller, with the same
results to rounding. We call liger-kernel's own per-model patch functions rather than writing kernels; the LM head
and cross-entropy are left to tunelab's lean loss (``train.lean_loss``), which already uses Liger's fused linear
cross-entropy on CUDA.

The patch rebinds ``forward`` on the existing modules (parameter names and state dicts do not change, so saving,
merging and adapters are unaffected) and replaces the modeling module's rotary function for the whole process.
Apply it before peft wraps the model.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from tunelab.errors import ConfigError

# What tunelab asks of liger-kernel (its own default also fuses the LM head and loss, which the lean loss owns here).
LIGER_KERNELS = {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False,
                 "fused_linear_cross_entropy": False}


def liger_problem() -> str:
    """Why ``train.liger_kernel`` cannot run on this machine ("" when it can)."""
    if not torch.cuda.is_available():
        return ("train.liger_kernel: Liger's kernels are written in Triton and need a CUDA GPU; there is none here. "
                "Set train.liger_kernel=false (on a CPU, train.torch_compile=true fuses the same steps)")
    if importlib.util.find_spec("liger_kernel") is None:
        return "train.liger_kernel: liger-kernel is not installed (pip install 'tunelab[gpu]' or liger-kernel)"
    return ""


def supported_model_types() -> list[str]:
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    return sorted(MODEL_TYPE_TO_APPLY_LIGER_FN)


def apply_liger_kernels(model: Any) -> str:
    """Patch ``model`` (a transformers causal LM, not yet wrapped by peft) in place; returns a line for the log."""
    problem = liger_problem()
    if problem:
        raise ConfigError(problem)
    from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

    model_type = getattr(model.config, "model_type", None)
    supported = supported_model_types()
    if model_type not in supported:
        raise ConfigError(f"train.liger_kernel: liger-kernel has no kernels for model type {model_type!r} "
                          f"(it has: {', '.join(supported)}); set train.liger_kernel=false")
    _apply_liger_kernel_to_instance(model=model, **LIGER_KERNELS)
    return f"liger-kernel: fused RMSNorm, SwiGLU and RoPE kernels in this {model_type} model"
