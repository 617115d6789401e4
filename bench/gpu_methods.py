"""GPU comparison of tuning methods on one model: peak memory, tokens/s and trainable parameters per method.

Builds the randomly initialised model of a real shape and the zh/en data set of ``gpu_sft.py`` (no network), then
trains each method in turn in this process with the same data, batch and steps (bf16, padded batches), resetting
CUDA's peak-memory counter before each run. QLoRA needs bitsandbytes.

    python bench/gpu_methods.py [--shape qwen2.5-1.5b] [--methods lora,qlora,qlora8,ia3,prefix] [--steps 20]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gpu_sft import SHAPES, build_data, build_model  # noqa: E402

SETTINGS = {
    "lora": ["method.name=lora"],
    "dora": ["method.name=dora"],
    "qlora": ["method.name=qlora", "method.qlora.bits=4"],
    "qlora8": ["method.name=qlora", "method.qlora.bits=8"],
    "ia3": ["method.name=ia3", "train.learning_rate=3e-3"],
    "prefix": ["method.name=prefix", "train.learning_rate=1e-2"],
    "full": ["method.name=full", "train.learning_rate=1e-5"],
    "hybrid": ["method.name=hybrid", "train.learning_rate=1e-5"],
}


def run(model: Path, data: Path, out: Path, name: str, steps: int, batch: int, cutoff: int) -> dict:
    from tunelab.config.load import load_config
    from tunelab.train.run import run_training

    config = load_config(None, [
        f"model.name_or_path={model}", "model.dtype=bf16", f"data.datasets=[{{path: '{data}'}}]",
        f"data.cutoff_len={cutoff}", "data.batching=padded", "method.lora.rank=16", "method.lora.alpha=32",
        f"train.output_dir={out / name}", f"train.max_steps={steps}", f"train.per_device_train_batch_size={batch}",
        "train.logging_steps=5", "train.save_steps=100000", "train.report_to=none", "train.learning_rate=2e-4",
        "train.lr_scheduler_type=constant", *SETTINGS[name],
    ])
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    result = run_training(config)
    summary = result.summary
    del result
    gc.collect()
    keys = ("peak_gpu_allocated_mb", "peak_gpu_reserved_mb", "tokens_per_s", "steady_tokens_per_s",
            "median_step_s", "trainable_parameters", "total_parameters", "first_loss", "final_loss", "steps")
    return {"method": name, **{k: summary.get(k) for k in keys}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="qwen2.5-1.5b", choices=sorted(SHAPES))
    parser.add_argument("--methods", default="lora,qlora,qlora8,ia3,prefix")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--cutoff", type=int, default=1024)
    parser.add_argument("--samples", type=int, default=240)
    parser.add_argument("--out", default="bench/out-methods")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(out / "model", args.shape)
    data = build_data(out / "data.jsonl", args.samples)
    rows = []
    for name in args.methods.split(","):
        try:
            rows.append(run(model, data, out, name, args.steps, args.batch, args.cutoff))
        except Exception as exc:  # one failing method must not hide the others' numbers
            rows.append({"method": name, "error": f"{type(exc).__name__}: {exc}"[:300]})
        print("RESULT", json.dumps(rows[-1]), flush=True)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (dry run)"
    (out / "methods.json").write_text(json.dumps({"device": device, "shape": args.shape, "steps": args.steps,
                                                  "batch": args.batch, "cutoff": args.cutoff, "rows": rows},
                                                 indent=2), "utf-8")
    print(f"\n{device}, shape {args.shape}, {args.steps} steps, batch {args.batch}, cutoff {args.cutoff}, bf16")
    print("| method | trainable params | peak allocated MB | tokens/s | median step s | loss first -> last |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['method']} | error: {row['error'][:80]} |")
            continue
        print(f"| {row['method']} | {row['trainable_parameters']:,} | {_num(row['peak_gpu_allocated_mb'], '.0f')} | "
              f"{_num(row['tokens_per_s'], '.0f')} | {_num(row['median_step_s'], '.3f')} | "
              f"{_num(row['first_loss'], '.3f')} -> {_num(row['final_loss'], '.3f')} |")


def _num(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


if __name__ == "__main__":
    main()
