"""``train.checkpoint_long_batches``: a batch longer than most recomputes just enough decoder layers in the backward
pass that its activations take about the memory a typical batch's do.

Why: activation memory grows with the tokens of a batch, so a run's peak is set by its longest batches, a few in a
hundred on instruction data with a long tail (the peer bench's 30 steps: a median batch of 1,596 tokens, a longest
of 2,922). Gradient checkpointing for every step caps that peak but recomputes every layer of every step (a third
more compute); without it, the rare long batch decides how much memory the whole run needs, on a GPU whether it
runs out at step 3,000. Here the reference is a percentile of the run's own batch sizes (``long_batch_percentile``),
estimated before training from the training rows' lengths: a batch of ``n`` tokens above the reference ``r``
recomputes ``ceil(L * (1 - r / n))`` of its ``L`` layers, so that its kept activations, ``n * (L - k)`` layer-tokens,
stay within the reference batch's ``r * L``; every other batch runs with nothing recomputed.

How: transformers' decoder layers (``GradientCheckpointingLayer``) checkpoint themselves when their
``gradient_checkpointing`` flag is set, through ``_gradient_checkpointing_func``; this sets that function once
(non-reentrant ``torch.utils.checkpoint``, so frozen bases work) and flips the flags of the first ``k`` layers before
each batch. No library decides the layer count per batch: transformers and peft check-point every layer or every
n-th, for every step. Lean activations step aside in a layer that checkpoints (``lean_layer_forward``).
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Sequence
from typing import Any

import torch
import torch.utils.checkpoint

DRAWS = 4096
"""Random batches drawn to estimate the percentile: its estimate moves by well under 1% between seeds."""


def batch_token_percentile(lengths: Sequence[int], batch_size: int, *, padded: bool, percentile: float,
                           seed: int = 0) -> int:
    """The ``percentile`` of a training micro-batch's token slots, over random batches of the rows' ``lengths``:
    a flat batch's slots are its rows' tokens, a padded one's ``batch_size`` times its longest row."""
    if not lengths:
        return 0
    draw = random.Random(seed)
    size = min(batch_size, len(lengths))
    sizes = sorted(
        size * max(rows) if padded else sum(rows)
        for rows in (draw.sample(lengths, size) for _ in range(DRAWS))
    )
    return sizes[min(len(sizes) - 1, math.ceil(percentile / 100 * len(sizes)) - 1)]


def layers_to_recompute(tokens: int, reference: int, layers: int) -> int:
    """How many of ``layers`` a batch of ``tokens`` recomputes so that it keeps no more than ``reference`` tokens'
    worth of every layer's activations."""
    if tokens <= reference or reference <= 0:
        return 0
    return min(layers, -(-layers * (tokens - reference) // tokens))  # exact ceil(L * (1 - r / n)), no float


def checkpointable_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks that transformers can checkpoint one by one, in model order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]


class LongBatchCheckpointing:
    """Decides before each batch which layers recompute, and counts what it did for summary.json."""

    def __init__(self, layers: list[torch.nn.Module], reference_tokens: int, percentile: float) -> None:
        self.layers = layers
        self.reference_tokens = reference_tokens
        self.percentile = percentile
        self.batches = 0
        """Batches that recomputed at least one layer."""
        self.most_layers = 0
        self._recomputing = 0
        checkpoint = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
        for layer in layers:
            layer._gradient_checkpointing_func = checkpoint

    def before_batch(self, tokens: int) -> int:
        """Set the layers' flags for a batch of ``tokens`` token slots; returns how many recompute."""
        count = layers_to_recompute(tokens, self.reference_tokens, len(self.layers))
        if count != self._recomputing:
            for index, layer in enumerate(self.layers):
                layer.gradient_checkpointing = index < count
            self._recomputing = count
        if count:
            self.batches += 1
            self.most_layers = max(self.most_layers, count)
        return count

    def stop(self) -> None:
        """Leave every layer as it was (not checkpointing): evaluation, export and a later run see the plain model."""
        self.before_batch(0)

    def record(self) -> dict[str, Any]:
        return {"reference_tokens": self.reference_tokens, "percentile": self.percentile,
                "batches_recomputing": self.batches, "most_layers_recomputed": self.most_layers,
                "layers": len(self.layers)}


def long_batch_checkpointing(model: torch.nn.Module, lengths: Sequence[int], *, batch_size: int, padded: bool,
                             percentile: float, seed: int) -> tuple[LongBatchCheckpointing | None, str]:
    """The controller for this model and training rows of ``lengths``, and a line saying what it will do (or why
    not)."""
    layers = checkpointable_layers(model)
    if len(layers) < 2:
        return None, "long-batch checkpointing off: the model has no decoder layers transformers can checkpoint"
    reference = batch_token_percentile(lengths, batch_size, padded=padded, percentile=percentile, seed=seed)
    controller = LongBatchCheckpointing(layers, reference, percentile)
    return controller, (
        f"long batches: a batch over {reference:,} token slots (p{percentile:g} of this data's batches) recomputes "
        f"just enough of the {len(layers)} decoder layers in the backward pass to keep no more activations than that "
        "(train.checkpoint_long_batches)"
    )
