"""``train.lean_activations``: decoder layers keep fewer tensors for the backward pass and remake the cheap ones.

Why: autograd keeps, per token and layer, several tensors that are cheap elementwise functions of others it keeps
anyway. In a Llama/Qwen-style layer (measured on the peer bench's model, LoRA, fp32): the SwiGLU MLP keeps four
tensors of the intermediate width (the gate output for SiLU's backward, SiLU's output and the up output for the
product's backward, and the product as ``down_proj``'s input), 61% of a step's saved activations; each RMSNorm's
output is kept again by the projections that read it (and the normalized input, when the norm's weight trains); the
padding-free attention's output is kept twice (by SDPA's backward, per sample, and as ``o_proj``'s input, joined).
This keeps the gate and up outputs, each norm's input and the per-sample attention outputs, and remakes the rest in
the backward pass: the product and SiLU (:class:`SiluMul`), the norms (checkpointed, a few elementwise operations),
the joined attention output (a copy). Liger-kernel does the MLP and norm parts in Triton on CUDA; this is plain
PyTorch, so it also runs on a CPU. Results are bit-identical: the remade values come from the same operations on the
same inputs, under the forward's autocast state, and SiluMul's backward uses autograd's own kernels.

How: a patched decoder layer runs its forward under ``saved_tensors_hooks``; the code that makes a remakeable tensor
tells :func:`remember` how to remake it, and when autograd saves that tensor (or a view of it) the hook stores the
recipe instead. A recipe is remade once for all the saves of its tensor and dropped after the last one is used.

Not applied with ``train.torch_compile`` (the compiler's partitioner chooses what to recompute across the whole
layer), ``train.liger_kernel`` (Liger's kernels replace the norms and the MLP) or gradient checkpointing (the whole
layer is recomputed). Only the classes listed below are patched; the forward of every one is checked against its
own in the tests. The patch rebinds ``forward`` on existing modules: parameter names, state dicts, adapters and
merging do not change.
"""

from __future__ import annotations

import contextvars
import functools
import types
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

# transformers classes whose forward is the one assumed here (read in their modeling files; tests run each):
# the MLP is ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``, the norm an RMSNorm of one input, and the layer
# calls ``input_layernorm``, ``self_attn``, ``post_attention_layernorm`` and ``mlp``.
SWIGLU_MLP_CLASSES = frozenset({"LlamaMLP", "Qwen2MLP", "Qwen3MLP", "MistralMLP", "Qwen3MoeMLP", "Qwen2MoeMLP"})
RMS_NORM_CLASSES = frozenset({"LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm", "Qwen3MoeRMSNorm",
                              "Qwen2MoeRMSNorm"})
DECODER_LAYER_CLASSES = frozenset({"LlamaDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer",
                                   "MistralDecoderLayer", "Qwen3MoeDecoderLayer", "Qwen2MoeDecoderLayer"})


@dataclass
class Recipe:
    """How to remake a tensor in the backward pass instead of keeping it from the forward."""

    source: weakref.ref
    """The tensor as made; once it is gone its memory may hold another tensor, which must not match."""
    remake: Callable[[], torch.Tensor]
    packs: int = 0
    remade: torch.Tensor | None = None
    """Remade once for all the saves of one tensor (q, k and v projections all keep the norm's output), and
    dropped after the last of them is used."""


# The recipes of the decoder-layer call in progress (None outside one): a context variable, so that what one thread
# or task remembers never reaches another's hook, and a layer that ends restores the outer value.
_layer_recipes: contextvars.ContextVar[dict[int, Recipe] | None] = contextvars.ContextVar("lean_layer_recipes",
                                                                                          default=None)


def remember(tensor: torch.Tensor, remake: Callable[[], torch.Tensor]) -> bool:
    """Inside a lean layer's forward: wherever autograd would keep ``tensor`` (or a view of it), keep ``remake``
    instead. ``remake`` runs without grad, under the autocast state of this forward, and must hold only tensors
    that are kept anyway. Returns False outside a lean layer or without grad (nothing is kept then)."""
    recipes = _layer_recipes.get()
    if recipes is None or not torch.is_grad_enabled():
        return False
    device = tensor.device.type
    enabled, dtype = torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)

    def remake_as_in_forward() -> torch.Tensor:
        with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
            return remake()

    recipes[tensor.untyped_storage().data_ptr()] = Recipe(weakref.ref(tensor), remake_as_in_forward)
    return True


def _pack_with(recipes: dict[int, Recipe]) -> Callable[[torch.Tensor], Any]:
    def pack(tensor: torch.Tensor) -> Any:
        recipe = recipes.get(tensor.untyped_storage().data_ptr())
        source = recipe.source() if recipe is not None else None
        if recipe is None or source is None or source.dtype != tensor.dtype:
            return tensor
        recipe.packs += 1
        # A remade tensor has the original's layout, so the saved view's geometry applies to it as is.
        return (recipe, tensor.size(), tensor.stride(), tensor.storage_offset())

    return pack


def _unpack(packed: Any) -> torch.Tensor:
    if not isinstance(packed, tuple):
        return packed
    recipe, size, stride, offset = packed
    if recipe.remade is None:
        recipe.remade = recipe.remake()
    view = recipe.remade.as_strided(size, stride, offset)
    recipe.packs -= 1
    if recipe.packs <= 0:
        recipe.remade = None
    return view


def lean_layer_forward(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    if not torch.is_grad_enabled():
        return original(*args, **kwargs)
    recipes: dict[int, Recipe] = {}
    token = _layer_recipes.set(recipes)
    try:
        with torch.autograd.graph.saved_tensors_hooks(_pack_with(recipes), _unpack):
            return original(*args, **kwargs)
    finally:
        _layer_recipes.reset(token)


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
    # down_proj keeps its input (for LoRA A's gradient, or its weight's): remade from gate and up, kept by SiluMul.
    remember(product, lambda: F.silu(gate.detach()) * up.detach())
    return self.down_proj(product)


def lean_norm_forward(original: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    if _layer_recipes.get() is None or not torch.is_grad_enabled():
        return original(x)
    # Inside, the norm keeps its input and, when its weight trains (full fine-tuning), the normalized input too:
    # checkpointed, it keeps only its input (which the residual stream holds anyway) and runs again in the backward
    # pass, a few elementwise operations. With a frozen weight (LoRA) there is nothing to gain, and over an input
    # without grad (a first layer over frozen embeddings) nothing is kept. The projections after the norm keep its
    # output: remade from the input.
    checkpointed = x.requires_grad and any(p.requires_grad for p in original.__self__.parameters())
    normed = torch.utils.checkpoint.checkpoint(original, x, use_reentrant=False) if checkpointed else original(x)
    remember(normed, lambda: original(x.detach()))
    return normed


def lean_activations_problem(*, torch_compile: bool, liger_kernel: bool, gradient_checkpointing: bool) -> str:
    """Why lean activations are not used in this run ("" when they are)."""
    if torch_compile:
        return "train.torch_compile chooses what to recompute itself"
    if liger_kernel:
        return "Liger's kernels replace the norms and the MLP"
    if gradient_checkpointing:
        return "gradient checkpointing recomputes the whole layer"
    return ""


def is_silu(activation: Any) -> bool:
    """torch's SiLU, or transformers' ``SiLUActivation`` (``F.silu``; what ``hidden_act: silu`` builds in 5.x)."""
    return isinstance(activation, torch.nn.SiLU) or type(activation).__name__ == "SiLUActivation"


def patch_swiglu_mlp(module: torch.nn.Module) -> bool:
    if type(module).__name__ in SWIGLU_MLP_CLASSES and is_silu(getattr(module, "act_fn", None)):
        module.forward = types.MethodType(lean_swiglu_forward, module)
        return True
    return False


def apply_lean_activations(model: torch.nn.Module) -> int:
    """Patch every decoder layer of a known class in ``model`` (its MLP and its two norms where they are of a known
    class); returns how many layers (0: none, and the model is unchanged)."""
    patched = 0
    for layer in model.modules():
        if type(layer).__name__ not in DECODER_LAYER_CLASSES:
            continue
        patch_swiglu_mlp(layer.mlp)
        for name in ("input_layernorm", "post_attention_layernorm"):
            norm = getattr(layer, name, None)
            if type(norm).__name__ in RMS_NORM_CLASSES:
                norm.forward = functools.partial(lean_norm_forward, norm.forward)
        layer.forward = functools.partial(lean_layer_forward, layer.forward)
        patched += 1
    return patched
