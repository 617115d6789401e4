"""Supervised fine-tuning: next-token cross-entropy on answer tokens only.

The loss is causal-LM cross-entropy over labels that are IGNORE_INDEX outside answers — computed by
:func:`~tunelab.train.loss.supervised_lm_loss` (logits only at supervised positions) unless ``lean_loss`` is off,
then by the model itself. The Trainer passes ``num_items_in_batch`` (supervised tokens in the whole accumulation
window), so the sum is divided once per optimizer step and batch 1 x accumulation 8 gives the same update as
batch 8 x accumulation 1. ``batching`` decides the layout of each batch (padded, flat, packed;
:mod:`tunelab.data.packing`).
"""

from __future__ import annotations

from typing import Any

from tunelab.data.packing import BatchingPlan
from tunelab.train.long_batches import LongBatchCheckpointing
from tunelab.train.loss import supervised_lm_loss
from tunelab.train.trainer import TunelabTrainer


def build_sft_trainer(
    *, model: Any, tokenizer: Any, args: Any, train_dataset: list, eval_dataset: list | None, callbacks: list,
    stop_on_nonfinite_loss: bool, batching: BatchingPlan | None = None, lean_loss: bool = False,
    activation_offload: bool = False, master_weights: bool = False, cpu_release_memory: bool = False,
    long_batches: LongBatchCheckpointing | None = None,
) -> TunelabTrainer:
    if batching is None:
        batching = BatchingPlan()
    return TunelabTrainer(
        model=model,
        args=args,
        data_collator=batching.collator(tokenizer.pad_token_id),
        train_dataset=batching.train_rows(train_dataset),
        eval_dataset=eval_dataset or None,
        processing_class=tokenizer,
        callbacks=callbacks,
        stop_on_nonfinite_loss=stop_on_nonfinite_loss,
        loss_fn=supervised_lm_loss if lean_loss else None,
        activation_offload=activation_offload,
        master_weights=master_weights,
        cpu_release_memory=cpu_release_memory,
        long_batches=long_batches,
    )
