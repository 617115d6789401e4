"""The throughput meter and the "did it train" check of every run.

Rates are over optimizer-step time (``StepTimerCallback``), so logging, evaluation and checkpoints do not count,
nor does the compile time of ``train.torch_compile`` (reported as ``compile_s``).
Model FLOPs per token follow the PaLM appendix-B convention: 2 FLOPs per weight per token forward, 2 more backward
for the activation gradient, 2 more for the weight gradient of *trained* weights only (LoRA and freeze skip
those for the frozen base), plus ``12·layers·hidden·s`` for attention, where ``s = Σ lᵢ² / Σ lᵢ`` is the context
each token actually attends over (per sample, as padding-free batches compute it). MFU divides the FLOPs of the
real (non-pad) tokens by a peak: the device's stated dense peak when tunelab knows the device, and always a matmul
peak measured here once per process (a few hundred milliseconds).

On CPU, wall-clock rates say as much about the other processes on the machine as about the run (on a shared machine
the same run varies several-fold), so the meter also reads this process's CPU time over the same steps and reports
MFU per CPU-second next to the wall-clock figures (see ``cpu_time_mfu``).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainerCallback

from tunelab.train.master_weights import tensor_to_check

# Stated dense (no sparsity) peaks in TFLOP/s, from the vendors' data sheets: (bf16/fp16 tensor core, plain fp32).
DEVICE_PEAK_TFLOPS: dict[str, tuple[float, float]] = {
    "H200": (989.4, 66.9),
    "H100 PCIe": (756.0, 51.2),
    "H100": (989.4, 66.9),  # SXM; checked after "H100 PCIe"
    "A100": (312.0, 19.5),
}


@dataclass
class FedBatches:
    """What the training steps were fed: token slots (padding included), samples, and Σ lᵢ² per sample; and the
    largest micro-batch, whose size sets the activation memory (in slots: longest × batch when padded).

    Counts stay device tensors where they come from the batch, so counting never waits for the GPU.
    """

    slots: int = 0
    samples: int = 0
    squared_lengths: Any = 0
    largest_slots: int = 0
    largest_tokens: Any = 0

    def add(self, inputs: dict[str, Any]) -> None:
        ids = inputs["input_ids"]
        self.slots += ids.numel()
        self.largest_slots = max(self.largest_slots, ids.numel())
        cu = inputs.get("cu_seq_lens_q")
        if cu is not None:
            lengths = cu[1:] - cu[:-1]
        elif inputs.get("attention_mask") is not None:
            lengths = inputs["attention_mask"].sum(-1)
        else:
            lengths = torch.full((ids.shape[0],), ids.shape[-1], device=ids.device)
        self.samples += int(lengths.shape[0])
        self.squared_lengths = self.squared_lengths + (lengths.long() ** 2).sum()
        self.largest_tokens = torch.maximum(torch.as_tensor(self.largest_tokens, device=lengths.device),
                                            lengths.long().sum())


class TrainingCheckCallback(TrainerCallback):
    """Remembers the norms of a few trainable tensors at the start, to tell at the end whether they moved; and logs
    the first step, and the last one where fewer than two losses were logged, whatever ``logging_steps`` says, so
    that the gradient-norm and loss checks have two logged steps to read in a run shorter than ``logging_steps``."""

    SAMPLE = 16

    def __init__(self) -> None:
        self.before: dict[str, float] = {}
        self.after: dict[str, float] = {}
        self._tensors: dict[str, torch.Tensor] = {}

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad] if model is not None else []
        step = max(1, len(trainable) // self.SAMPLE)
        self._tensors = dict(trainable[::step][: self.SAMPLE])
        self.before = self._norms()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == 1:
            control.should_log = True
        elif state.global_step >= state.max_steps and sum("loss" in e for e in state.log_history) < 2:
            # only where the run logged too few losses to compare: a longer run's last, partial window would
            # weigh a few steps as much as a whole one
            control.should_log = True

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.after = self._norms()

    def _norms(self) -> dict[str, float]:
        # float64 norms: any update to a tensor changes its norm, and nothing is copied.
        # bf16 weights with fp32 masters (train.master_weights=optimizer): the master is what a small update moves.
        return {n: float(torch.linalg.vector_norm(tensor_to_check(p).detach(), dtype=torch.float64))
                for n, p in self._tensors.items()}

    def report(self, log_history: list[dict[str, Any]]) -> dict[str, Any]:
        grads = [e["grad_norm"] for e in log_history if "grad_norm" in e]
        losses = [e["loss"] for e in log_history if "loss" in e]
        k = max(1, len(losses) // 4)
        checks: dict[str, Any] = {
            "grad_norm_above_zero": (max(grads) > 0) if grads else None,
            "parameters_changed": any(self.after.get(n) != v for n, v in self.before.items()) if self.before else None,
            "loss_fell": (sum(losses[-k:]) / k < sum(losses[:k]) / k) if len(losses) >= 2 else None,
        }
        checks["ok"] = all(v is not False for v in checks.values()) and checks["parameters_changed"] is True
        # None: too little to tell (no gradient norm logged, one logged loss); "ok" then rests on the others
        checks["unchecked"] = [name for name, value in checks.items() if value is None]
        checks["sampled_tensors"] = len(self.before)
        return checks


def matmul_flops(model: Any) -> tuple[int, int]:
    """(weights that multiply activations, of which trained): every 2-D+ parameter except input embeddings,
    plus the LM head counted once even when tied to the embeddings."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    embeddings = inner.get_input_embeddings() if hasattr(inner, "get_input_embeddings") else None
    skip = {id(p) for p in embeddings.parameters()} if embeddings is not None else set()
    total = trained = 0
    for param in model.parameters():
        if param.dim() < 2 or id(param) in skip:
            continue
        total += param.numel()
        trained += param.numel() if param.requires_grad else 0
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if head is not None and id(head.weight) in skip:  # tied head: it multiplies, count it
        total += head.weight.numel()
        trained += head.weight.numel() if head.weight.requires_grad else 0
    return total, trained


def flops_per_token(model: Any, context: float) -> float:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = inner.config
    total, trained = matmul_flops(model)
    attention = 12 * config.num_hidden_layers * config.hidden_size * context
    return 4 * total + 2 * trained + attention


def stated_peak_tflops(dtype: str) -> tuple[str, float] | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    for key, (half, single) in DEVICE_PEAK_TFLOPS.items():
        if key in name:
            return f"{name} {dtype} (stated)", half if dtype != "fp32" else single
    return None


@dataclass(frozen=True)
class MatmulPeak:
    """Best square-matmul rates in one dtype: TFLOP per wall-clock second, and TFLOP per second of this process's
    CPU time (all threads; only meaningful on CPU), measured with ``threads`` intra-op threads."""

    tflops: float
    tflop_per_cpu_s: float
    threads: int


@functools.cache
def measured_peak(dtype: str, threads: int) -> MatmulPeak:
    """Best achieved rates of square matmuls in ``dtype`` on the training device, measured once per thread count.

    ``threads`` must be ``torch.get_num_threads()`` now, the count training ran with; it keys the cache, so a run
    that changed it measures again rather than comparing against a peak of other threads.
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype, torch.float32)
    n = 4096 if device == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=torch_dtype)
    b = torch.randn(n, n, device=device, dtype=torch_dtype)
    best_wall = best_cpu = float("inf")
    for _ in range(6 if device == "cpu" else 20):
        if device == "cuda":
            torch.cuda.synchronize()
        start, start_cpu = time.perf_counter(), time.process_time()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best_wall = min(best_wall, time.perf_counter() - start)
        best_cpu = min(best_cpu, time.process_time() - start_cpu)
    flops = 2 * n**3
    return MatmulPeak(flops / best_wall / 1e12, flops / max(best_cpu, 1e-9) / 1e12, threads)


def cpu_time_mfu(flops: float, cpu_seconds: float, peak: MatmulPeak) -> dict[str, Any]:
    """MFU per CPU-second: the run's FLOPs per second of its own CPU time over the matmul's FLOPs per second of its
    own CPU time, both with ``peak.threads`` threads.

    Time other processes hold the cores is in neither figure. Both sides are per CPU-second *at the same thread
    count*: a single-thread peak would charge the run for threading overheads (spinning, synchronisation) that the
    peak never paid, and ``FLOPs / (CPU s / threads)`` against the wall-clock peak assumes every thread is busy the
    whole step and takes the peak from a wall clock that the same load slows down. On an idle machine, where the
    matmul's CPU time is threads × its wall time, this equals that second form.
    """
    achieved = flops / cpu_seconds / 1e12
    return {"step_cpu_s": round(cpu_seconds, 3), "cpu_threads": peak.threads,
            "achieved_tflop_per_cpu_s": round(achieved, 5),
            "measured_peak_tflop_per_cpu_s": round(peak.tflop_per_cpu_s, 4),
            "mfu_measured_peak_cpu_time": round(achieved / peak.tflop_per_cpu_s, 4)}


@dataclass
class Throughput:
    """The meter's numbers for one run; ``to_dict`` goes into summary.json."""

    values: dict[str, Any] = field(default_factory=dict)

    def lines(self) -> list[str]:
        v = self.values
        if not v["real_tokens"]:
            return ["throughput: no training step ran in this session"]
        out = [f"throughput: {v['real_tokens_per_s']:,.0f} real tokens/s, {v['supervised_tokens_per_s']:,.0f} "
               f"supervised tokens/s, {v['samples_per_s']:.2f} samples/s; padding efficiency "
               f"{v['padding_efficiency']:.1%} ({v['batching']} batches)"]
        if "compile_s" in v:
            out.append(f"torch.compile: {v['compile_s']:.1f} s in the first steps, left out of tokens/s"
                       if v["compile_s"] is not None else
                       "torch.compile: too few steps to tell compile time from step time (rates include it)")
        if v.get("mfu_measured_peak") is not None:
            stated = (f", {v['mfu_stated_peak']:.1%} of {v['stated_peak_tflops']:.0f} TFLOP/s {v['stated_peak']}"
                      if v.get("mfu_stated_peak") is not None else "")
            clock = " by wall time" if "mfu_measured_peak_cpu_time" in v else ""
            out.append(f"MFU: {v['model_flops_per_token'] / 1e6:,.1f} MFLOP per token; {v['mfu_measured_peak']:.1%} "
                       f"of the measured matmul peak ({v['measured_peak_tflops']:.2f} TFLOP/s){clock}{stated}")
        if "mfu_measured_peak_cpu_time" in v:
            out.append(f"MFU by CPU time: {v['mfu_measured_peak_cpu_time']:.1%} of the matmul peak per CPU-second "
                       f"({v['achieved_tflop_per_cpu_s']:.3f} of {v['measured_peak_tflop_per_cpu_s']:.3f} TFLOP per "
                       f"CPU-second, {v['cpu_threads']} threads; {v['step_cpu_s']:.1f} CPU-s over the steps): "
                       "other processes' load does not count here")
        return out


def throughput_report(trainer: Any, timer: Any, *, batching: str, dtype: str) -> Throughput:
    """Rates over step time, padding efficiency of what was fed, FLOPs per token and MFU; on CPU, MFU per
    CPU-second as well (the step timer's CPU clock)."""
    fed: FedBatches = trainer.fed
    timed = timer.report()
    # Compile time (train.torch_compile) is reported on its own and left out of every rate.
    compile_s = timed.get("compile_s")
    step_time = (timed.get("train_step_time_s") or 0.0) - (compile_s or 0.0)
    real = timer._tokens_run  # tokens of this session (a resumed run starts from the checkpoint's count)
    supervised = int(trainer._new_tokens) if trainer._new_tokens is not None else 0
    context = int(fed.squared_lengths) / real if real else 0.0
    per_token = flops_per_token(trainer.model, context) if real else 0.0
    values: dict[str, Any] = {
        "batching": batching,
        "real_tokens": real,
        "token_slots": fed.slots,
        "padding_efficiency": round(real / fed.slots, 4) if fed.slots else None,
        "largest_batch_tokens": int(fed.largest_tokens),
        "largest_batch_token_slots": fed.largest_slots,
        "samples": fed.samples,
        "real_tokens_per_s": round(real / step_time, 2) if step_time else 0.0,
        "supervised_tokens_per_s": round(supervised / step_time, 2) if step_time else 0.0,
        "samples_per_s": round(fed.samples / step_time, 3) if step_time else 0.0,
        "mean_attention_context": round(context, 1),
        "model_flops_per_token": round(per_token),
    }
    if "compile_s" in timed:
        values["compile_s"] = compile_s
    if step_time and real:
        achieved = per_token * real / step_time / 1e12
        peak = measured_peak(dtype, torch.get_num_threads())
        values.update(achieved_tflops=round(achieved, 4), measured_peak_tflops=round(peak.tflops, 3),
                      mfu_measured_peak=round(achieved / peak.tflops, 4))
        cpu_seconds = timer.timed_cpu_seconds()
        if cpu_seconds > 0 and not torch.cuda.is_available():  # on CUDA the GPU's time is what counts
            values.update(cpu_time_mfu(per_token * real, cpu_seconds, peak))
        stated = stated_peak_tflops(dtype)
        if stated is not None:
            values.update(stated_peak=stated[0], stated_peak_tflops=stated[1],
                          mfu_stated_peak=round(achieved / stated[1], 4))
    return Throughput(values)


def step_and_memory_line(summary: dict[str, Any]) -> str:
    """The end-of-run line for step times after warm-up and peak memory (summary.json has the same numbers)."""
    parts = []
    if summary.get("median_step_s") is not None:
        warmup = summary.get("warmup_steps_excluded", 0)
        parts.append(f"step time: median {summary['median_step_s']:.3g} s, p90 {summary['p90_step_s']:.3g} s "
                     + (f"after {warmup} warm-up steps" if warmup else "(every step: too few to leave warm-up out)"))
    memory = f"peak memory: CPU RSS {summary['peak_cpu_rss_mb']:,.0f} MB"
    if "peak_gpu_allocated_mb" in summary:
        memory += (f", GPU allocated {summary['peak_gpu_allocated_mb']:,.0f} MB, reserved "
                   f"{summary['peak_gpu_reserved_mb']:,.0f} MB")
    return "; ".join([*parts, memory])


def meter_summary(
    trainer: Any, timer: Any, check: TrainingCheckCallback, *, batching: str, dtype: str, recorded: dict[str, Any]
) -> tuple[dict[str, Any], list[str]]:
    """summary.json additions and the end-of-run lines: throughput, MFU, step times and peak memory (from
    ``recorded``, the summary so far), and the "did it train" check (a warning line for each check that failed)."""
    throughput = throughput_report(trainer, timer, batching=batching, dtype=dtype)
    checks = check.report(trainer.state.log_history)
    lines = [*throughput.lines(), step_and_memory_line(recorded)]
    failed = {
        "grad_norm_above_zero": "every logged gradient norm was 0: nothing reached the trainable weights",
        "parameters_changed": "no sampled trainable tensor changed during training",
        "loss_fell": "the training loss did not fall (last quarter of logged losses vs first quarter)",
    }
    lines += [f"[bold red]warning:[/] did it train? {text}" for key, text in failed.items() if checks[key] is False]
    return {**throughput.values, "did_it_train": checks}, lines
