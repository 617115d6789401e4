"""tunelab SFT at cutoffs 512 to 8192 on long-tail data: padded vs padding-free batches, memory and speed.

    python bench/sft_scale.py [--cutoffs 512,1024,2048,4096,8192] [--steps 4] [--batch 4] [--shape tiny]
                              [--device cpu|cuda] [--dtype fp32|bf16] [--set train.torch_compile=true ...]
                              [--threads N] [--out runs/bench-sft-scale]

Data (long tail): ``steps × batch`` chats, one in eight of them long — 240 bundled demo conversations stitched into
one chat, about 8.4k tokens — and the rest short or medium (1 to 24 stitched, 35 to 850 tokens), all built by
``bench/gpu_sft.py``'s ``build_data``. One epoch, so every setting trains on every sample once, and the sampler's
seed gives every setting the same samples in the same batches (a cutoff only truncates the long ones).

Model: ``--shape`` from ``bench/gpu_sft.py`` (``tiny``: Qwen2 architecture, hidden 64, 2 layers; an 8k tokenizer
trained on the bundled corpus), random init, LoRA r8 on all linear layers, lean loss on for both layouts, so the
layouts differ only in how a batch is laid out.

Each setting runs ``tunelab train`` in its own process, so its peak memory is its own: peak RSS on a CPU,
``torch.cuda.max_memory_allocated``/``reserved`` on a GPU. Printed per setting: real (non-pad) tokens/s over step
time, the mean real tokens per batch, the largest batch's real tokens and its token slots (longest × batch when
padded), peak memory, and the machine's load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

LAYOUTS = ("padded", "padding_free")
LONG_STITCHED = (240,)  # about 8.4k tokens: past the largest cutoff, so it is cut at every one
SHORT_STITCHED = (1, 1, 1, 1, 2, 2, 4, 8, 24)


def build_long_tail(path: Path, samples: int) -> Path:
    """One in eight samples long, the rest short or medium (see the module docstring)."""
    from gpu_sft import build_data

    long_count = max(1, samples // 8)
    short = build_data(path.with_suffix(".short.jsonl"), samples - long_count, seed=0, stitched=SHORT_STITCHED)
    long = build_data(path.with_suffix(".long.jsonl"), long_count, seed=1, stitched=LONG_STITCHED)
    path.write_text(short.read_text("utf-8") + long.read_text("utf-8"), "utf-8")
    return path


def run_one(layout: str, cutoff: int, model: Path, data: Path, out: Path, args: argparse.Namespace) -> dict:
    """One `tunelab train` in this process; returns the summary fields the table needs."""
    import torch

    from tunelab.config.load import load_config
    from tunelab.train.run import run_training

    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_config(None, [
        f"model.name_or_path={model}", f"model.dtype={args.dtype}", f"data.datasets=[{{path: '{data}'}}]",
        f"data.cutoff_len={cutoff}", f"data.batching={layout}", f"data.cache_dir={out.parent / 'cache'}",
        "method.name=lora", "method.lora.rank=8", "method.lora.alpha=16", "method.lora.dropout=0.0",
        f"train.output_dir={out}", f"train.max_steps={args.steps}", f"train.per_device_train_batch_size={args.batch}",
        "train.logging_steps=1", "train.save_steps=100000", "train.report_to=none", "train.lr_scheduler_type=constant",
        "train.learning_rate=1e-3", "train.seed=0", *args.set,
    ])
    summary = run_training(config).summary
    keys = ("steps", "samples", "real_tokens", "token_slots", "padding_efficiency", "largest_batch_tokens",
            "largest_batch_token_slots", "real_tokens_per_s", "median_step_s", "train_step_time_s", "peak_cpu_rss_mb",
            "peak_gpu_allocated_mb", "peak_gpu_reserved_mb", "final_loss", "precision", "compile_s",
            "steady_tokens_per_s")
    return {k: summary.get(k) for k in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cutoffs", default="512,1024,2048,4096,8192")
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--shape", default="tiny", help="a model shape of bench/gpu_sft.py (tiny, qwen2.5-0.5b, ...)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, help="model.dtype (default: fp32 on cpu, bf16 on cuda)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every setting, e.g. train.torch_compile=true (repeatable)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per run (0: torch's default); 1 keeps CPU timings stable on a busy machine")
    parser.add_argument("--out", default="runs/bench-sft-scale")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: "layout,cutoff": run one setting
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    out = Path(args.out)
    model, data = out / f"model-{args.shape}", out / f"data-{args.steps}x{args.batch}.jsonl"
    sys.path.insert(0, str(Path(__file__).parent))
    if args.one:
        layout, cutoff = args.one.split(",")
        print("SUMMARY " + json.dumps(run_one(layout, int(cutoff), model, data, Path(args.run_dir), args)))
        return

    import torch
    from gpu_sft import build_model

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU here")
    out.mkdir(parents=True, exist_ok=True)
    if not (model / "config.json").is_file():
        build_model(model, args.shape)
    if not data.is_file():
        build_long_tail(data, args.steps * args.batch)
    # A CPU run hides any GPU from its processes, so "cpu" means the CPU even on a GPU machine.
    env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": ""} if args.device == "cpu" else {})}
    load_before = os.getloadavg()
    rows = []
    for cutoff in (int(c) for c in args.cutoffs.split(",")):
        for layout in args.layouts.split(","):
            run_dir = out / f"{layout}-{cutoff}"
            subprocess.run(["rm", "-rf", str(run_dir)], check=True)
            command = [sys.executable, __file__, "--one", f"{layout},{cutoff}", "--run-dir", str(run_dir),
                       "--out", str(out), "--steps", str(args.steps), "--batch", str(args.batch),
                       "--shape", args.shape, "--device", args.device, "--dtype", args.dtype,
                       "--threads", str(args.threads), *(f"--set={item}" for item in args.set)]
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            line = [x for x in done.stdout.splitlines() if x.startswith("SUMMARY ")]
            if done.returncode or not line:
                raise SystemExit(f"{layout} at cutoff {cutoff} failed:\n{done.stderr[-3000:]}")
            row = {"cutoff": cutoff, "layout": layout, **json.loads(line[0][len("SUMMARY "):])}
            rows.append(row)
            print(f"cutoff {cutoff} {layout}: {row['real_tokens_per_s']:.0f} real tokens/s, largest batch "
                  f"{row['largest_batch_tokens']} tokens in {row['largest_batch_token_slots']} slots, peak "
                  f"{_peak(row)}", flush=True)
    load_after = os.getloadavg()
    result = {"device": _device(args.device), "torch": torch.__version__, "shape": args.shape, "dtype": args.dtype,
              "steps": args.steps, "batch": args.batch, "overrides": args.set, "threads": args.threads,
              "load_average_before": [round(x, 2) for x in load_before],
              "load_average_after": [round(x, 2) for x in load_after], "rows": rows}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print(markdown_table(rows, args.device))
    print("RESULTS " + json.dumps(result))


def _peak(row: dict) -> str:
    if row.get("peak_gpu_allocated_mb") is not None:
        return f"{row['peak_gpu_allocated_mb']:,.0f} MB allocated / {row['peak_gpu_reserved_mb']:,.0f} MB reserved"
    return f"{row['peak_cpu_rss_mb']:,.0f} MB RSS"


def _device(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def markdown_table(rows: list[dict], device: str) -> str:
    """One row per setting; padding-free rows also show the slots the padded layout gave the same batches."""
    padded_slots = {r["cutoff"]: r["largest_batch_token_slots"] for r in rows if r["layout"] == "padded"}
    memory = "peak GPU MB allocated / reserved" if device == "cuda" else "peak RSS MB"
    lines = [f"| cutoff | layout | real tokens/s | real tokens per batch (mean) | largest batch: real tokens | "
             f"largest batch: slots (longest × batch if padded) | {memory} | median step (s) |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        slots = f"{r['largest_batch_token_slots']:,}"
        if r["layout"] != "padded" and r["cutoff"] in padded_slots:
            slots += f" (padded: {padded_slots[r['cutoff']]:,})"
        peak = (f"{r['peak_gpu_allocated_mb']:,.0f} / {r['peak_gpu_reserved_mb']:,.0f}"
                if r.get("peak_gpu_allocated_mb") is not None else f"{r['peak_cpu_rss_mb']:,.0f}")
        lines.append(f"| {r['cutoff']} | `{r['layout']}` | {r['real_tokens_per_s']:,.0f} | "
                     f"{r['real_tokens'] / r['steps']:,.0f} | {r['largest_batch_tokens']:,} | {slots} | {peak} | "
                     f"{r['median_step_s']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
