"""Batches without padding: padding-free (one flat row per batch) and packed (several samples per fixed row).

Both lay a batch out as one row of real tokens, ``position_ids`` restarting at 0 for every sample, and the
boundaries as ``cu_seq_lens_q/k`` (cumulative lengths, the keyword arguments transformers' attention functions
take). What keeps samples apart is the attention: ``tunelab.models.packed_attention`` runs each sample on its own,
and varlen FlashAttention reads the same ``cu_seq_lens``. The label of each sample's first token is set to
``IGNORE_INDEX``: in a flat row the causal-LM shift would otherwise train the previous sample's last token to
predict it, a target the padded batch never has.

- ``padded``: :class:`~tunelab.data.collate.PaddedCollator`, every row padded to the batch's longest sample.
- ``padding_free``: the same samples, order and steps as ``padded``, flattened (:class:`FlatCollator`).
- ``packed``: samples first bin-packed into rows of at most ``cutoff_len`` tokens (:func:`pack_rows`), then
  ``batch_size`` rows per step, flattened: fewer, fuller steps (a different optimisation trajectory).
- ``length_grouped``: padded batches whose samples have similar lengths (transformers' ``group_by_length``).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tunelab.data.collate import PaddedCollator
from tunelab.data.tokenize import IGNORE_INDEX

BATCHINGS = ("padded", "padding_free", "packed", "length_grouped")
FLAT_BATCHINGS = ("padding_free", "packed")


@dataclass
class FlatCollator:
    """Concatenate a batch into one row of shape ``[1, total_tokens]`` with per-sample positions and boundaries.

    A feature is one sample, or a packed row that lists its samples' lengths in ``sample_lengths``.
    """

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        lengths: list[int] = []
        for feature in features:
            row_ids = list(feature["input_ids"])
            row_labels = list(feature.get("labels", row_ids))
            start = 0
            for length in feature.get("sample_lengths") or [len(row_ids)]:
                ids.extend(row_ids[start : start + length])
                labels.append(IGNORE_INDEX)  # never predicted from the previous sample's last token
                labels.extend(row_labels[start + 1 : start + length])
                positions.extend(range(length))
                lengths.append(length)
                start += length
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0)
        longest = max(lengths)
        return {
            "input_ids": torch.tensor([ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long),
            "cu_seq_lens_q": cu,
            "cu_seq_lens_k": cu,
            "max_length_q": longest,
            "max_length_k": longest,
        }


def pack_indices(lengths: Sequence[int], row_length: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing of samples of ``lengths`` into rows of at most ``row_length`` tokens: each
    row's sample indices. Deterministic (ties keep the original order)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, row index), sorted: the tightest row that fits comes first
    for index in order:
        length = lengths[index]
        if length > row_length:
            raise ValueError(f"sample of {length} tokens is longer than the packed row ({row_length})")
        slot = bisect.bisect_left(free, (length, -1))
        if slot < len(free):
            space, row = free.pop(slot)
            rows[row].append(index)
        else:
            space, row = row_length, len(rows)
            rows.append([index])
        bisect.insort(free, (space - length, row))
    return rows


def pack_rows(features: Sequence[dict[str, Any]], row_length: int) -> list[dict[str, Any]]:
    """Samples packed into rows of at most ``row_length`` tokens (:func:`pack_indices`). Each row keeps its samples
    whole and lists their lengths, so the collator can restart positions and isolate attention per sample."""
    packed = []
    for members in pack_indices([len(feature["input_ids"]) for feature in features], row_length):
        packed.append({
            "input_ids": [t for i in members for t in features[i]["input_ids"]],
            "labels": [t for i in members for t in features[i].get("labels", features[i]["input_ids"])],
            "sample_lengths": [len(features[i]["input_ids"]) for i in members],
        })
    return packed


@dataclass(frozen=True)
class BatchingPlan:
    """How the SFT stage lays out batches, decided after the model loaded (padding-free may fall back)."""

    mode: str = "padded"
    row_length: int = 0
    """Packed row length in tokens (``packed`` only; the data's cutoff_len)."""
    attention_before: str = ""
    """The model's attention implementation before flat rows switched it (restored after training)."""

    @property
    def flat(self) -> bool:
        return self.mode in FLAT_BATCHINGS

    def collator(self, pad_token_id: int) -> Any:
        return FlatCollator() if self.flat else PaddedCollator(pad_token_id=pad_token_id)

    def train_rows(self, features: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return pack_rows(features, self.row_length) if self.mode == "packed" else features

    def row_lengths(self, lengths: Sequence[int]) -> list[int]:
        """The lengths of the rows :meth:`train_rows` makes of samples of ``lengths``, without making them."""
        if self.mode != "packed":
            return list(lengths)
        return [sum(lengths[i] for i in row) for row in pack_indices(lengths, self.row_length)]



def plan_batching(mode: str, model: Any, row_length: int) -> tuple[BatchingPlan, str]:
    """The layout training will use, and a line saying what was decided (and why, on a fallback).

    Flat layouts need the model to keep samples apart: :func:`~tunelab.models.packed_attention.enable_padding_free`
    switches its attention and proves isolation on the model itself; when it cannot, training uses padded
    batches — the same samples, order and steps — and says so.
    """
    if mode not in FLAT_BATCHINGS:
        note = "batching length_grouped: padded batches of similar-length samples" if mode == "length_grouped" else ""
        return BatchingPlan(mode), note
    from tunelab.models.packed_attention import enable_padding_free

    support = enable_padding_free(model, row_length)
    if not support.ok:
        return BatchingPlan("padded"), (
            f"batching: data.batching={mode} is not possible with this model ({support.reason}); training on padded "
            "batches instead (data.batching=length_grouped reduces their padding)"
        )
    layout = "one flat row per batch" if mode == "padding_free" else f"samples packed into rows of {row_length} tokens"
    return BatchingPlan(mode, row_length, support.previous_attention), (
        f"batching {mode}: {layout}, no padding; attention stays within each sample ({support.attention})"
    )
