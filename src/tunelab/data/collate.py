"""What the collators read (training features: token ids and labels as 4-byte arrays) and batches padded to their
own longest sample (never to cutoff_len)."""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tunelab.data.tokenize import IGNORE_INDEX


def training_features(examples: list[Any]) -> list[dict[str, Any]]:
    """The Trainer's dataset: each example's token ids and labels as arrays of 4-byte integers.

    In Python lists a token costs 36 bytes (an 8-byte slot and a 28-byte int object: ids above 256 and the -100
    labels are not shared), in ``array("i")`` 4 — for the whole run, since the dataset lives until training ends
    (34 MB on the peer bench's 2,000 samples; a dataset of 10M tokens would hold 720 MB as lists). The collators
    read features as sequences (``list(feature["input_ids"])``), so every batch is the same.
    """
    return [{"input_ids": _int32(e.input_ids), "labels": _int32(e.labels)} for e in examples]


def _int32(values: Any) -> array:
    """``values`` as ``array("i")``; the tokenization cache already reads examples as such arrays (not copied)."""
    return values if isinstance(values, array) and values.typecode == "i" else array("i", values)


@dataclass
class PaddedCollator:
    pad_token_id: int
    padding_side: str = "right"

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        ids, labels, mask = [], [], []
        for f in features:
            pad = longest - len(f["input_ids"])
            row_ids = list(f["input_ids"])
            row_labels = list(f.get("labels", f["input_ids"]))
            if self.padding_side == "right":
                ids.append(row_ids + [self.pad_token_id] * pad)
                labels.append(row_labels + [IGNORE_INDEX] * pad)
                mask.append([1] * len(row_ids) + [0] * pad)
            else:
                ids.append([self.pad_token_id] * pad + row_ids)
                labels.append([IGNORE_INDEX] * pad + row_labels)
                mask.append([0] * pad + [1] * len(row_ids))
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "attention_mask": torch.tensor(mask, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
        }
