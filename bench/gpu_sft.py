"""GPU measurements of tunelab SFT: tokens/s, peak memory and an MFU estimate for LoRA and full fine-tuning.

Run on a CUDA machine (no network needed): it builds a randomly initialised model of a real shape (Qwen2.5-0.5B by
default), a tokenizer trained on the bundled corpus, and a mixed-length zh/en data set, then runs `tunelab train`
for each setting in turn and prints one table. A plain Hugging Face `Trainer` on the same model and data (same
batches, padded per batch) runs as the baseline in the same process, so the ratio column compares like with like.

    python bench/gpu_sft.py [--shape qwen2.5-0.5b|tiny] [--steps 30] [--batching padded,padding_free] [--out bench/out]

``--batching`` takes one or more of padded, padding_free, packed, length_grouped (comma-separated); each becomes
its own tunelab row, run in rotation with the plain Trainer.

MFU counts 6·N FLOPs per token for full fine-tuning and 4·N for LoRA (no weight gradients for the frozen base),
plus the attention term 12·L·h·s per token (Kaplan et al. / PaLM appendix B), against the dense bf16 peak given by
--peak-tflops (989 for H100/H200 SXM).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from importlib import resources
from pathlib import Path

import torch

SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2, intermediate_size=4864),
    "qwen2.5-1.5b": dict(hidden_size=1536, num_layers=28, num_heads=12, num_kv_heads=2, intermediate_size=8960),
    "tiny": dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128),
    "cpu-small": dict(hidden_size=256, num_layers=6, num_heads=8, num_kv_heads=2, intermediate_size=688),  # sft_cpu's
}


def build_model(out: Path, shape: str) -> Path:
    from tunelab.demo.tiny import build_tiny_model, train_tokenizer

    corpus = Path(str(resources.files("tunelab.resources").joinpath("demo_corpus.txt"))).read_text("utf-8")
    tokenizer = train_tokenizer(corpus.splitlines(), vocab_size=8000)
    model = build_tiny_model(tokenizer, max_positions=4096, **SHAPES[shape])
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_data(path: Path, n: int, seed: int = 0, stitched: tuple[int, ...] = (1, 1, 2, 4, 8, 16, 24)) -> Path:
    """Mixed lengths: short tool calls, and multi-turn chats stitched from several demo samples (up to ~1.5k tokens).

    Each sample stitches a number of demo conversations drawn from ``stitched`` (about 30 tokens each).
    """
    demo = [json.loads(line) for line in
            Path(str(resources.files("tunelab.resources").joinpath("demo_sft.jsonl"))).read_text("utf-8").splitlines()]
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        turns = []
        for sample in rng.sample(demo, rng.choice(stitched)):
            turns.extend(m for m in sample["messages"] if m["role"] != "system")
        rows.append({"messages": turns})
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return path


def flops_per_token(model_dir: Path, method: str, seq: float) -> float:
    config = json.loads((model_dir / "config.json").read_text())
    h, layers, inter, vocab = (config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"],
                               config["vocab_size"])
    kv = config["num_key_value_heads"] * h // config["num_attention_heads"]
    params = layers * (2 * h * h + 2 * h * kv + 3 * h * inter) + vocab * h  # matmul weights incl. LM head
    attention = 12 * layers * h * seq  # forward+backward QK^T and AV per token
    return (6 if method == "full" else 4) * params + attention


def run_tunelab(model: Path, data: Path, out: Path, method: str, steps: int, batch: int, cutoff: int,
                batching: str = "padding_free") -> dict:
    from tunelab.config.load import load_config
    from tunelab.train.run import run_training

    config = load_config(None, [
        f"model.name_or_path={model}", "model.dtype=bf16", f"data.datasets=[{{path: '{data}'}}]",
        f"data.cutoff_len={cutoff}", f"method.name={method}", "method.lora.rank=16", "method.lora.alpha=32",
        f"train.output_dir={out}", f"train.max_steps={steps}", f"train.per_device_train_batch_size={batch}",
        "train.logging_steps=5", "train.save_steps=100000", "train.report_to=none", "train.lr_scheduler_type=constant",
        f"train.learning_rate={2e-4 if method != 'full' else 1e-5}", f"data.batching={batching}",
    ])
    _reset_peak()
    result = run_training(config)
    return result.summary


def tunelab_training_split(data: Path, out: Path) -> Path:
    """tunelab's training split of ``data``, in its order, for the plain Trainer: both then shuffle the same list
    with the same seed (42, tunelab's default ``train.seed`` and the Trainer's), so step n of each trains the same
    samples. (Until pass 3 the Trainer read the whole file in file order: its batches held 1.7× the real tokens of
    tunelab's, which made tunelab's padded path look 0.52× as fast.)"""
    from tunelab.config.load import load_config
    from tunelab.data.build import load_splits, write_records

    config = load_config(None, [f"data.datasets=[{{path: '{data}'}}]"])
    target = out / "train-split.jsonl"
    write_records(target, load_splits(config.data).train)
    return target


def run_plain_trainer(model_dir: Path, data: Path, out: Path, method: str, steps: int, batch: int,
                      cutoff: int) -> dict:
    """The baseline: transformers' Trainer + peft as a user would write it, with per-batch dynamic padding.
    ``data`` is tunelab's training split (:func:`tunelab_training_split`)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    if method == "lora":
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    rows = []
    for line in data.read_text("utf-8").splitlines():
        messages = json.loads(line)["messages"]
        ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)[:cutoff]
        rows.append({"input_ids": ids, "labels": list(ids)})
    args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch, bf16=True,
                             learning_rate=2e-4 if method != "full" else 1e-5, logging_steps=5,
                             lr_scheduler_type="constant", save_strategy="no", report_to="none",
                             include_num_input_tokens_seen="non_padding", disable_tqdm=True,
                             use_cpu=not torch.cuda.is_available(), seed=42, data_seed=42)
    from tunelab.train.callbacks import StepTimerCallback

    timer = StepTimerCallback()  # the same clock tunelab's summary uses
    trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[timer],
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True))
    _reset_peak()
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    tokens = trainer.state.num_input_tokens_seen
    return {"tokens_seen": tokens, "wall_time_s": wall, **timer.report(),
            "peak_gpu_allocated_mb": _peak_mb(), "steps": trainer.state.global_step}


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak_mb() -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="qwen2.5-0.5b", choices=sorted(SHAPES))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--cutoff", type=int, default=2048)
    parser.add_argument("--samples", type=int, default=600)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--methods", default="lora,full")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batching", default="padding_free",
                        help="tunelab batch layouts to measure, comma-separated (padded, padding_free, packed, ...)")
    parser.add_argument("--out", default="bench/out")
    parser.add_argument("--dry-run", action="store_true", help="run on CPU to check the script itself")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.dry_run:
        raise SystemExit("bench/gpu_sft.py needs a CUDA GPU")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(out / "model", args.shape)
    data = build_data(out / "data.jsonl", args.samples)
    plain_data = tunelab_training_split(data, out)
    rows = []
    for method in args.methods.split(","):
        # Warm-up (CUDA context, cuBLAS heuristics) outside the measurement, then A B / B A so drift hits both.
        run_plain_trainer(model, plain_data, out / f"warmup-{method}", method, 4, args.batch, args.cutoff)
        layouts = args.batching.split(",")
        tools = [f"tunelab ({layout})" for layout in layouts] + ["plain HF Trainer"]
        runs: dict[str, list[dict]] = {tool: [] for tool in tools}
        for rep in range(args.repeats):
            order = tools if rep % 2 == 0 else tools[::-1]
            for tool in order:
                if tool == "plain HF Trainer":
                    runs[tool].append(run_plain_trainer(model, plain_data, out / f"plain-{method}-{rep}", method,
                                                        args.steps, args.batch, args.cutoff))
                else:
                    layout = tool[len("tunelab ("):-1]
                    runs[tool].append(run_tunelab(model, data, out / f"tunelab-{layout}-{method}-{rep}", method,
                                                  args.steps, args.batch, args.cutoff, layout))
        speed = {tool: sum(r["steady_tokens_per_s"] for r in rs) / len(rs) for tool, rs in runs.items()}
        for tool, rs in runs.items():
            first = rs[0]
            # tunelab's own meter: Σ lᵢ² per real token is the attention context its batches really computed
            seq = first.get("mean_attention_context") or first["tokens_seen"] / max(first["steps"] * args.batch, 1)
            row = {"method": method, "tool": tool, "steady_tokens_per_s": round(speed[tool], 1),
                   "each_run": [r["steady_tokens_per_s"] for r in rs],
                   "median_step_s": [r["median_step_s"] for r in rs],
                   "peak_gpu_mb": round(max(r.get("peak_gpu_allocated_mb", 0.0) for r in rs), 1),
                   "mfu": round(speed[tool] * flops_per_token(model, method, seq) / (args.peak_tflops * 1e12), 4),
                   "attention_context": round(seq, 1),
                   # The same batches: equal for every tool, or the speed ratio compares different work.
                   "real_tokens_per_step": round((first.get("real_tokens") or first.get("tokens_seen") or 0)
                                                 / max(first["steps"], 1), 1)}
            if tool != "plain HF Trainer":
                row["ratio_vs_plain"] = round(speed[tool] / speed["plain HF Trainer"], 3)
                row["padding_efficiency"] = first.get("padding_efficiency")
            rows.append(row)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    print("RESULTS " + json.dumps({"device": device, "torch": torch.__version__,
                                   "shape": args.shape, "rows": rows}))
    (out / "results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
