"""The only glue: config -> model -> method -> data -> stage trainer -> train -> save -> (evaluate).

Every step before ``trainer.train()`` is a plain function, so each can be tested and reused on its own.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from transformers import set_seed

from tunelab.config.hf_args import gpus_without_launcher, training_arguments
from tunelab.config.load import dump_config
from tunelab.config.schema import TrainConfig, TunelabConfig
from tunelab.data.build import load_splits, write_split_files
from tunelab.data.cache import tokenize_with_cache
from tunelab.data.collate import training_features
from tunelab.data.packing import BatchingPlan, plan_batching
from tunelab.data.template import build_template
from tunelab.models.lean_activations import apply_lean_activations, lean_activations_problem
from tunelab.models.liger import apply_liger_kernels
from tunelab.models.load import (
    add_new_tokens,
    check_attention,
    choose_precision,
    load_model,
    load_tokenizer,
    match_vocabulary,
    weight_dtype,
)
from tunelab.models.methods import (
    apply_method,
    check_adapter_targets,
    check_method,
    count_parameters,
    keep_trainable_fp32,
    method_quantization,
)
from tunelab.models.packed_attention import restore_attention
from tunelab.report.loss_curve import plot_loss_curve
from tunelab.stages import STAGES
from tunelab.train.allocator import describe_allocator
from tunelab.train.callbacks import (
    MetricsFileCallback,
    ProgressBarCallback,
    SignalCheckpointCallback,
    StepTimerCallback,
)
from tunelab.train.checkpoint import resolve_resume
from tunelab.train.compile import compile_layers, uncompile
from tunelab.train.hybrid import train_hybrid
from tunelab.train.long_batches import LongBatchCheckpointing, long_batch_checkpointing
from tunelab.train.loss import lean_loss_unsupported
from tunelab.train.master_weights import decide_master_weights, master_weights_note, master_weights_record
from tunelab.train.meter import TrainingCheckCallback, meter_summary
from tunelab.train.preflight import check_train_machine


@dataclass
class RunResult:
    output_dir: Path
    summary: dict[str, Any]
    interrupted_by: int | None = None
    model: Any = None
    """The trained model object (with adapters attached for LoRA/DoRA), for callers that continue in-process."""
    train_records: list[Any] | None = None
    """The training split's records (the after-training evaluation draws its few-shot examples from them)."""


def run_training(
    config: TunelabConfig, console: Console | None = None, extra_callbacks: list[Any] | None = None
) -> RunResult:
    console = console or Console(stderr=True)
    main = is_main_process()
    # Under torchrun/accelerate every rank runs this; only rank 0 may judge the output folder (another rank could
    # see files rank 0 has just written) and write the run's files.
    resume_from = resolve_resume(config.train, check_empty=main)
    precision = choose_precision(config.model.dtype, training=True)
    dtype = precision.dtype
    check_train_machine(config)
    check_attention(config.model.attn_implementation)
    masters = decide_master_weights(config.train.master_weights, dtype, env=os.environ,
                                    cuda_devices=torch.cuda.device_count(), resume_from=resume_from)
    console.print(f"[bold]precision[/] {dtype}: {precision.reason}")
    if (gpus := gpus_without_launcher()) > 1:
        console.print(f"{gpus} GPUs visible to one process: training on cuda:0 only; to train on all of them, launch "
                      f"`torchrun --nproc_per_node {gpus} -m tunelab.cli train CONFIG.yaml` (or accelerate launch)")
    allocator = describe_allocator(config.train.cpu_allocator)
    console.print(f"[bold]allocator[/] {allocator['name']}: {allocator['reason']}")
    check_method(config)
    out = config.train.output_path
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = load_tokenizer(config.model)
    new_token_ids = add_new_tokens(tokenizer, config.model.new_special_tokens)
    template = build_template(config.data.template, tokenizer, config.data.custom_template)
    splits = load_splits(config.data)
    data, cache_note = tokenize_with_cache(splits, template, tokenizer, config.data)
    if cache_note:
        console.print(cache_note)
    if main:
        write_split_files(out, splits)
        (out / "data_mix.json").write_text(json.dumps(splits.mix, indent=2, ensure_ascii=False), "utf-8")
        dump_config(config, out / "config.yaml")
    describe_data(console, splits, data, template.name)

    # Adapters (LoRA A, prompt embeddings, ...) draw their initial weights from the global RNG, and the Trainer seeds
    # it only once the model exists: without this, two runs of one config start from different adapters.
    set_seed(config.train.seed)
    # ``auto`` is decided once (above, as config.yaml keeps it); loading, quantization and hybrid's second phase
    # all read the decided precision from here on.
    config = config.model_copy(update={"model": config.model.model_copy(update={"dtype": dtype})})
    model = load_model(config.model, quantization=method_quantization(config.method, weight_dtype(config.model.dtype)))
    model = match_vocabulary(model, tokenizer, seed=config.train.seed)
    check_adapter_targets(model, config.method)
    if config.train.liger_kernel:
        console.print(apply_liger_kernels(model))
    model = apply_method(model, config.method, new_token_ids)
    if note := master_weights_note(model, masters):
        console.print(note)
    masters_record = master_weights_record(model, masters)  # read before the trained weights may become fp32
    if not masters.in_optimizer:  # else bf16 weights stay, and the optimizer keeps fp32 copies
        model = keep_trainable_fp32(model)
    lean_layers = use_lean_activations(model, config.train, console)
    trainable, total = count_parameters(model)
    console.print(f"[bold]model[/] {config.model.name_or_path} ({dtype}), method {config.method.name}: "
                  f"{trainable:,} of {total:,} parameters train ({100 * trainable / max(total, 1):.2f}%)")
    if torch.cuda.is_available() and not getattr(model, "is_quantized", False):
        # Where the Trainer would put it anyway; the batching and loss probes below must run on the real kernels.
        model.to(torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))))
    batching, batching_note = plan_batching(config.data.batching, model, config.data.cutoff_len)
    lean_off = lean_loss_unsupported(model) if config.train.lean_loss else ""
    for note in (batching_note, f"lean loss off: {lean_off}; the model computes its own loss" if lean_off else ""):
        if note:
            console.print(note)

    train_features, eval_features = training_features(data.train), training_features(data.validation)
    long_batches, long_batches_note = use_long_batch_checkpointing(model, config.train, config.method.name, batching,
                                                                   train_features)
    data = replace(data, train=[], validation=[])  # the lists of Python ints are freed; the features hold the tokens
    metrics_path = out / "metrics.jsonl"
    signals = SignalCheckpointCallback()
    timer = StepTimerCallback(compiled=config.train.torch_compile)
    check = TrainingCheckCallback()
    make_trainer = partial(  # hybrid builds a second trainer, with the same arguments, for its LoRA phase
        build_stage_trainer,
        STAGES[config.train.stage],
        tokenizer=tokenizer,
        args=training_arguments(config, dtype=dtype, has_validation=bool(eval_features), batching=batching.mode),
        train_dataset=train_features,
        eval_dataset=eval_features,
        callbacks=[MetricsFileCallback(metrics_path), ProgressBarCallback(), signals, timer, check,
                   *(extra_callbacks or [])],
        stop_on_nonfinite_loss=config.train.stop_on_nonfinite_loss,
        batching=batching,
        lean_loss=config.train.lean_loss and not lean_off,
        activation_offload=config.train.activation_offload,
        master_weights=masters.in_optimizer,
        cpu_release_memory=config.train.cpu_release_memory,
        long_batches=long_batches,
    )
    trainer = make_trainer(model=model)
    if long_batches is not None and trainer.long_batches is None:
        long_batches.stop()  # restores the layers' flags (all off)
        long_batches_note = ("long-batch checkpointing off: FSDP and DeepSpeed wrap and shard the decoder layers "
                             "themselves")
    if long_batches_note:
        console.print(long_batches_note)
    compiled = compile_layers(model, config.train.torch_compile_backend) if config.train.torch_compile else []
    if compiled:
        console.print(f"torch.compile ({config.train.torch_compile_backend}): {len(compiled)} modules, compiled "
                      "during the first steps")
    if resume_from is not None:
        console.print(f"resuming from {resume_from}")
    started = time.perf_counter()
    method_summary: dict[str, Any] = {}
    if config.method.name == "hybrid":
        trainer, method_summary = train_hybrid(config, trainer, make_trainer, resume_from, console,
                                               interrupted=lambda: signals.received is not None)
    else:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    wall = time.perf_counter() - started
    uncompile(compiled)
    restore_attention(model, batching.attention_before)

    summary = build_summary(trainer, wall, trainable, total, data.stats)
    summary["precision"] = {"dtype": dtype, "reason": precision.reason}
    summary["master_weights"] = masters_record
    summary["cpu_allocator"] = {**allocator, "releases_before_largest_batch": trainer.host_release.releases}
    summary["lean_activation_layers"] = lean_layers
    # The trainer's, not the one built here: it drops the controller where layers are sharded (FSDP, DeepSpeed).
    summary["long_batches"] = trainer.long_batches.record() if trainer.long_batches is not None else None
    summary.update(timer.report())
    summary.update(method_summary)
    meter, meter_lines = meter_summary(trainer, timer, check, batching=batching.mode, dtype=dtype, recorded=summary)
    summary.update(meter)
    for line in meter_lines:
        console.print(line)
    if signals.received is not None:
        summary["interrupted_by_signal"] = signals.received
        if main:
            (out / "summary.json").write_text(json.dumps(summary, indent=2), "utf-8")
        return RunResult(out, summary, interrupted_by=signals.received, model=trainer.model)

    save_final_model(trainer, out, dtype)
    tokenizer.save_pretrained(str(out))
    if main:
        plot_loss_curve(metrics_path, out / "loss_curve.png")
        (out / "summary.json").write_text(json.dumps(summary, indent=2), "utf-8")
    return RunResult(out, summary, model=trainer.model, train_records=splits.train)


def use_lean_activations(model: Any, train: TrainConfig, console: Console) -> int:
    """``train.lean_activations``: patch the decoder layers when nothing else recomputes; returns how many."""
    if not train.lean_activations:
        return 0
    off = lean_activations_problem(torch_compile=train.torch_compile, liger_kernel=train.liger_kernel,
                                   gradient_checkpointing=train.gradient_checkpointing,
                                   activation_offload=train.activation_offload)
    patched = 0 if off else apply_lean_activations(model)
    if off:
        console.print(f"lean activations off: {off}")
    elif patched:
        console.print(f"lean activations: {patched} decoder layers remake their norm outputs, SiLU product and "
                      "attention output in the backward pass instead of keeping them")
    return patched


def use_long_batch_checkpointing(model: Any, train: TrainConfig, method: str, batching: BatchingPlan,
                                 features: list[Any]) -> tuple[LongBatchCheckpointing | None, str]:
    """``train.checkpoint_long_batches``: the per-batch controller (None where every layer, or none, recomputes) and
    the line to print once the trainer has accepted it."""
    if not train.checkpoint_long_batches or train.gradient_checkpointing:
        return None, ""
    if train.torch_compile or method == "prefix":
        why = ("train.torch_compile would recompile the layers whenever a batch changes which of them recompute"
               if train.torch_compile else "method prefix's virtual key/values are a KV cache that a recomputed "
               "layer would extend twice")
        return None, f"long-batch checkpointing off: {why}"
    lengths = batching.row_lengths([len(feature["input_ids"]) for feature in features])
    # transformers' group_by_length sorts groups of one optimizer step's rows (train_batch_size x accumulation)
    group = train.per_device_train_batch_size * train.gradient_accumulation_steps
    return long_batch_checkpointing(model, lengths, batch_size=train.per_device_train_batch_size,
                                    padded=not batching.flat, percentile=train.long_batch_percentile, seed=train.seed,
                                    length_group=group if batching.mode == "length_grouped" else 0)


def is_main_process() -> bool:
    """Rank 0 of a torchrun/accelerate launch, or a plain single process."""
    return int(os.environ.get("RANK", "0")) == 0


def save_final_model(trainer: Any, out: Path, dtype: str) -> None:
    """The final weights in the precision they were loaded in.

    Trained weights were kept in fp32 for the optimizer (see keep_trainable_fp32; with train.master_weights=
    optimizer they are bf16 already, the fp32 copies living in the optimizer); the artefact a user serves goes back
    to bf16, so it is not twice the size of the base. Checkpoints keep the fp32 values for an exact resume.
    """
    model = trainer.model
    if dtype != "bf16" or hasattr(model, "peft_config"):
        trainer.save_model(str(out))
        return
    state = {name: t.to(torch.bfloat16) if t.is_floating_point() else t for name, t in model.state_dict().items()}
    model.save_pretrained(str(out), state_dict=state, is_main_process=trainer.args.should_save)


def describe_data(console: Console, splits: Any, data: Any, template_name: str) -> None:
    console.print(f"[bold]data[/] template {template_name}; train {len(splits.train)}, validation "
                  f"{len(splits.validation)}, test {len(splits.test)} records")
    for entry in splits.mix:
        console.print(f"  {entry['path']}: {entry['records']} records ({entry['format']}), {entry['rejected']} "
                      f"rejected; weight {entry['weight']} -> {entry['train_used']} in training "
                      f"({entry['share']:.1%}), {entry['sampling']}")
        if entry.get("preference_as_chosen"):
            console.print(f"  {entry['path']}: {entry['preference_as_chosen']} preference records train on their "
                          "chosen answer (stage sft; the rejected answers are for preference training)")
    for name, stat in data.stats.items():
        console.print(f"  {name}: {stat.describe()}")


def build_summary(trainer: Any, wall: float, trainable: int, total: int, stats: dict[str, Any]) -> dict[str, Any]:
    state = trainer.state
    losses = [e["loss"] for e in state.log_history if "loss" in e]
    evals = [e["eval_loss"] for e in state.log_history if "eval_loss" in e]
    tokens = int(state.num_input_tokens_seen)
    summary: dict[str, Any] = {
        "steps": state.global_step,
        "epochs": round(state.epoch or 0.0, 4),
        "tokens_seen": tokens,
        "supervised_tokens_seen": trainer.supervised_tokens_seen,
        "wall_time_s": round(wall, 3),
        "tokens_per_s_wall": round(tokens / wall, 2) if wall > 0 else None,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "final_eval_loss": evals[-1] if evals else None,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "peak_cpu_rss_mb": round(_peak_rss_mb(), 1),
        "data": {name: stat.to_dict() for name, stat in stats.items()},
    }
    if torch.cuda.is_available():
        summary["peak_gpu_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        summary["peak_gpu_reserved_mb"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
    return summary


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def build_stage_trainer(build: Any, **kwargs: Any) -> Any:
    """The stage's trainer, without transformers' own printing (tunelab draws its own progress bar)."""
    trainer = build(**kwargs)
    _drop_printer_callback(trainer)
    return trainer


def _drop_printer_callback(trainer: Any) -> None:
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
