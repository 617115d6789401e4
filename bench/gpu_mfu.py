"""MFU of tunelab SFT at real model shapes on one GPU: LoRA on a Llama-3-8B shape, full fine-tuning on 1.5B/3B.

Nothing can be downloaded on the GPU machine, so each model is built from its published dimensions with random
weights (bf16, directly on the GPU), saved as safetensors and loaded back through ``tunelab train`` like a user's
model. The data is the zh/en mixed-length set of ``gpu_sft.py``; batches are bin-packed rows of ``--seq`` tokens
(``data.batching=packed``, samples never attend to each other). The tokenizer is the 8k-token one trained on the
bundled corpus; the model keeps its real vocabulary size, so the embedding and LM head have their real cost.

MFU comes from tunelab's own meter (summary.json): model FLOPs per real token (4·N for frozen and 6·N for trained
matmul weights, plus 12·L·h·context for attention) over the step-timed rate, against the stated dense bf16 peak
(989 TFLOP/s for H100 and H200 SXM). tunelab's lean loss runs the LM head at supervised positions only, so the
standard count credits head FLOPs it never spent; the ``mfu_no_head_credit`` column removes that credit.

    python bench/gpu_mfu.py [--runs llama3-8b:lora,qwen2.5-1.5b:full] [--seq 4096] [--batch 2] [--steps 12]

A run is ``shape:method``, optionally followed by ``+key=value`` tunelab overrides for that run alone, e.g.
``qwen2.5-1.5b:lora+train.gradient_checkpointing=true``; runs of one shape share one built model.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gpu_sft import build_data  # noqa: E402

# Published dimensions (config.json of each model family).
SHAPES = {
    "llama3-8b": dict(arch="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False,
                      rope_theta=500000.0),
    # Llama 3.2's 1-3B models: wider layers than Qwen2.5's at the same size (hidden 3072 / 2048, 8 KV heads), so
    # larger matmuls for full fine-tuning (rope_scaling of the published configs left out: it costs nothing)
    "llama3.2-3b": dict(arch="llama", hidden_size=3072, num_hidden_layers=28, num_attention_heads=24,
                        num_key_value_heads=8, intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True,
                        rope_theta=500000.0),
    "llama3.2-1b": dict(arch="llama", hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True,
                        rope_theta=500000.0),
    "qwen2.5-3b": dict(arch="qwen2", hidden_size=2048, num_hidden_layers=36, num_attention_heads=16,
                       num_key_value_heads=2, intermediate_size=11008, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(arch="qwen2", hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True),
    "small": dict(arch="qwen2", hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                  intermediate_size=1536, vocab_size=32000, tie_word_embeddings=True),
    "tiny": dict(arch="qwen2", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=8000, tie_word_embeddings=True),
}


def build_model(folder: Path, shape: str, max_positions: int) -> Path:
    from importlib import resources

    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    from tunelab.demo.tiny import train_tokenizer

    corpus = Path(str(resources.files("tunelab.resources").joinpath("demo_corpus.txt"))).read_text("utf-8")
    tokenizer = train_tokenizer(corpus.splitlines(), vocab_size=8000)
    dims = dict(SHAPES[shape])
    config_class = LlamaConfig if dims.pop("arch") == "llama" else Qwen2Config
    config = config_class(**dims, max_position_embeddings=max_positions, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    gc.collect()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return folder


def train(model: Path, data: Path, out: Path, method: str, seq: int, batch: int, steps: int,
          extra: list[str], callbacks: list | None = None) -> dict:
    from tunelab.config.load import load_config
    from tunelab.train.run import run_training

    config = load_config(None, [
        f"model.name_or_path={model}", "model.dtype=bf16", f"data.datasets=[{{path: '{data}'}}]",
        f"data.cutoff_len={seq}", "data.batching=packed", f"method.name={method}", "method.lora.rank=16",
        "method.lora.alpha=32", "method.lora.dropout=0.0", f"train.output_dir={out}", f"train.max_steps={steps}",
        f"train.per_device_train_batch_size={batch}", "train.logging_steps=4", "train.save_steps=100000",
        "train.report_to=none", "train.lr_scheduler_type=constant",
        f"train.learning_rate={2e-4 if method != 'full' else 1e-5}", *extra,
    ])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result = run_training(config, extra_callbacks=callbacks)
    summary = dict(result.summary)
    del result
    gc.collect()
    return summary


def head_credit(model: Path, summary: dict, method: str) -> float:
    """FLOPs per real token the standard count credits for LM-head work the lean loss skipped."""
    config = json.loads((model / "config.json").read_text())
    head = config["vocab_size"] * config["hidden_size"]
    per_param = 6 if method == "full" else 4
    real, supervised = summary.get("real_tokens_per_s") or 0, summary.get("supervised_tokens_per_s") or 0
    skipped = 1 - supervised / real if real else 0.0
    return per_param * head * skipped


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", default="llama3-8b:lora,qwen2.5-1.5b:full",
                        help="comma-separated shape:method pairs (shapes: " + ", ".join(SHAPES) + ")")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--samples", type=int, default=600)
    parser.add_argument("--extra", default="", help="more tunelab overrides for every run, comma-separated")
    parser.add_argument("--out", default="/tmp/gpu-mfu")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = build_data(out / "data.jsonl", args.samples)
    extra = [item for item in args.extra.split(",") if item]
    rows = []
    for index, spec in enumerate(args.runs.split(",")):
        shape, _, rest = spec.partition(":")
        method, *own = rest.split("+")
        folder = out / f"model-{shape}"
        started = time.perf_counter()
        failed = None
        try:
            if not (folder / "config.json").is_file():
                build_model(folder, shape, args.seq)
            built = time.perf_counter() - started
            run_dir = out / f"run-{index}-{shape}-{method}"
            summary = train(folder, data, run_dir, method, args.seq, args.batch, args.steps, [*extra, *own])
        except Exception as exc:  # one failing setting must not hide the others' numbers
            failed = f"{type(exc).__name__}: {exc}"[:400]
        if failed is not None:
            # Out of the except block: until it ends, the traceback holds the failed run's frames and tensors.
            gc.collect()
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
            rows.append({"run": spec, "error": failed})
            print("RESULT", json.dumps(rows[-1]), flush=True)
            continue
        per_token = summary.get("model_flops_per_token") or 0
        stated = summary.get("stated_peak_tflops")
        rate = summary.get("real_tokens_per_s") or 0
        no_credit = ((per_token - head_credit(folder, summary, method)) * rate / (stated * 1e12)
                     if stated and rate else None)
        # The meter's rate divides by all step time, warm-up included; short runs need the steady rate too.
        steady = summary.get("steady_tokens_per_s") or 0
        steady_mfu = per_token * steady / (stated * 1e12) if stated and steady else None
        rows.append({
            "run": spec, "build_s": round(built, 1), "compile_s": summary.get("compile_s"), "seq": args.seq,
            "batch": args.batch, "steps": args.steps,
            "real_tokens_per_s": rate, "supervised_tokens_per_s": summary.get("supervised_tokens_per_s"),
            "median_step_s": summary.get("median_step_s"), "padding_efficiency": summary.get("padding_efficiency"),
            "model_flops_per_token": per_token, "achieved_tflops": summary.get("achieved_tflops"),
            "mfu_stated_peak": summary.get("mfu_stated_peak"),
            "mfu_no_head_credit": round(no_credit, 4) if no_credit is not None else None,
            "steady_tokens_per_s": steady, "mfu_steady": round(steady_mfu, 4) if steady_mfu is not None else None,
            "mfu_measured_peak": summary.get("mfu_measured_peak"),
            "measured_peak_tflops": summary.get("measured_peak_tflops"),
            "peak_gpu_allocated_mb": summary.get("peak_gpu_allocated_mb"),
            "peak_gpu_reserved_mb": summary.get("peak_gpu_reserved_mb"),
            "trainable_parameters": summary.get("trainable_parameters"),
            "first_loss": summary.get("first_loss"), "final_loss": summary.get("final_loss"),
        })
        print("RESULT", json.dumps(rows[-1]), flush=True)
        shutil.rmtree(run_dir, ignore_errors=True)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (dry run)"
    (out / "mfu.json").write_text(json.dumps({"device": device, "torch": torch.__version__, "rows": rows},
                                             indent=2), "utf-8")
    print(f"\n{device}, torch {torch.__version__}, packed rows of {args.seq} tokens, batch {args.batch}, bf16")
    print("| run | real tok/s | median step s | MFU (stated peak) | MFU without head credit | steady MFU | "
          "peak alloc MB |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['run']} | error: {row['error'][:100]} |")
            continue
        print(f"| {row['run']} | {row['real_tokens_per_s']} | {row['median_step_s']} | {row['mfu_stated_peak']} | "
              f"{row['mfu_no_head_credit']} | {row['mfu_steady']} | {row['peak_gpu_allocated_mb']} |")


if __name__ == "__main__":
    main()
