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

How: the code that makes a remakeable tensor tells :func:`remember` how to remake it, and the calls that take such a
tensor as input (its consumers: the attention's q/k/v projections and the MLP's gate/up projections after the norms,
``o_proj`` after the joined attention output, ``down_proj`` after the SwiGLU product, a whole MLP the patch does not
replace) run under ``saved_tensors_hooks``: when autograd saves the tensor (or a view of it) there, the hook stores
the recipe instead. A recipe is remade once for all the saves of its tensor and dropped after the last one is used.
The hooks are open only around the consumers, not the whole layer: every save under them calls into Python (most
with an extra ``detach``), and most of a layer's saves (rotary, the attention kernel, the norms' insides, SiluMul)
are never of a remembered tensor (bench/step_overhead.py, 28 layers, LoRA: about 2,500 hook calls per step for 196
recipes with the hooks over whole layers, about 970 around the consumers, with the same tensors kept). A layer looks
its consumers up again at every call, so modules replaced after the patch (hybrid's switch to LoRA) get the hooks
too; the tests check that no save of a remembered tensor happens outside them. Where they are open they take the
place of any outer saved-tensor hooks, so lean activations step aside under ``train.activation_offload``.

Not applied with ``train.torch_compile`` (the compiler's partitioner chooses what to recompute across the whole
layer), ``train.liger_kernel`` (Liger's kernels replace the norms and the MLP), ``train.activation_offload`` (its hooks
move every saved tensor) or gradient checkpointing (the whole layer is recomputed; a layer that
``train.checkpoint_long_batches`` makes recompute for one batch runs its plain forward for that batch). Only the
classes listed below are patched; the forward of every one is checked against its own in the tests. The patch
rebinds ``forward`` on existing modules: parameter names, state dicts, adapters and merging do not change.
"""

from __future__ import annotations

import contextlib
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


def _pack_with(recipes: dict[int, Recipe]) -> Callable[[torch.Tensor], Any]:
    def pack(tensor: torch.Tensor) -> Any:
        recipe = recipes.get(tensor.untyped_storage().data_ptr())
        if recipe is None:  # most saves under the hooks: weights, LoRA's inner tensors, autocast's copies
            return tensor
        source = recipe.source()
        if source is None or source.dtype != tensor.dtype:
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


class LayerCall:
    """One decoder-layer call in progress: its recipes, and the context manager that opens its hooks around a
    consumer (nested consumers, such as an adapter's wrapped base layer, reuse the open hooks)."""

    __slots__ = ("depth", "hooks", "recipes")

    def __init__(self) -> None:
        self.recipes: dict[int, Recipe] = {}
        self.hooks = torch.autograd.graph.saved_tensors_hooks(_pack_with(self.recipes), _unpack)
        self.depth = 0

    def __enter__(self) -> None:
        if self.depth == 0:
            self.hooks.__enter__()
        self.depth += 1

    def __exit__(self, *exc: object) -> None:
        self.depth -= 1
        if self.depth == 0:
            self.hooks.__exit__(*exc)


# The decoder-layer call in progress (None outside one, or without grad): a context variable, so that what one thread
# or task remembers never reaches another's hook, and a layer that ends restores the outer value.
_layer_call: contextvars.ContextVar[LayerCall | None] = contextvars.ContextVar("lean_layer_call", default=None)
_NO_WINDOW = contextlib.nullcontext()


def remember(tensor: torch.Tensor, remake: Callable[[], torch.Tensor]) -> bool:
    """Inside a lean layer's forward: wherever a consumer (see the module's docstring) would keep ``tensor`` (or a
    view of it), keep ``remake`` instead. ``remake`` runs without grad, under the autocast state of this forward,
    and must hold only tensors that are kept anyway. Returns False outside a lean layer or without grad (nothing
    is kept then)."""
    call = _layer_call.get()
    if call is None or not torch.is_grad_enabled():
        return False
    device = tensor.device.type
    enabled, dtype = torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)

    def remake_as_in_forward() -> torch.Tensor:
        with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
            return remake()

    call.recipes[tensor.untyped_storage().data_ptr()] = Recipe(weakref.ref(tensor), remake_as_in_forward)
    return True


def consumer_window() -> contextlib.AbstractContextManager[None]:
    """The hooks of the layer call in progress, to run a consumer of remembered tensors under (a no-op outside)."""
    call = _layer_call.get()
    return _NO_WINDOW if call is None else call


def lean_consumer_forward(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    with consumer_window():
        return original(*args, **kwargs)


def lean_layer_forward(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    layer = original.__self__
    # A layer that checkpoints itself (train.checkpoint_long_batches flips the flag per batch) keeps only its input:
    # inside, checkpoint's hooks must see every save, and its recompute runs the plain forward anyway.
    if not torch.is_grad_enabled() or (getattr(layer, "gradient_checkpointing", False) and layer.training):
        return original(*args, **kwargs)
    # Checked at every call, a few dictionary look-ups: modules replaced after the patch (hybrid's switch wraps the
    # projections in LoRA layers) must still run under the hooks.
    open_hooks_in_consumers(layer)
    token = _layer_call.set(LayerCall())
    try:
        return original(*args, **kwargs)
    finally:
        _layer_call.reset(token)


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
    with consumer_window():  # x: the post-attention norm's output, remembered
        gate, up = self.gate_proj(x), self.up_proj(x)
    product = SiluMul.apply(gate, up)
    # down_proj keeps its input (for LoRA A's gradient, or its weight's): remade from gate and up, kept by SiluMul.
    remember(product, lambda: F.silu(gate.detach()) * up.detach())
    with consumer_window():
        return self.down_proj(product)


def lean_norm_forward(original: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    if _layer_call.get() is None or not torch.is_grad_enabled():
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


def lean_activations_problem(*, torch_compile: bool, liger_kernel: bool, gradient_checkpointing: bool,
                             activation_offload: bool = False) -> str:
    """Why lean activations are not used in this run ("" when they are)."""
    if torch_compile:
        return "train.torch_compile chooses what to recompute itself"
    if liger_kernel:
        return "Liger's kernels replace the norms and the MLP"
    if gradient_checkpointing:
        return "gradient checkpointing recomputes the whole layer"
    if activation_offload:  # inside the consumers' hooks the offload's would not run: those saves would stay put
        return "train.activation_offload moves the saved tensors off the device itself"
    return ""


def is_silu(activation: Any) -> bool:
    """torch's SiLU, or transformers' ``SiLUActivation`` (``F.silu``; what ``hidden_act: silu`` builds in 5.x)."""
    return isinstance(activation, torch.nn.SiLU) or type(activation).__name__ == "SiLUActivation"


def patch_swiglu_mlp(module: torch.nn.Module) -> bool:
    if type(module).__name__ in SWIGLU_MLP_CLASSES and is_silu(getattr(module, "act_fn", None)):
        module.forward = types.MethodType(lean_swiglu_forward, module)
        return True
    return False


# The attention's modules that take a remembered tensor as input: q/k/v the input norm's output, o_proj the joined
# attention output (packed_attention.py). Every listed layer class's attention has them.
ATTENTION_CONSUMERS = ("q_proj", "k_proj", "v_proj", "o_proj")


def consumers(layer: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of ``layer`` to run under its hooks: the attention's projections (the whole attention where they
    are missing), and the MLP when the patch did not replace its forward (its own opens the hooks where needed)."""
    attention = layer.self_attn
    projections = [attention._modules.get(name) for name in ATTENTION_CONSUMERS]
    modules = projections if None not in projections else [attention]
    mlp = layer.mlp
    forward = mlp.__dict__.get("forward")
    if getattr(forward, "__func__", None) is not lean_swiglu_forward:
        modules.append(mlp)
    return modules


def open_hooks_in_consumers(layer: torch.nn.Module) -> None:
    for module in consumers(layer):
        forward = module.__dict__.get("forward")
        if not (isinstance(forward, functools.partial) and forward.func is lean_consumer_forward):
            module.forward = functools.partial(lean_consumer_forward, module.forward)


def apply_lean_activations(model: torch.nn.Module) -> int:
    """Patch every decoder layer of a known class in ``model`` (its MLP, its two norms where they are of a known
    class, and the consumers of remembered tensors); returns how many layers (0: none, and the model is
    unchanged)."""
    patched = 0
    for layer in model.modules():
        if type(layer).__name__ not in DECODER_LAYER_CLASSES:
            continue
        forward = layer.__dict__.get("forward")
        if isinstance(forward, functools.partial) and forward.func is lean_layer_forward:  # patched before
            patched += 1
            continue
        patch_swiglu_mlp(layer.mlp)
        for name in ("input_layernorm", "post_attention_layernorm"):
            norm = getattr(layer, name, None)
            if type(norm).__name__ in RMS_NORM_CLASSES:
                norm.forward = functools.partial(lean_norm_forward, norm.forward)
        open_hooks_in_consumers(layer)
        layer.forward = functools.partial(lean_layer_forward, layer.forward)
        patched += 1
    return patched
