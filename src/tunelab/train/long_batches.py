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

import math
import random
from collections.abc import Sequence
from typing import Any

import torch
import torch.utils.checkpoint

DRAWS = 4096
"""Random batches drawn to estimate the percentile: its estimate moves by well under 1% between seeds."""
MAX_GROUPED_EPOCHS = 64
"""At most this many simulated epochs of length-grouped order (a small data set has few batches an epoch)."""


def batch_token_percentile(lengths: Sequence[int], batch_size: int, *, padded: bool, percentile: float,
                           seed: int = 0, length_group: int = 0) -> int:
    """The ``percentile`` of a training micro-batch's token slots over the batches of rows of ``lengths``: a flat
    batch's slots are its rows' tokens, a padded one's ``batch_size`` times its longest row.

    Batches are drawn at random, as the Trainer's random sampler makes them, unless ``length_group`` is set: then
    they are cut from transformers' own length-grouped order (``group_by_length`` sorts each mega-batch of ``50 x
    length_group`` rows by length), whose batches hold rows of similar lengths, so its padded batches are far smaller
    than random ones of the same rows."""
    if not lengths:
        return 0
    size = min(batch_size, len(lengths))
    if length_group:
        batches = length_grouped_batches(lengths, size, length_group, seed)
    else:
        batches = random_batches(lengths, size, seed)
    sizes = sorted(size * max(rows) if padded else sum(rows) for rows in batches)
    return sizes[min(len(sizes) - 1, math.ceil(percentile / 100 * len(sizes)) - 1)]


def random_batches(lengths: Sequence[int], size: int, seed: int) -> list[list[int]]:
    draw = random.Random(seed)
    return [draw.sample(lengths, size) for _ in range(DRAWS)]


def length_grouped_batches(lengths: Sequence[int], size: int, group: int, seed: int) -> list[list[int]]:
    """The micro-batches of as many epochs of ``LengthGroupedSampler`` order as make about :data:`DRAWS` of them
    (one epoch of a large data set)."""
    from transformers.trainer_pt_utils import get_length_grouped_indices

    rows = list(lengths)
    per_epoch = math.ceil(len(rows) / size)
    batches: list[list[int]] = []
    for epoch in range(min(MAX_GROUPED_EPOCHS, math.ceil(DRAWS / per_epoch))):
        order = get_length_grouped_indices(rows, group, generator=torch.Generator().manual_seed(seed + epoch))
        batches.extend([rows[i] for i in order[start:start + size]] for start in range(0, len(order), size))
    return batches


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


def layers_keeping_activations(model: torch.nn.Module, layers: list[torch.nn.Module]) -> list[torch.nn.Module]:
    """The ``layers`` that keep tensors for the backward pass: from the first whose input or own weights need a
    gradient on. Frozen leading layers (``method: freeze`` trains the last few) build no graph, so recomputing them
    would save nothing; virtual tokens, trained embeddings or an input made to require grad (QLoRA) reach them all."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    upstream = [m for m in (embeddings, getattr(model, "prompt_encoder", None)) if isinstance(m, torch.nn.Module)]
    if any(p.requires_grad for m in upstream for p in m.parameters()) or input_requires_grad(model):
        return layers
    for index, layer in enumerate(layers):
        if any(p.requires_grad for p in layer.parameters()):
            return layers[index:]
    return []


def input_requires_grad(model: torch.nn.Module) -> bool:
    """transformers' ``enable_input_require_grads`` hook is on the model (or, under peft, on the base it wraps)."""
    return any(getattr(module, "_require_grads_hooks", None) or hasattr(module, "_require_grads_hook")
               for module in model.modules() if hasattr(module, "enable_input_require_grads"))


class LongBatchCheckpointing:
    """Decides before each batch which layers recompute, and counts what it did for summary.json."""

    def __init__(self, layers: list[torch.nn.Module], reference_tokens: int, percentile: float) -> None:
        self.layers = layers
        self.reference_tokens = reference_tokens
        self.percentile = percentile
        self.batches = 0
        """Batches that recomputed at least one layer."""
        self.most_layers = 0
        self.checkpointed_calls = 0
        """Layer forwards that actually went through the checkpoint (the proof the flags were obeyed)."""
        self._recomputing = 0
        for layer in layers:
            layer._gradient_checkpointing_func = self._checkpoint

    def _checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        self.checkpointed_calls += 1
        return torch.utils.checkpoint.checkpoint(*args, use_reentrant=False, **kwargs)

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
                "layers": len(self.layers), "checkpointed_layer_calls": self.checkpointed_calls}


def long_batch_checkpointing(model: torch.nn.Module, lengths: Sequence[int], *, batch_size: int, padded: bool,
                             percentile: float, seed: int, length_group: int = 0
                             ) -> tuple[LongBatchCheckpointing | None, str]:
    """The controller for this model and training rows of ``lengths``, and a line saying what it will do (or why
    not). ``length_group``: batches follow transformers' length-grouped order over groups of that many rows."""
    every = checkpointable_layers(model)
    if len(every) < 2:
        return None, "long-batch checkpointing off: the model has no decoder layers transformers can checkpoint"
    layers = layers_keeping_activations(model, every)
    if not layers:
        return None, ("long-batch checkpointing off: no decoder layer keeps activations (none trains, nor anything "
                      "before them)")
    reference = batch_token_percentile(lengths, batch_size, padded=padded, percentile=percentile, seed=seed,
                                       length_group=length_group)
    controller = LongBatchCheckpointing(layers, reference, percentile)
    which = f"{len(layers)} decoder layers" if len(layers) == len(every) else (
        f"last {len(layers)} of the {len(every)} decoder layers (the ones that keep activations)")
    return controller, (
        f"long batches: a batch over {reference:,} token slots (p{percentile:g} of this data's batches) recomputes "
        f"just enough of the {which} in the backward pass to keep no more activations than that "
        "(train.checkpoint_long_batches)"
    )
