"""``train.lean_activations``: SwiGLU MLPs keep only their two projections for the backward pass.

Why: in a Llama/Qwen-style layer, ``down_proj(silu(gate_proj(x)) * up_proj(x))`` makes autograd keep four tensors
of the intermediate width (4–6× the hidden size) per token: the gate output (for SiLU's backward), SiLU's output and
the up output (for the product's backward), and the product (the input of ``down_proj``, kept by its LoRA ``A``
matrix or, in full fine-tuning, by its weight gradient). Measured on the peer bench's model in LoRA, those four are
61% of a step's saved activations. Two of them are cheap elementwise functions of the other two, so this keeps the
gate and up outputs and recomputes SiLU and the product in the backward pass: half the MLP's activation memory, for
three elementwise operations per element. Liger-kernel's SwiGLU does the same in Triton on CUDA; this is the same
idea in plain PyTorch, so it also runs on a CPU and under the padding-free path. Results are bit-identical: the
backward uses the very kernels autograd would (``aten.silu_backward`` and the same multiplies), on recomputed
values equal to the forward's.

Not applied with ``train.torch_compile`` (the compiler's partitioner already chooses what to recompute across the
whole layer) or ``train.liger_kernel`` (Liger's SwiGLU replaces the MLP's forward), nor with gradient checkpointing
(the layer's internals are recomputed anyway and nothing of the MLP is kept). Only MLP classes whose forward is
exactly ``down(act(gate(x)) * up(x))`` with SiLU are patched (:data:`SWIGLU_MLP_CLASSES`); the rest keep their own.

The patch rebinds ``forward`` on the existing MLP modules: parameter names, state dicts, adapters and merging do not
change, and peft's LoRA layers inside the MLP are called as before.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F

# transformers MLP classes whose forward is ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` (read in their
# modeling files); a test runs each against its own forward.
SWIGLU_MLP_CLASSES = frozenset({"LlamaMLP", "Qwen2MLP", "Qwen3MLP", "MistralMLP", "Qwen3MoeMLP", "Qwen2MoeMLP"})


class SiluMul(torch.autograd.Function):
    """``silu(gate) * up`` that saves only ``gate`` and ``up``."""

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = ctx.saved_tensors
        # The same kernels and operand order as autograd's MulBackward0 and SiluBackward0, so gradients match bit
        # for bit.
        return torch.ops.aten.silu_backward(grad * up, gate), grad * F.silu(gate)


def lean_swiglu_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    gate, up = self.gate_proj(x), self.up_proj(x)
    product = SiluMul.apply(gate, up)
    if not torch.is_grad_enabled():
        return self.down_proj(product)
    storage = product.untyped_storage().data_ptr()

    def pack(tensor: torch.Tensor) -> Any:
        # down_proj keeps its input (for LoRA A's gradient, or the weight's): keep how to remake it instead; gate
        # and up are saved by SiluMul already. Anything else (a dropout copy, a weight) is kept as it is.
        if tensor.untyped_storage().data_ptr() == storage:
            return ("recompute", tensor.size(), tensor.stride(), tensor.storage_offset())
        return tensor

    def unpack(packed: Any) -> torch.Tensor:
        if isinstance(packed, tuple):
            # A fresh product has the forward one's layout, so the saved view's geometry applies to it as is.
            _, size, stride, offset = packed
            return (F.silu(gate.detach()) * up.detach()).as_strided(size, stride, offset)
        return packed

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return self.down_proj(product)


def lean_mlp_problem(*, torch_compile: bool, liger_kernel: bool, gradient_checkpointing: bool) -> str:
    """Why the lean MLP is not used in this run ("" when it is)."""
    if torch_compile:
        return "train.torch_compile chooses what to recompute itself"
    if liger_kernel:
        return "Liger's SwiGLU replaces the MLP"
    if gradient_checkpointing:
        return "gradient checkpointing recomputes the whole layer"
    return ""


def is_silu(activation: Any) -> bool:
    """torch's SiLU, or transformers' ``SiLUActivation`` (``F.silu``; what ``hidden_act: silu`` builds in 5.x)."""
    return isinstance(activation, torch.nn.SiLU) or type(activation).__name__ == "SiLUActivation"


def apply_lean_mlp(model: torch.nn.Module) -> int:
    """Rebind the forward of every SwiGLU MLP in ``model``; returns how many were patched (0: none of a known
    class, and the model is unchanged)."""
    patched = 0
    for module in model.modules():
        if type(module).__name__ in SWIGLU_MLP_CLASSES and is_silu(getattr(module, "act_fn", None)):
            module.forward = types.MethodType(lean_swiglu_forward, module)
            patched += 1
    return patched
