"""The one thin Trainer subclass: token accounting, a non-finite-loss guard and activation offloading; the stage
supplies the loss (``loss_fn``; without one, the model's own)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from accelerate.utils import DistributedType
from torch.autograd.graph import save_on_cpu
from transformers import Trainer

from tunelab.data.tokenize import IGNORE_INDEX
from tunelab.errors import RunError
from tunelab.train.allocator import LargestBatchRelease
from tunelab.train.long_batches import LongBatchCheckpointing
from tunelab.train.master_weights import (
    MASTER_FILE,
    SINGLE_PROCESS_ONLY,
    MasterWeights,
    bf16_trained,
    load_masters_into_params,
    tensor_to_check,
)
from tunelab.train.meter import FedBatches
from tunelab.train.prompt_encoder_state import load_prompt_encoder, save_prompt_encoder

LossFn = Callable[[Any, dict[str, Any], Any], torch.Tensor]
# Where every process holds the whole model, so the trainable parameters are plain tensors of it (not FSDP's flat
# shards, which accelerate recognises by the model's full parameter list, nor DeepSpeed's, which clips itself).
_WHOLE_MODEL = (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU)


class TunelabTrainer(Trainer):
    def __init__(
        self, *args: Any, stop_on_nonfinite_loss: bool = True, loss_fn: LossFn | None = None,
        activation_offload: bool = False, master_weights: bool = False, cpu_release_memory: bool = False,
        long_batches: LongBatchCheckpointing | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        # Only where each process runs the whole model's layers itself: FSDP and DeepSpeed wrap and shard them.
        whole = self.accelerator.distributed_type in _WHOLE_MODEL and not self.args.gradient_checkpointing
        self.long_batches = long_batches if whole else None
        """``train.checkpoint_long_batches``: how many layers recompute is decided before each batch."""
        on_cpu = cpu_release_memory and self.args.device.type == "cpu"
        self.host_release = LargestBatchRelease.for_this_process() if on_cpu else LargestBatchRelease(None)
        """``train.cpu_release_memory``: the allocator's freed pages go back before each new largest batch."""
        self.master_weights = master_weights
        """Keep bf16 trained weights in the model and fp32 copies in the optimizer (``train.master_weights``)."""
        self._masters: MasterWeights | None = None
        self.stop_on_nonfinite_loss = stop_on_nonfinite_loss
        self.loss_fn = loss_fn
        """The stage's loss ``(model, inputs, num_items_in_batch) -> loss``; ``None`` uses the model's own."""
        self.activation_offload = activation_offload
        """Keep the tensors autograd saves during the loss's forward in CPU memory (``train.activation_offload``)."""
        self.fed = FedBatches()
        self._restored_tokens = 0
        self._new_tokens: torch.Tensor | None = None
        self._count_restored = False
        # Fixed for the life of one Trainer (the hybrid schedule builds a new one when it adds adapters), and walked
        # by Trainer at every step otherwise: see floating_point_ops and _clip_grad_norm.
        self._non_embedding_parameters: int | None = None
        self._trainable: list[torch.nn.Parameter] | None = None
        self._casting_adapters: list[Any] | None = None

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
        if isinstance(ids := inputs.get("input_ids"), torch.Tensor):
            self.host_release.before_batch(ids.numel())
            if self.long_batches is not None:
                self.long_batches.before_batch(ids.numel())
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

    @contextlib.contextmanager
    def _adapter_input_casts_skipped(self) -> Iterator[None]:
        """Under autocast mixed precision, peft casts each LoRA layer's bf16/fp16 input to its fp32 adapter's dtype and
        autocast casts it straight back for the matmul: two copies of the layer's input per adapted linear layer (7
        per decoder layer with ``all-linear``), for the same values. The round trip is exact, so skipping it changes
        no loss or gradient bit (tested, with the copies counted), also when gradient checkpointing recomputes a
        layer with peft's casts. What it saves is memory traffic and kernel launches on a GPU; no speed change is
        visible on a CPU, and the GPU gain is not measured yet. Entered only inside the autocast the lean loss runs
        under, so a bf16 input never meets an fp32 weight outside autocast."""
        device = self.accelerator.device.type
        if not torch.is_autocast_enabled(device) or torch.get_autocast_dtype(device) == torch.float32:
            yield
            return
        if self._casting_adapters is None:
            self._casting_adapters = plain_lora_layers(self.model)
        previous = [layer.cast_input_dtype_enabled for layer in self._casting_adapters]
        for layer in self._casting_adapters:
            layer.cast_input_dtype_enabled = False
        try:
            yield
        finally:
            for layer, enabled in zip(self._casting_adapters, previous, strict=True):
                layer.cast_input_dtype_enabled = enabled

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
        with self.accelerator.autocast(), self._adapter_input_casts_skipped():
            loss = self.loss_fn(model, inputs, num_items_in_batch)
        # As in Trainer.compute_loss: with the token count summed over all processes, scale back up.
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        return (loss, {"loss": loss.detach()}) if return_outputs else loss

    # Trainer walks the whole module tree twice per step for values that never change within a run: the parameter
    # count behind ``total_flos`` and the parameter list it clips, frozen weights included. For a 28-layer LoRA model
    # (730 tensors in 2,333 modules) that is ~7 ms of host time a step on the CI machine (bench/step_overhead.py);
    # with short samples on a GPU the step is bound by host time (bench/RESULTS.md, "GPU pass 4").
    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        main_input = getattr(self.model, "main_input_name", "input_ids")
        if main_input not in inputs or not hasattr(self.model, "num_parameters"):
            return super().floating_point_ops(inputs)
        if self._non_embedding_parameters is None:
            self._non_embedding_parameters = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs[main_input].numel() * self._non_embedding_parameters

    def train(self, *args: Any, **kwargs: Any) -> Any:
        # Kept per training run: another train() on this Trainer may see other trainable parameters.
        self._non_embedding_parameters, self._trainable, self._casting_adapters = None, None, None
        try:
            return super().train(*args, **kwargs)
        finally:
            if self.long_batches is not None:
                self.long_batches.stop()
            if self._masters is not None:  # fp32 copies of every trained weight: not kept past the run
                self._masters.release()
                self._masters, self._trainable = None, None  # the clipping list holds the masters too
                self.drop_optimizer()

    def drop_optimizer(self) -> None:
        """Let go of the optimizer (its state, and the masters it updates) and the scheduler that points at it: the
        Trainer, its callback handler and its accelerator each keep a reference (with master weights, dropping
        ``self.optimizer`` alone left phase 1's masters alive in hybrid's LoRA phase: test_hybrid)."""
        self.optimizer, self.lr_scheduler = None, None
        self.callback_handler.optimizer, self.callback_handler.lr_scheduler = None, None
        self.accelerator._optimizers.clear()
        self.accelerator._schedulers.clear()

    def create_optimizer(self, model: Any = None) -> Any:
        optimizer = super().create_optimizer(model)
        # Only where bf16 weights train (full, freeze, hybrid's full phase): adapters are fp32 already.
        if self.master_weights and self._masters is None and bf16_trained(self.model):
            if self.accelerator.distributed_type != DistributedType.NO:  # run.py refuses launches; this, the rest
                raise RunError(SINGLE_PROCESS_ONLY)
            self._masters = MasterWeights(self.model)
            self._masters.attach(optimizer)
        return optimizer

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self._masters is not None and self.args.should_save:
            self._masters.save(output_dir)
        if self.args.should_save:
            save_prompt_encoder(self.model, output_dir)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        # A checkpoint's model file holds the masters rounded to bf16: a resume reads the masters themselves, whichever
        # setting resumes. With master_weights=optimizer, a checkpoint without them (written with fp32 weights) is
        # refused: its fp32 values would be rounded to bf16 on loading, losing every update below bf16's resolution.
        if checkpoint is None:
            return
        load_prompt_encoder(self.model, checkpoint)  # after the Trainer loaded the adapter file, which lacks it
        if self._masters is not None and not self._masters.load(checkpoint):
            raise RunError(f"{checkpoint} has no {MASTER_FILE}: it was not written with train.master_weights="
                           "optimizer; resume it with the setting it was trained with")
        if self._masters is None:  # written with master_weights=optimizer, resumed with params: exact all the same
            load_masters_into_params(self.model, checkpoint)

    def _trainable_tensors(self, model: Any) -> list[torch.Tensor]:
        """What clipping and the gradient norm read: the masters where they exist (the bf16 gradients were moved
        into them), else the trainable parameters."""
        if self._trainable is None:
            kept = [p for p in model.parameters() if p.requires_grad]
            self._trainable = [tensor_to_check(p) for p in kept] if self._masters is not None else kept
        return self._trainable

    def _clip_grad_norm(self, model: Any) -> Any:
        if self.accelerator.distributed_type not in _WHOLE_MODEL:
            return super()._clip_grad_norm(model)
        return self.accelerator.clip_grad_norm_(self._trainable_tensors(model), self.args.max_grad_norm)

    def _get_grad_norm(self, model: Any, grad_norm: Any = None) -> Any:
        if grad_norm is None and self._masters is not None:  # max_grad_norm=0: the norm is still logged
            grad_norm = self.accelerator.clip_grad_norm_(self._trainable_tensors(model), float("inf"))
        return super()._get_grad_norm(model, grad_norm=grad_norm)

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


def plain_lora_layers(model: Any) -> list[Any]:
    """peft LoRA layers whose input cast can be left to autocast. Not DoRA layers: their magnitude path mixes the
    input with fp32 tensors outside any matmul. Not layers with dropout: CUDA's dropout kernel can lay its random
    numbers out by the tensor's vector width, so a mask drawn on the bf16 input in the forward need not match the one
    gradient checkpointing redraws on peft's fp32 copy in the backward pass."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return []
    return [module for module in model.modules() if isinstance(module, LoraLayer)
            and hasattr(module, "cast_input_dtype_enabled")
            and not any(getattr(module, "use_dora", {}).values())
            and all(_no_dropout(dropout) for dropout in getattr(module, "lora_dropout", {}).values())]


def _no_dropout(module: Any) -> bool:
    return isinstance(module, torch.nn.Identity) or (isinstance(module, torch.nn.Dropout) and module.p == 0)
