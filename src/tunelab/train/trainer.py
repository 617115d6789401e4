"""The one thin Trainer subclass: token accounting, a non-finite-loss guard and activation offloading; the stage
supplies the loss (``loss_fn``; without one, the model's own)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.autograd.graph import save_on_cpu
from transformers import Trainer

from tunelab.data.tokenize import IGNORE_INDEX
from tunelab.errors import RunError
from tunelab.train.meter import FedBatches

LossFn = Callable[[Any, dict[str, Any], Any], torch.Tensor]


class TunelabTrainer(Trainer):
    def __init__(
        self, *args: Any, stop_on_nonfinite_loss: bool = True, loss_fn: LossFn | None = None,
        activation_offload: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.stop_on_nonfinite_loss = stop_on_nonfinite_loss
        self.loss_fn = loss_fn
        """The stage's loss ``(model, inputs, num_items_in_batch) -> loss``; ``None`` uses the model's own."""
        self.activation_offload = activation_offload
        """Keep the tensors autograd saves during the loss's forward in CPU memory (``train.activation_offload``)."""
        self.fed = FedBatches()
        self._restored_tokens = 0
        self._new_tokens: torch.Tensor | None = None
        self._count_restored = False

    @property
    def supervised_tokens_seen(self) -> int:
        new = int(self._new_tokens) if self._new_tokens is not None else 0
        return self._restored_tokens + new

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        if not self._count_restored:  # state (with log history) is loaded from a checkpoint inside train()
            self.restore_token_count()
            self._count_restored = True
        labels = inputs.get("labels")
        if labels is not None:
            # Kept as a device tensor and read only when logging: reading it every step would stall the GPU.
            count = (labels[..., 1:] != IGNORE_INDEX).sum()
            self._new_tokens = count if self._new_tokens is None else self._new_tokens + count
        self.fed.add(inputs)
        return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        if not self.activation_offload:
            return self._compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # Only the forward needs the hooks: each saved tensor is copied to CPU when autograd saves it and copied back
        # when the backward reads it. Under non-reentrant gradient checkpointing, checkpoint's own hooks apply inside
        # each checkpointed layer, so only the layers' inputs are offloaded. Pinned memory needs CUDA (run.py
        # refuses offloading without it; unpinned is for CPU tests).
        with save_on_cpu(pin_memory=torch.cuda.is_available()):
            return self._compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def _compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool, num_items_in_batch: Any) -> Any:
        # No KV cache in training: it only costs memory, and transformers skips its packed-sequence detection
        # whenever a cache exists (flex_attention relies on that detection for flat rows).
        inputs = {**inputs, "use_cache": False}
        # A wrapped model (DDP, FSDP, DeepSpeed) must run its own forward, which the stage's loss would bypass by
        # calling the decoder body directly: gradients would not be synchronised.
        if self.loss_fn is None or "labels" not in inputs or model is not self.model:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # transformers leaves mixed precision to accelerate, which wraps ``model.forward`` in autocast. The stage's
        # loss calls the decoder body and the head directly, so it enters the same autocast itself: without it a bf16
        # run with fp32 master weights (full fine-tuning) did every matmul in fp32 (4.6% MFU on an H200), and LoRA's
        # fp32 adapters cast each layer's input to fp32.
        with self.accelerator.autocast():
            loss = self.loss_fn(model, inputs, num_items_in_batch)
        # As in Trainer.compute_loss: with the token count summed over all processes, scale back up.
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        return (loss, {"loss": loss.detach()}) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs or "eval_loss" not in logs:
            logs["supervised_tokens"] = self.supervised_tokens_seen
        # Checked at each logging step (the logged loss averages every step since the last one, and a NaN or inf
        # anywhere in it survives the average because logging_nan_inf_filter is off).
        if "loss" in logs and not math.isfinite(logs["loss"]) and self.stop_on_nonfinite_loss:
            raise RunError(
                f"training loss became {logs['loss']} at step {self.state.global_step}; lower "
                "train.learning_rate, check the data, or set train.stop_on_nonfinite_loss=false to continue anyway"
            )
        super().log(logs, start_time)

    def restore_token_count(self) -> None:
        """After a resume, continue the supervised-token count from the last logged value."""
        for entry in reversed(self.state.log_history):
            if "supervised_tokens" in entry:
                self._restored_tokens = int(entry["supervised_tokens"])
                return
