"""bench/gpu_profile.py's "how busy was the GPU" line: kernel time only, each kernel once (it printed 200%, then
159%, before)."""

import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.autograd import DeviceType

sys.path.insert(0, str(Path(__file__).parents[2] / "bench"))
import gpu_profile  # noqa: E402


def event(key, device_type, cpu=0.0, self_device=0.0, annotation=False):
    return SimpleNamespace(key=key, device_type=device_type, cpu_time_total=cpu, self_device_time_total=self_device,
                           is_user_annotation=annotation)


def test_busy_counts_each_kernel_once_and_not_the_step_annotation(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    # two recorded steps of 400 ms on the host; 300 ms of kernels in all (150 ms a step)
    averages = [
        event("ProfilerStep*", DeviceType.CPU, cpu=800_000),
        event("ProfilerStep*", DeviceType.CUDA, self_device=790_000, annotation=True),  # spans the steps on the GPU
        event("aten::mm", DeviceType.CPU, cpu=50_000, self_device=200_000),  # an operator row: its kernels' time
        event("nvjet_gemm", DeviceType.CUDA, self_device=200_000),
        event("vectorized_elementwise_kernel", DeviceType.CUDA, self_device=100_000),
    ]
    assert gpu_profile.host_or_device(averages, recorded_steps=2) == (
        "per recorded step: 400.0 ms, of which GPU kernels 150.0 ms (38% busy)")
