"""Full fine-tuning step cost on a CPU: fp32 vs bf16 autocast through tunelab's trainer and lean loss, and what the
fp32 master weights cost under autocast (against the same model with bf16 weights).

Before session 3 the lean loss ran outside accelerate's autocast, so ``model.dtype: bf16`` (and ``auto`` on a CPU with
AVX512_BF16/AMX) trained full fine-tuning in fp32 while the run said bf16. This times the same padding-free batch of
8 samples (90–400 tokens) both ways, alternating, in CPU seconds of this process on one thread (a shared machine's
load does not enter), and prints the ratio. Forward + backward of ``TunelabTrainer.compute_loss``; no optimizer step.

The third column keeps the weights themselves in bf16 (what a bf16 compute copy of fp32 master weights, as in FSDP's
``MixedPrecision(param_dtype=bf16)``, would run): no weight casts, a bf16 residual stream. It answers whether such a
copy would speed full fine-tuning up here; the optimizer step it would need is not timed.

    python bench/cpu_precision.py MODEL_FOLDER [MODEL_FOLDER ...] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch


def step_cpu_seconds(folder: str, repeats: int) -> dict:
    from transformers import TrainingArguments

    from tunelab.config.schema import ModelConfig
    from tunelab.data.packing import FlatCollator, plan_batching
    from tunelab.models.load import load_model
    from tunelab.train.loss import supervised_lm_loss
    from tunelab.train.trainer import TunelabTrainer

    model = load_model(ModelConfig(name_or_path=folder, dtype="fp32"))  # full fine-tuning keeps fp32 master weights
    bf16_weights = load_model(ModelConfig(name_or_path=folder, dtype="bf16"))
    plan_batching("padding_free", model, 1024)
    generator = torch.Generator().manual_seed(0)
    lengths = [120, 300, 90, 200, 150, 400, 130, 220]
    batch = FlatCollator()([{"input_ids": ids, "labels": ids} for ids in (
        torch.randint(0, model.config.vocab_size, (n,), generator=generator).tolist() for n in lengths)])
    times: dict[str, list[float]] = {"fp32": [], "bf16": [], "bf16_weights": []}
    with tempfile.TemporaryDirectory() as out:
        for _ in range(2):  # A B C A B C: drift hits all
            for name in times:
                trained = bf16_weights if name == "bf16_weights" else model
                args = TrainingArguments(output_dir=out, use_cpu=True, report_to="none", bf16=name != "fp32")
                trainer = TunelabTrainer(model=trained, args=args, loss_fn=supervised_lm_loss)
                trainer.compute_loss(trained, dict(batch)).backward()  # warm-up
                start = time.process_time()
                for _ in range(repeats):
                    trainer.compute_loss(trained, dict(batch)).backward()
                times[name].append((time.process_time() - start) / repeats)
                trained.zero_grad()
    fp32, bf16, weights = (min(v) for v in times.values())
    return {"model": folder, "parameters": sum(p.numel() for p in model.parameters()), "tokens": sum(lengths),
            "fp32_cpu_s": round(fp32, 3), "bf16_autocast_cpu_s": round(bf16, 3), "bf16_speedup": round(fp32 / bf16, 2),
            "bf16_weights_cpu_s": round(weights, 3), "fp32_master_cost": round(bf16 / weights, 2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="+")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from tunelab.models.load import native_cpu_bf16

    print(f"CPU native bf16: {native_cpu_bf16() or 'none'}; torch {torch.__version__}; 1 thread")
    print("| model params | tokens/step | fp32 CPU-s/step | bf16 autocast CPU-s/step | bf16 speed-up | "
          "bf16 weights CPU-s/step | fp32 master under autocast / bf16 weights |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for folder in args.models:
        row = step_cpu_seconds(folder, args.repeats)
        print(f"| {row['parameters']:,} | {row['tokens']} | {row['fp32_cpu_s']} | {row['bf16_autocast_cpu_s']} | "
              f"{row['bf16_speedup']}× | {row['bf16_weights_cpu_s']} | {row['fp32_master_cost']}× |")
        print("RESULT", json.dumps(row))


if __name__ == "__main__":
    main()
