"""Where a tunelab training step spends its time: torch.profiler over a short run, top operators by GPU and CPU time.

Builds a model of a real shape as ``gpu_mfu.py`` does (random bf16 weights, no network), runs ``tunelab train``
for a few packed steps under the profiler and prints two tables: operators by self CUDA time and by self CPU time.
Use it when a setting's MFU is far below its peers' (e.g. full fine-tuning vs LoRA at the same shape). The first
line says how busy the GPU was during a recorded step; for the short padding-free steps of the GPU peer bench:
``--method lora --extra data.batching=padding_free,train.per_device_train_batch_size=8``.

    python bench/gpu_profile.py [--shape qwen2.5-1.5b] [--method full] [--steps 5] [--seq 4096] [--batch 2]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gpu_mfu import SHAPES, build_model, train  # noqa: E402
from gpu_sft import build_data  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="qwen2.5-1.5b", choices=sorted(SHAPES))
    parser.add_argument("--method", default="full")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--extra", default="", help="more tunelab overrides, comma-separated")
    parser.add_argument("--out", default="/tmp/gpu-profile")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = build_data(out / "data.jsonl", 200)
    folder = out / f"model-{args.shape}"
    if not (folder / "config.json").is_file():
        build_model(folder, args.shape, args.seq)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    from transformers import TrainerCallback

    class StepProfiler(TrainerCallback):
        def on_step_end(self, *_: object, **__: object) -> None:
            profiler.step()

    # Only two optimizer steps are recorded (after two skipped and one warm-up step): a whole run's trace made
    # the tables take minutes to print on the H200.
    schedule = torch.profiler.schedule(wait=2, warmup=1, active=2, repeat=1)
    shutil.rmtree(out / "run", ignore_errors=True)  # a profile is a fresh run (several run one after another)
    with torch.profiler.profile(activities=activities, schedule=schedule) as profiler:
        summary = train(folder, data, out / "run", args.method, args.seq, args.batch, max(args.steps, 5),
                        [item for item in args.extra.split(",") if item], callbacks=[StepProfiler()])
    print(f"median step {summary.get('median_step_s')} s, {summary.get('real_tokens')} real tokens, "
          f"steps {summary.get('steps')}")
    averages = profiler.key_averages()
    print(host_or_device(averages, recorded_steps=2))
    if torch.cuda.is_available():
        print(averages.table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=60))
    print(averages.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))


def host_or_device(averages: object, recorded_steps: int) -> str:
    """A recorded step's length against the time the GPU spent in kernels: far apart means the step waits on the host
    (Python, dispatch, launches), as with short padding-free steps of a 1.5B model (bench/RESULTS.md, GPU pass 4)."""
    step = sum(e.cpu_time_total for e in averages if e.key.startswith("ProfilerStep")) / 1e3 / recorded_steps
    if not torch.cuda.is_available():
        return f"per recorded step: {step:.1f} ms"
    # Kernel events only, as the table's "Self CUDA time total" sums them: the operators' own rows carry the time of
    # the kernels they launched too (summing every row counted each kernel twice, "200% busy"), and the
    # ProfilerStep annotation has a CUDA-side event spanning the whole step (counting it gave "159% busy").
    from torch.autograd import DeviceType

    busy = sum(e.self_device_time_total for e in averages
               if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False))
    busy = busy / 1e3 / recorded_steps
    return f"per recorded step: {step:.1f} ms, of which GPU kernels {busy:.1f} ms ({busy / step:.0%} busy)"


if __name__ == "__main__":
    main()
