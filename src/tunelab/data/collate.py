"""Batches padded to their own longest sample (never to cutoff_len)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tunelab.data.tokenize import IGNORE_INDEX


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
