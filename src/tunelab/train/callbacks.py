"""Trainer callbacks: metrics.jsonl, the progress bar, and a clean stop on SIGINT/SIGTERM."""

from __future__ import annotations

import json
import signal
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback


class MetricsFileCallback(TrainerCallback):
    """Appends one JSON object per logging event to ``metrics.jsonl``.

    On resume, entries after the checkpoint's step (logged by the interrupted run) are dropped first, so the
    file reads as one uninterrupted run.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.path.exists() and state.is_world_process_zero:  # other ranks would race rank 0's rewrite
            kept = [line for line in self.path.read_text("utf-8").splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= state.global_step]
            self.path.write_text("".join(line + "\n" for line in kept), "utf-8")

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not logs or not state.is_world_process_zero:
            return
        entry = {"step": state.global_step, **logs, "time": round(time.time(), 3)}
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry) + "\n")


class ProgressBarCallback(TrainerCallback):
    """A tqdm bar over optimizer steps showing loss, learning rate and real tokens per second (with ETA)."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.start_tokens = 0
        self.start_time = 0.0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", unit="step",
                            dynamic_ncols=True)
        self.start_tokens = state.num_input_tokens_seen
        self.start_time = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if self.bar is None or not logs:
            return
        elapsed = max(time.perf_counter() - self.start_time, 1e-9)
        postfix = {"tok/s": f"{(state.num_input_tokens_seen - self.start_tokens) / elapsed:.0f}"}
        if "loss" in logs:
            postfix["loss"] = f"{logs['loss']:.4f}"
        if "learning_rate" in logs:
            postfix["lr"] = f"{logs['learning_rate']:.2e}"
        if "eval_loss" in logs:
            postfix["eval_loss"] = f"{logs['eval_loss']:.4f}"
        self.bar.set_postfix(postfix)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class SignalCheckpointCallback(TrainerCallback):
    """On SIGINT/SIGTERM, finish the current optimizer step, save a checkpoint and stop training.

    The handler only sets a flag: saving from inside a signal handler could interrupt a half-written tensor.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:  # a second signal: give up waiting for the step to finish
            raise KeyboardInterrupt
        self.received = signum

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        for sig in self.SIGNALS:
            self.previous[sig] = signal.signal(sig, self._handle)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.received is not None:
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()


class StepTimerCallback(TrainerCallback):
    """Times each optimizer step (forward, backward, optimizer), excluding logging, evaluation and checkpoints.

    On CUDA the clock is read after a synchronize, otherwise it would time kernel launches, not kernels.
    It also reads this process's CPU time per step (``cpu_durations``, all threads): on a shared CPU machine the
    wall clock says as much about the other processes as about the run (the meter's MFU per CPU-second).
    With ``compiled`` (train.torch_compile) the report adds ``compile_s``: how much longer the warm-up steps took
    than the median step after them (tracing, code generation and the recompile for dynamic shapes all happen
    there), and leaves that time out of tokens/s.
    """

    WARMUP_STEPS = 3

    def __init__(self, compiled: bool = False) -> None:
        self.compiled = compiled
        self.durations: list[float] = []
        self.cpu_durations: list[float] = []
        self._start = self._cpu_start = 0.0
        self._tokens_at_warmup_end: int | None = None
        self._tokens_end = 0
        self._tokens_start: int | None = None

    def _now(self) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._tokens_start = state.num_input_tokens_seen  # non-zero when resuming

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._start = self._now()
        self._cpu_start = time.process_time()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.durations.append(self._now() - self._start)
        self.cpu_durations.append(time.process_time() - self._cpu_start)
        if len(self.durations) == self.WARMUP_STEPS:
            self._tokens_at_warmup_end = state.num_input_tokens_seen
        self._tokens_end = state.num_input_tokens_seen

    @property
    def _tokens_run(self) -> int:
        return self._tokens_end - (self._tokens_start or 0)

    def report(self) -> dict[str, Any]:
        """Step-time statistics after warm-up; tokens/s over the timed steps only."""
        steady = self.durations[self.WARMUP_STEPS :] or self.durations
        if not steady:
            return {}
        if len(self.durations) > self.WARMUP_STEPS:
            steady_tokens = self._tokens_end - (self._tokens_at_warmup_end or 0)
        else:
            steady_tokens = self._tokens_run
        ordered = sorted(steady)
        total = sum(self.durations)
        compile_s = self.compile_seconds() if self.compiled else None
        timed = total - (compile_s or 0.0)
        report: dict[str, Any] = {"compile_s": compile_s} if self.compiled else {}
        return {
            **report,
            "train_step_time_s": round(total, 3),
            "tokens_per_s": round(self._tokens_run / timed, 2) if timed > 0 else None,
            "median_step_s": round(statistics.median(steady), 5),
            "p90_step_s": round(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], 5),
            "steady_tokens_per_s": round(steady_tokens / sum(steady), 2) if sum(steady) > 0 else None,
            "warmup_steps_excluded": min(self.WARMUP_STEPS, len(self.durations)) if len(steady) < len(
                self.durations) else 0,
        }

    def compile_seconds(self) -> float | None:
        """Extra time of the warm-up steps over the median later step; ``None`` without a later step to compare."""
        excess = self._warmup_excess(self.durations)
        return round(excess, 3) if excess is not None else None

    def timed_cpu_seconds(self) -> float:
        """CPU seconds of the steps, with the compile share taken out as :meth:`compile_seconds` takes it out of
        wall time."""
        excess = self._warmup_excess(self.cpu_durations) if self.compiled else None
        return sum(self.cpu_durations) - (excess or 0.0)

    def _warmup_excess(self, durations: list[float]) -> float | None:
        warmup, steady = durations[: self.WARMUP_STEPS], durations[self.WARMUP_STEPS :]
        if not steady:
            return None
        median = statistics.median(steady)
        return sum(max(0.0, d - median) for d in warmup)
