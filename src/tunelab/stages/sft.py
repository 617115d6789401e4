"""Supervised fine-tuning: next-token cross-entropy on answer tokens only.

The loss is the model's own causal-LM loss over labels that are IGNORE_INDEX outside answers; the Trainer passes
``num_items_in_batch`` (supervised tokens in the whole accumulation window), so the sum is divided once per
optimizer step and batch 1 x accumulation 8 gives the same update as batch 8 x accumulation 1.
"""

from __future__ import annotations

from typing import Any

from tunelab.data.collate import PaddedCollator
from tunelab.train.trainer import TunelabTrainer


def build_sft_trainer(
    *, model: Any, tokenizer: Any, args: Any, train_dataset: list, eval_dataset: list | None, callbacks: list,
    stop_on_nonfinite_loss: bool,
) -> TunelabTrainer:
    return TunelabTrainer(
        model=model,
        args=args,
        data_collator=PaddedCollator(pad_token_id=tokenizer.pad_token_id),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset or None,
        processing_class=tokenizer,
        callbacks=callbacks,
        stop_on_nonfinite_loss=stop_on_nonfinite_loss,
    )
