"""The lean causal-LM loss: logits only where a label is supervised, in chunks, never ``tokens × vocab`` at once.

A model's own loss runs the LM head over every position (prompt and padding included) and keeps the whole
``[tokens, vocab]`` logit tensor, in fp32, for the backward pass — on a 150k vocabulary that is most of the
activation memory of an SFT step. Here the decoder body runs as usual, the hidden states are gathered where the
(shifted) label is supervised, and the head + cross-entropy run on those rows only, chunk by chunk:

- a plain ``nn.Linear`` head on CUDA with ``liger-kernel`` installed: Liger's fused linear cross-entropy;
- a plain ``nn.Linear`` head otherwise: :class:`_LinearCrossEntropySum`, which computes each chunk's gradient in
  the forward pass (the softmax minus the one-hot target), so only one chunk of logits exists at a time and
  nothing is recomputed (the same idea as Liger's kernel, in PyTorch);
- any other head module (an adapted ``lm_head``): each chunk under activation checkpointing.

The sum is divided by ``num_items_in_batch`` — the supervised tokens of the whole accumulation window, counted by
the Trainer — exactly as transformers' ``ForCausalLMLoss`` does, so 1×8 and 8×1 still give the same step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tunelab.data.tokenize import IGNORE_INDEX
from tunelab.models.load import probe_autocast

# Logit elements per chunk: 2**25 fp32 values (128 MiB; about 220 rows of a 152k vocabulary).
CHUNK_LOGITS = 2**25


def causal_lm_parts(model: Any) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """The decoder body and the LM head of a causal LM (adapters stay in place), or ``None``."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not hasattr(inner, "get_decoder") or not hasattr(inner, "get_output_embeddings"):
        return None
    body, head = inner.get_decoder(), inner.get_output_embeddings()
    if body is inner or head is None:
        return None
    return body, head


@torch.no_grad()
def lean_loss_unsupported(model: Any) -> str:
    """Why the lean loss cannot stand in for the model's own logits ("" when it can).

    Checked on the real model: ``head(body(x))`` must equal ``model(x).logits``. Models that post-process logits
    (soft-capping, logit scaling) or compute them elsewhere fail this and keep their own loss.
    """
    from tunelab.models.packed_attention import prompt_learning

    if prompt_learning(model):
        return "prompt-learning adapters add virtual tokens in the model's own forward"
    parts = causal_lm_parts(model)
    if parts is None:
        return f"{type(model).__name__} has no separate decoder body and LM head"
    body, head = parts
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    # Known post-processing of the head's output (Gemma 2/3 soft-capping, Cohere and Granite scaling): named
    # explicitly because on a randomly initialised model the probe below cannot see it (tanh(x/30)*30 ≈ x for
    # small logits).
    for name, neutral in (("final_logit_softcapping", None), ("logit_scale", 1.0), ("logits_scaling", 1.0)):
        value = getattr(inner.config, name, None)
        if value is not None and value != neutral:
            return f"the model post-processes its logits (config.{name}={value})"
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        ids = torch.randint(0, inner.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(0))
        ids = ids.to(device)
        with probe_autocast(model):
            expected = model(input_ids=ids, use_cache=False).logits.float()
            got = head(body(input_ids=ids, use_cache=False).last_hidden_state).float()
    except Exception as exc:  # an exotic forward: keep the model's own loss and say why
        return f"the decoder body and head could not be run apart: {type(exc).__name__}: {exc}"
    finally:
        model.train(was_training)
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-3, atol=1e-3):
        return "the model's logits are not the LM head of the decoder's last hidden state (logit post-processing)"
    return ""


def supervised_lm_loss(
    model: Any, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Causal-LM cross-entropy over supervised positions: summed, then divided by ``num_items_in_batch`` (or by
    this batch's supervised tokens when the Trainer did not count the window)."""
    parts = causal_lm_parts(model)
    if parts is None:
        raise TypeError(f"{type(model).__name__} has no separate decoder body and LM head")
    body, head = parts
    labels = inputs["labels"]
    body_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "num_items_in_batch")}
    hidden = body(**body_inputs).last_hidden_state
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]  # position t predicts token t+1
    keep = targets != IGNORE_INDEX
    selected, wanted = hidden[keep], targets[keep]
    if chunk_rows is None:
        chunk_rows = max(1, CHUNK_LOGITS // max(int(getattr(head, "out_features", 0) or 1), 1))
    total = linear_cross_entropy_sum(selected, head, wanted, chunk_rows)
    if num_items_in_batch is None:
        num_items_in_batch = keep.sum()
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def linear_cross_entropy_sum(
    hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, chunk_rows: int
) -> torch.Tensor:
    """``sum(cross_entropy(head(hidden), targets))`` in fp32 without holding all logits at once."""
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0  # keeps the graph connected when a batch has nothing supervised
    if type(head) is torch.nn.Linear:
        if hidden.is_cuda:
            liger = _liger_loss()
            if liger is not None:
                return liger(head.weight, hidden, targets, head.bias).float()
        if torch.is_grad_enabled() and (hidden.requires_grad or head.weight.requires_grad):
            return _LinearCrossEntropySum.apply(hidden, head.weight, head.bias, targets, chunk_rows)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_rows):
        piece, wanted = hidden[start : start + chunk_rows], targets[start : start + chunk_rows]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, head, piece, wanted, use_reentrant=False)
        else:
            total = total + _chunk_loss(head, piece, wanted)
    return total


def _chunk_loss(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def _liger_loss() -> Any:
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    return LigerFusedLinearCrossEntropyLoss(reduction="sum")


class _LinearCrossEntropySum(torch.autograd.Function):
    """Sum of cross-entropies of ``hidden @ weight.T + bias``; gradients are formed chunk by chunk in forward.

    d(loss)/d(logits) = softmax(logits) - onehot(target), so each chunk's logits are turned into their gradient at
    once and dropped; backward only scales the stored gradients by the incoming scalar.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, chunk_rows: int) -> torch.Tensor:
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_bias = bias is not None and ctx.needs_input_grad[2]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias else None
        for start in range(0, hidden.shape[0], chunk_rows):
            end = min(start + chunk_rows, hidden.shape[0])
            piece, wanted = hidden[start:end], targets[start:end]
            logits = F.linear(piece, weight, bias).float()
            log_z = torch.logsumexp(logits, dim=-1)
            total += (log_z - logits.gather(1, wanted[:, None]).squeeze(1)).sum()
            # The softmax in the logits' own memory, and nothing of this chunk left when the next one's logits are
            # made: ``torch.exp`` kept a second chunk of logits (128 MiB at CHUNK_LOGITS) beside them, and the names
            # kept both alive into the next chunk. Same kernels, same values.
            grad = logits.sub_(log_z[:, None]).exp_()
            del logits
            grad[torch.arange(end - start, device=grad.device), wanted] -= 1.0
            grad = grad.to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[start:end] = grad @ weight
            if grad_weight is not None:
                grad_weight += (grad.t() @ piece).float()
            if grad_bias is not None:
                grad_bias += grad.float().sum(0)
            del grad
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[Any, ...]:
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        scale = grad_total.float()
        out_hidden = grad_hidden * scale.to(grad_hidden.dtype) if grad_hidden is not None else None
        out_weight = (grad_weight * scale).to(ctx.weight_dtype) if grad_weight is not None else None
        out_bias = (grad_bias * scale).to(ctx.weight_dtype) if grad_bias is not None else None
        return out_hidden, out_weight, out_bias, None, None
