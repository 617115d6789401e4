"""The meter's CPU-time figures: process CPU time per step, and MFU per CPU-second next to the wall-clock MFU."""

from __future__ import annotations

import time

import torch

from tunelab.train import meter
from tunelab.train.callbacks import StepTimerCallback
from tunelab.train.meter import FedBatches, MatmulPeak, TrainingCheckCallback, meter_summary


def test_step_clock_reads_process_cpu_time_not_wall_time():
    timer = StepTimerCallback()
    state = type("State", (), {"num_input_tokens_seen": 0})()
    timer.on_step_begin(None, state, None)
    time.sleep(0.3)  # wall time passes, this process uses no CPU
    timer.on_step_end(None, state, None)
    timer.on_step_begin(None, state, None)
    start = time.process_time()
    while time.process_time() - start < 0.1:  # CPU work
        pass
    timer.on_step_end(None, state, None)
    assert timer.cpu_durations[0] < 0.1 and timer.cpu_durations[1] >= 0.1


def test_compile_share_leaves_cpu_time_as_it_leaves_wall_time():
    # warm-up steps used 3, 3 and 1 CPU-s against a median later step of 1: 4 CPU-s of compiling
    durations = [3.0, 3.0, 1.0, 1.0, 1.2, 0.8]
    compiled = StepTimerCallback(compiled=True)
    compiled.cpu_durations = durations
    assert compiled.timed_cpu_seconds() == sum(durations) - 4.0
    compiled.cpu_durations = durations[:3]
    assert compiled.timed_cpu_seconds() == sum(durations[:3])  # too few steps: rates include it
    plain = StepTimerCallback(compiled=False)
    plain.cpu_durations = durations
    assert plain.timed_cpu_seconds() == sum(durations)  # not compiled


def test_cpu_time_mfu_on_known_numbers(monkeypatch):
    # 1000 real tokens at 1 MFLOP each = 1 GFLOP in 10 s of wall time but 4 s of this process's CPU time
    # (other processes held the cores the rest of the time), 2 threads.
    peak = MatmulPeak(tflops=0.1, tflop_per_cpu_s=0.05, threads=2)
    monkeypatch.setattr(meter, "measured_peak", lambda dtype, threads: peak)
    monkeypatch.setattr(meter, "flops_per_token", lambda model, context: 1e6)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    class Trainer:
        fed = FedBatches(slots=1000, samples=10, squared_lengths=100_000, largest_slots=100, largest_tokens=100)
        model = None
        _new_tokens = None
        state = type("State", (), {"log_history": []})()

    class Timer:
        WARMUP_STEPS = 3
        _tokens_run = 1000

        def report(self):
            return {"train_step_time_s": 10.0}

        def timed_cpu_seconds(self):
            return 4.0

    check = TrainingCheckCallback()
    recorded = {"median_step_s": 2.0, "p90_step_s": 2.5, "warmup_steps_excluded": 3, "peak_cpu_rss_mb": 1234.4}
    values, lines = meter_summary(Trainer(), Timer(), check, batching="padded", dtype="fp32", recorded=recorded)

    assert values["achieved_tflops"] == 1e-4 and values["mfu_measured_peak"] == 0.001  # 1 GFLOP / 10 s / 0.1 TFLOP/s
    assert values["step_cpu_s"] == 4.0 and values["cpu_threads"] == 2
    assert values["achieved_tflop_per_cpu_s"] == 2.5e-4  # 1 GFLOP / 4 CPU-s; from wall time it would be 1e-4
    assert values["measured_peak_tflop_per_cpu_s"] == 0.05
    assert values["mfu_measured_peak_cpu_time"] == 0.005  # 2.5e-4 / 0.05; from wall time it would be 0.002
    text = "\n".join(lines)
    assert "0.1% of the measured matmul peak (0.10 TFLOP/s) by wall time" in text
    assert "MFU by CPU time: 0.5% of the matmul peak per CPU-second" in text and "2 threads" in text
    assert "step time: median 2 s, p90 2.5 s after 3 warm-up steps; peak memory: CPU RSS 1,234 MB" in lines

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # on CUDA: the wall-clock figures only
    monkeypatch.setattr(meter, "stated_peak_tflops", lambda dtype: None)
    values, _ = meter_summary(Trainer(), Timer(), check, batching="padded", dtype="fp32", recorded=recorded)
    assert "mfu_measured_peak_cpu_time" not in values and values["mfu_measured_peak"] == 0.001


def test_measured_peak_per_cpu_second_uses_the_thread_count_it_is_keyed_by():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        peak = meter.measured_peak("fp32", 1)
    finally:
        torch.set_num_threads(threads)
    # One thread cannot use more CPU time than wall time, so per CPU-second it is at least the wall-clock rate.
    assert peak.threads == 1 and peak.tflops > 0 and peak.tflop_per_cpu_s >= 0.95 * peak.tflops


def test_the_step_and_memory_line_names_gpu_memory_and_too_few_steps():
    from tunelab.train.meter import step_and_memory_line

    line = step_and_memory_line({"median_step_s": 0.01234, "p90_step_s": 0.02, "warmup_steps_excluded": 0,
                                 "peak_cpu_rss_mb": 900.0, "peak_gpu_allocated_mb": 51682.8,
                                 "peak_gpu_reserved_mb": 54668.0})
    assert line == ("step time: median 0.0123 s, p90 0.02 s (every step: too few to leave warm-up out); peak memory: "
                    "CPU RSS 900 MB, GPU allocated 51,683 MB, reserved 54,668 MB")
    assert step_and_memory_line({"peak_cpu_rss_mb": 10.0}) == "peak memory: CPU RSS 10 MB"  # no step ran


def test_the_first_and_last_steps_are_logged_whatever_logging_steps_says():
    from types import SimpleNamespace

    def logged_steps(max_steps: int, logging_steps: int) -> list[int]:
        check, history, steps = TrainingCheckCallback(), [], []
        for step in range(1, max_steps + 1):
            control = SimpleNamespace(should_log=step % logging_steps == 0)
            check.on_step_end(None, SimpleNamespace(global_step=step, max_steps=max_steps, log_history=history),
                              control)
            if control.should_log:
                history.append({"loss": 1.0, "step": step})
                steps.append(step)
        return steps

    assert logged_steps(7, 10) == [1, 7]  # shorter than logging_steps: the first and the last
    assert logged_steps(21, 10) == [1, 10, 20]  # long enough: no one-step window at the end
    assert logged_steps(4, 1) == [1, 2, 3, 4]
