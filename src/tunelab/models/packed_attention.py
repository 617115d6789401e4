"""Attention that keeps the samples of a flat (padding-free or packed) row apart, and the check that it does.

What transformers 5.24 offers, and why tunelab adds its own SDPA path:

- ``flash_attention_2/3`` read ``cu_seq_lens_q/k`` and run varlen kernels: cost Σ lᵢ², nothing materialised. Used
  as is when the model runs on it (CUDA + flash-attn).
- ``sdpa``/``eager``: ``masking_utils`` detects packing from ``position_ids`` (a restart means a new sample) and
  builds a dense block-diagonal mask over the whole row: correct, but (Σ lᵢ)² memory and compute, and SDPA can
  no longer use its fused causal kernel. Worse, the detection only runs when there is no KV cache, and models
  create one whenever ``config.use_cache`` is true (the default, also in training) — then the row gets one plain
  causal mask and every sample attends to the samples before it, silently. (Checked on Qwen2 and Llama.)
- ``flex_attention`` builds a block-sparse mask (cost close to Σ lᵢ²), but on CPU it is fast only under
  ``torch.compile`` (minutes of compile, a C++ toolchain), and eagerly it materialises the full score matrix.

So on SDPA/eager tunelab registers ``tunelab_varlen_sdpa``: one fused causal SDPA call per sample, sliced out of
the row at the ``cu_seq_lens`` boundaries. Cost Σ lᵢ² with no mask built, the same kernel the padded path uses
(so fp32 results match it to rounding), any device, autograd as usual; the price is a Python loop of
``samples × layers`` kernel calls, negligible next to the matmuls of a batch on a CPU. On CUDA in bf16/fp16 it
uses PyTorch's own varlen FlashAttention (``torch.nn.attention.varlen``, one kernel per row, no flash-attn
package needed) when this torch has it, and keeps the per-sample loop off cuDNN otherwise (see ``_no_cudnn``).
Everything that is not a flat row (padded batches with a mask, generation with a KV cache) goes to transformers'
own SDPA unchanged.

Whatever kernel runs, :func:`enable_padding_free` proves isolation on the real model before training: it packs two
short random sequences, changes the first, and requires the second one's logits to stay the same and to equal
its logits when run alone. A model that fails (or cannot run the probe) trains on padded batches, with the reason
printed — never on contaminated rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from tunelab.models.lean_activations import remember
from tunelab.models.load import probe_autocast

VARLEN_SDPA = "tunelab_varlen_sdpa"
# Implementations that isolate samples of a flat row by themselves (varlen kernels reading cu_seq_lens).
NATIVE_VARLEN = ("flash_attention_2", "flash_attention_3", "flash_attention_4")
# Implementations replaced by VARLEN_SDPA for flat rows (it computes the same causal attention per sample).
REPLACEABLE = ("sdpa", "eager", VARLEN_SDPA)


def varlen_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """``[B, heads, T, d]`` query/key/value -> ``[B, T, heads, d]``, causal within each sample of a flat row."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, _, length, _ = query.shape
    if attention_mask is not None or batch != 1 or key.shape[2] != length:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, **kwargs)
    return _flat_row_attention(query, key, value, dropout, scaling, sliding_window, kwargs)


# Never traced by torch.compile (train.torch_compile): the sample boundaries are read from the batch as Python
# ints, so a traced version would specialise on them and recompile at every step (each flat row has new lengths).
@torch.compiler.disable
def _flat_row_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float, scaling: float | None,
    sliding_window: int | None, kwargs: dict[str, Any],
) -> tuple[torch.Tensor, None]:
    length = query.shape[2]
    if kwargs.get("softcap") is not None:  # enable_padding_free refuses such models; never compute it wrong
        raise ValueError(f"{VARLEN_SDPA} does not implement attention logit soft-capping")
    bounds = _sample_bounds(kwargs, length)
    gqa = query.shape[1] != key.shape[1]
    dtype = attention_dtype(query)
    if query.is_cuda and dtype in (torch.float16, torch.bfloat16) and dropout == 0.0:
        q, k, v = (t.to(dtype) for t in (query, key, value))
        out = _cuda_varlen(q, k, v, bounds, kwargs.get("cu_seq_lens_q"), scaling, sliding_window, gqa)
        if out is not None:
            return out, None
    outputs = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=False):
        q, k, v = query[:, :, start:end], key[:, :, start:end], value[:, :, start:end]
        if sliding_window is not None and end - start > sliding_window:
            rows = torch.arange(end - start, device=query.device)
            band = (rows[:, None] >= rows[None, :]) & (rows[:, None] - rows[None, :] < sliding_window)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=band, dropout_p=dropout, scale=scaling,
                                                 enable_gqa=gqa)
        else:
            with _no_cudnn(query):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, scale=scaling,
                                                     enable_gqa=gqa)
        outputs.append(out)
    result = _join(outputs)
    # o_proj keeps this copy for its backward; the per-sample outputs are kept by SDPA's backward anyway, so a lean
    # layer (train.lean_activations) remakes it from them instead.
    remember(result, lambda: _join(outputs))
    return result, None


def _join(outputs: list[torch.Tensor]) -> torch.Tensor:
    attn = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
    return attn.transpose(1, 2).contiguous()


def attention_dtype(query: torch.Tensor) -> torch.dtype:
    """The precision attention runs in: autocast's when it is on, as for the SDPA call it replaces.

    Full fine-tuning keeps fp32 master weights, so the residual stream and the rotary-embedded query are fp32
    even under bf16 autocast; SDPA would cast them itself, and the varlen kernel must do the same instead of
    falling back to the per-sample loop (measured on an H200: full fine-tuning of a 1.5B shape at 4.6% MFU
    against LoRA's 16% on the same packed batches, before this)."""
    device = query.device.type
    if query.dtype == torch.float32 and torch.is_autocast_enabled(device):
        autocast = torch.get_autocast_dtype(device)
        if autocast in (torch.float16, torch.bfloat16):
            return autocast
    return query.dtype


def _no_cudnn(query: torch.Tensor) -> Any:
    """On CUDA, keep per-sample SDPA calls off the cuDNN backend: it builds an execution plan for every new sequence
    length, and a flat row brings new lengths at every step (seen on an H200: several times slower than padded)."""
    import contextlib

    if not query.is_cuda:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


# PyTorch's own varlen FlashAttention (torch.nn.attention.varlen, CUDA, fp16/bf16): one kernel for the whole row.
# Disabled for the process after its first failure (an older torch without it, an unsupported head size). Its
# keyword names (they changed between torch releases) are read once: every layer of every forward calls it, and
# inspect.signature costs tens of microseconds of host time, which short GPU steps wait on.
_VARLEN: dict[str, Any] = {"usable": True, "params": None}


def _cuda_varlen(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bounds: list[int], cu: Any,
                 scaling: float | None, sliding_window: int | None, gqa: bool) -> torch.Tensor | None:
    if not _VARLEN["usable"]:
        return None
    try:
        from torch.nn.attention.varlen import varlen_attn

        if _VARLEN["params"] is None:
            import inspect

            _VARLEN["params"] = frozenset(inspect.signature(varlen_attn).parameters)
        params = _VARLEN["params"]
        if cu is None:
            cu = torch.tensor(bounds, dtype=torch.int32, device=query.device)
        cu = cu.to(torch.int32)
        longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:], strict=False))
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [1, heads, T, d] -> [T, heads, d]
        if gqa and "enable_gqa" not in params:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        extra: dict[str, Any] = {"scale": scaling}
        if "window_size" in params:
            extra["window_size"] = (sliding_window - 1 if sliding_window is not None else -1, 0)
        elif sliding_window is None and "is_causal" in params:
            extra["is_causal"] = True
        else:
            return None
        if gqa and "enable_gqa" in params:
            extra["enable_gqa"] = True
        out = varlen_attn(q, k, v, cu, cu, longest, longest, **extra)
    except (ImportError, RuntimeError, TypeError, ValueError, NotImplementedError):
        _VARLEN["usable"] = False
        return None
    return out.unsqueeze(0)


# The boundaries of the last flat row seen, keyed by its cu_seq_lens tensor object (held, so the id cannot be reused):
# every layer of one forward passes the same tensor, and reading it from the GPU in each layer would stall the
# pipeline once per layer instead of once per forward.
_LAST_BOUNDS: list[Any] = [None, None]


def _sample_bounds(kwargs: dict[str, Any], length: int) -> list[int]:
    """Sample boundaries of a flat row: from ``cu_seq_lens_q`` (tunelab's collators), else from ``position_ids``
    restarts (transformers' own rule, for other flattening collators), else one sample."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        if _LAST_BOUNDS[0] is not cu:
            _LAST_BOUNDS[:] = [cu, [int(b) for b in cu.tolist()]]
        return _LAST_BOUNDS[1]
    positions = kwargs.get("position_ids")
    if positions is None or positions.shape[-1] != length:
        return [0, length]
    row = positions.reshape(-1, length)[0]
    restarts = ((torch.diff(row) != 1).nonzero().flatten() + 1).tolist()
    return [0, *restarts, length]


def varlen_sdpa_mask(
    batch_size: int, q_length: int, kv_length: int, q_offset: Any = 0, kv_offset: Any = 0,
    attention_mask: torch.Tensor | None = None, **kwargs: Any,
) -> torch.Tensor | None:
    """No mask for a single unpadded row without cache history: the attention function applies causality per
    sample itself (building transformers' block-diagonal mask here is exactly the (Σ lᵢ)² cost avoided)."""
    from transformers.masking_utils import sdpa_mask

    no_history = isinstance(q_offset, int) and isinstance(kv_offset, int) and q_offset == kv_offset == 0
    if attention_mask is None and batch_size == 1 and q_length == kv_length and no_history:
        return None
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, attention_mask=attention_mask, **kwargs)


def register_varlen_sdpa() -> None:
    """Add ``tunelab_varlen_sdpa`` to transformers' attention registries (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_attention)
    AttentionMaskInterface.register(VARLEN_SDPA, varlen_sdpa_mask)


@dataclass(frozen=True)
class PaddingFreeSupport:
    ok: bool
    reason: str = ""
    attention: str = ""
    """The attention implementation flat rows run on (when ``ok``)."""
    previous_attention: str = ""


def enable_padding_free(model: Any, row_length: int) -> PaddingFreeSupport:
    """Switch ``model`` to an attention that isolates the samples of a flat row, and prove it does.

    On failure the model is left as it was and the reason says why (the caller falls back to padded batches).
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    previous = inner.config._attn_implementation
    reason = _static_reason(model, inner, row_length, previous)
    if reason:
        return PaddingFreeSupport(False, reason, previous_attention=previous)
    attention = VARLEN_SDPA if previous in REPLACEABLE else previous
    if attention != previous:
        register_varlen_sdpa()
        inner.set_attn_implementation(attention)
    try:
        reason = probe_isolation(model, previous)
    except Exception as exc:  # any failure of the probe means "not proven": fall back, say why
        reason = f"the isolation probe failed: {type(exc).__name__}: {exc}"
    if reason:
        restore_attention(model, previous)
        return PaddingFreeSupport(False, reason, previous_attention=previous)
    return PaddingFreeSupport(True, attention=attention, previous_attention=previous)


def restore_attention(model: Any, previous: str) -> None:
    """Put back the attention implementation the model had before :func:`enable_padding_free`."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if previous and inner.config._attn_implementation != previous:
        inner.set_attn_implementation(previous)


def prompt_learning(model: Any) -> bool:
    """A peft prefix/prompt/p-tuning model: its forward adds virtual tokens the base model never sees alone."""
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


def _static_reason(model: Any, inner: Any, row_length: int, attention: str) -> str:
    """Reasons visible from the architecture alone (the probe catches the rest)."""
    import inspect

    config = inner.config
    if prompt_learning(model):
        return "prompt-learning adapters prepend virtual tokens to every row"
    if attention not in REPLACEABLE + NATIVE_VARLEN + ("flex_attention",):
        return f"attention {attention!r} has no padding-free path"
    if attention in REPLACEABLE and getattr(config, "attn_logit_softcapping", None) is not None:
        return "attention logit soft-capping has no padding-free SDPA path (varlen FlashAttention has one)"
    if "position_ids" not in inspect.signature(inner.forward).parameters:
        return f"{type(inner).__name__}.forward takes no position_ids, so positions cannot restart per sample"
    if not getattr(inner, "_supports_attention_backend", False):
        return f"{type(inner).__name__} does not route attention through transformers' AttentionInterface"
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if kinds - {"full_attention", "sliding_attention"}:
        return f"layer types {sorted(kinds)} (chunked or linear attention) have no padding-free path"
    window = getattr(config, "sliding_window", None)
    if "sliding_attention" in kinds and window is not None and window < row_length:
        return f"sliding-window attention ({window} tokens) shorter than the row length {row_length}"
    return ""


@torch.no_grad()
def probe_isolation(model: Any, reference_attention: str) -> str:
    """Two short random sequences in one flat row: the second one's logits must not change when the first one
    does, and must equal its logits alone under ``reference_attention``. Returns "" when both hold."""
    from tunelab.data.packing import FlatCollator

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        vocab = inner.config.vocab_size
        generator = torch.Generator().manual_seed(0)
        first = torch.randint(0, vocab, (7,), generator=generator).tolist()
        other = torch.randint(0, vocab, (7,), generator=generator).tolist()
        second = torch.randint(0, vocab, (5,), generator=generator).tolist()

        def tail_logits(head: list[int]) -> torch.Tensor:
            batch = FlatCollator()([{"input_ids": head}, {"input_ids": second}])
            batch.pop("labels")
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            return model(**batch, use_cache=False).logits[0, len(head):].float()

        with probe_autocast(model):
            packed, changed = tail_logits(first), tail_logits(other)
        current = inner.config._attn_implementation
        if current != reference_attention:
            inner.set_attn_implementation(reference_attention)
        try:
            with probe_autocast(model):
                alone = model(input_ids=torch.tensor([second], device=device), use_cache=False).logits[0].float()
        finally:
            if current != reference_attention:
                inner.set_attn_implementation(current)
    finally:
        model.train(was_training)
    if not (torch.isfinite(packed).all() and torch.isfinite(alone).all()):
        return "the model's logits are not finite, so isolation cannot be checked"
    dtype = next(model.parameters()).dtype
    if not same_logits(packed, changed, dtype):
        return "a sample's logits changed when another sample in the same row changed (attention crosses samples)"
    if not same_logits(packed, alone, dtype):
        return "a sample's logits in a flat row differ from its logits alone (positions or attention not per sample)"
    return ""


def same_logits(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> bool:
    """Equal up to the rounding of ``dtype``: max difference within 1e-4 of the largest logit in fp32; in bf16/fp16
    a relative L2 error under 5%. Two attention kernels round differently, and in half precision the difference
    grows with depth (a 32-layer Llama-3-8B shape on an H200 was past a 3% max-abs bound), while what the probe
    looks for — attention across samples, positions not restarting, a missing causal mask — changes logits by
    tens of percent."""
    if dtype == torch.float32:
        return bool((got - expected).abs().max() <= 1e-4 * max(1.0, float(expected.abs().max())))
    return bool(torch.linalg.vector_norm(got - expected) <= 0.05 * torch.linalg.vector_norm(expected))
