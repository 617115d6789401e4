"""The one mapping from tunelab's config to Hugging Face ``TrainingArguments``.

``MAPPED`` and ``TUNELAB_ONLY`` together name every ``train`` field; a test keeps that true when fields are added.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from tunelab.config.schema import TunelabConfig

MAPPED = {
    "output_dir", "learning_rate", "lr_scheduler_type", "weight_decay", "max_grad_norm", "num_train_epochs",
    "max_steps", "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
    "seed", "logging_steps", "eval_steps", "save_steps", "save_total_limit", "warmup_ratio", "report_to",
    "gradient_checkpointing", "optim",
}
# torch_compile is tunelab's own (per-layer, in place; see tunelab.train.compile), not the Trainer's whole-model one.
TUNELAB_ONLY = {
    "stage", "resume", "stop_on_nonfinite_loss", "lean_loss", "activation_offload", "torch_compile",
    "torch_compile_backend", "liger_kernel", "cpu_allocator",
    "lean_activations", "master_weights", "cpu_release_memory", "checkpoint_long_batches", "long_batch_percentile",
}


def training_arguments(
    config: TunelabConfig, *, dtype: str, has_validation: bool, batching: str | None = None
) -> Any:
    """``batching`` is the layout actually used (padding-free may have fallen back to padded); by default the
    configured ``data.batching``."""
    from transformers import TrainingArguments

    from tunelab.data.packing import FLAT_BATCHINGS

    train = config.train
    if batching is None:
        batching = config.data.batching
    report_to = train.report_to
    if report_to == "auto":
        report_to = "tensorboard" if importlib.util.find_spec("tensorboard") else "none"
    eval_strategy = "no"
    if has_validation:
        eval_strategy = "steps" if train.eval_steps is not None else "epoch"
    args = TrainingArguments(
        output_dir=train.output_dir,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler_type,
        warmup_steps=train.warmup_ratio,  # transformers 5 reads a float in [0, 1) as a ratio of total steps
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        num_train_epochs=train.num_train_epochs,
        max_steps=train.max_steps,
        per_device_train_batch_size=train.per_device_train_batch_size,
        per_device_eval_batch_size=train.per_device_eval_batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        seed=train.seed,
        data_seed=train.seed,
        logging_steps=train.logging_steps,
        eval_strategy=eval_strategy,
        eval_steps=train.eval_steps,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=train.save_total_limit,
        report_to=report_to,
        bf16=dtype == "bf16",
        fp16=dtype == "fp16",
        use_cpu=not _cuda_available(),
        # Non-finite losses must reach our guard, not be averaged away by the logger.
        logging_nan_inf_filter=False,
        gradient_checkpointing=train.gradient_checkpointing,
        optim=train.optim,
        # Non-reentrant: the reentrant variant needs inputs that require grad, which a frozen base never gives.
        gradient_checkpointing_kwargs={"use_reentrant": False} if train.gradient_checkpointing else None,
        # A flat row holds only real tokens; counting "non-pad" ids there would miss real EOS tokens whenever the
        # tokenizer pads with EOS.
        include_num_input_tokens_seen="all" if batching in FLAT_BATCHINGS else "non_padding",
        train_sampling_strategy="group_by_length" if batching == "length_grouped" else "random",
        # Evaluation during training reports the loss only; keeping every batch's full-vocabulary logits for
        # metrics nobody computes costs eval-set × length × vocabulary memory.
        prediction_loss_only=True,
        remove_unused_columns=False,
        disable_tqdm=True,  # tunelab draws its own bar with loss, lr and tokens/s
        dataloader_num_workers=0,
    )
    if gpus_without_launcher() > 1:
        # One GPU per process: with several GPUs visible and no launcher the Trainer would wrap the model in
        # DataParallel, slower than DDP and unable to run tunelab's per-module patches (lean activations, master
        # weights) on its replicas. run.py says how to use every GPU.
        _ = args.device  # sets _n_gpu from the visible GPUs, which the next line overrides
        args._n_gpu = 1
    return args


def gpus_without_launcher(env: dict[str, str] | None = None) -> int:
    """CUDA devices this process sees when no launcher (torchrun, accelerate) started it; 0 otherwise."""
    import os

    import torch

    env = os.environ if env is None else env
    if env.get("WORLD_SIZE") or not _cuda_available():
        return 0
    return torch.cuda.device_count()


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
