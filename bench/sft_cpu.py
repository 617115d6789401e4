"""tunelab SFT on a CPU: padded vs padding-free vs packed batches, same model, data, samples, steps and seed.

    python bench/sft_cpu.py [--steps 12] [--batch 8] [--cutoff 1024] [--repeats 2] [--out bench/out-cpu]

It builds a tiny Qwen2-architecture model (random init, ~8M parameters: hidden 256, 6 layers, 8 heads / 2 KV heads,
an 8k tokenizer trained on the bundled corpus) and a mixed-length zh/en data set (bundled demo chats, 1 to 24
stitched into multi-turn samples, as bench/gpu_sft.py does), then runs `tunelab train` once per setting in a fresh
process (so peak RSS is that run's own), in rotation A B C, A B C … so that machine noise hits every setting.

Settings (LoRA r8 on all linear layers, fp32, response-only loss):
- ``padded``: tunelab before padding-free batching — padded batches, the model's own loss over all positions;
- ``padded+lean``: padded batches with the lean loss (logits only at supervised positions);
- ``padding_free``: the same samples and steps as padded, one flat row per batch, attention per sample, lean loss;
- ``packed``: samples bin-packed into rows of ``cutoff`` tokens (more samples per step), lean loss.

Printed per setting: real (non-pad) tokens/s and supervised tokens/s over step time, median step time, peak RSS,
final loss, the ratio to ``padded``, and — for the settings that see the same batches — the largest per-step loss
difference from ``padded``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
from importlib import resources
from pathlib import Path

SETTINGS = {
    "padded": ["data.batching=padded", "train.lean_loss=false"],
    "padded+lean": ["data.batching=padded", "train.lean_loss=true"],
    "padding_free": ["data.batching=padding_free", "train.lean_loss=true"],
    "packed": ["data.batching=packed", "train.lean_loss=true"],
}
SAME_BATCHES = ("padded", "padded+lean", "padding_free")


def build_model(out: Path) -> Path:
    from tunelab.demo.tiny import build_tiny_model, train_tokenizer

    if (out / "config.json").is_file():
        return out
    corpus = Path(str(resources.files("tunelab.resources").joinpath("demo_corpus.txt"))).read_text("utf-8")
    tokenizer = train_tokenizer(corpus.splitlines(), vocab_size=8000)
    model = build_tiny_model(tokenizer, hidden_size=256, num_layers=6, num_heads=8, num_kv_heads=2,
                             intermediate_size=688, max_positions=4096)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def run_one(setting: str, model: Path, data: Path, out: Path, args: argparse.Namespace) -> dict:
    """One `tunelab train` in this process; returns its summary plus the per-step losses."""
    from tunelab.config.load import load_config
    from tunelab.train.run import run_training

    config = load_config(None, [
        f"model.name_or_path={model}", "model.dtype=fp32", f"data.datasets=[{{path: '{data}'}}]",
        f"data.cutoff_len={args.cutoff}", f"data.cache_dir={out.parent / 'cache'}", "method.name=lora",
        "method.lora.rank=8", "method.lora.alpha=16", "method.lora.dropout=0.0", f"train.output_dir={out}",
        f"train.max_steps={args.steps}", f"train.per_device_train_batch_size={args.batch}", "train.logging_steps=1",
        "train.save_steps=100000", "train.report_to=none", "train.lr_scheduler_type=constant",
        "train.learning_rate=1e-3", "train.seed=0", *SETTINGS[setting],
    ])
    summary = run_training(config).summary
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary["losses"] = [r["loss"] for r in rows if "loss" in r]
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--cutoff", type=int, default=1024)
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--out", default="bench/out-cpu")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one setting, print its summary
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = Path(args.out)
    model, data = out / "model", out / "data.jsonl"
    if args.one:
        print("SUMMARY " + json.dumps(run_one(args.one, model, data, Path(args.run_dir), args)))
        return

    sys.path.insert(0, str(Path(__file__).parent))
    from gpu_sft import build_data

    out.mkdir(parents=True, exist_ok=True)
    build_model(model)
    if not data.is_file():
        build_data(data, args.samples)
    settings = args.settings.split(",")
    runs: dict[str, list[dict]] = {s: [] for s in settings}
    for rep in range(args.repeats):
        for setting in settings:  # A B C, A B C: drift and neighbours' load hit every setting alike
            run_dir = out / f"{setting}-{rep}"
            subprocess.run(["rm", "-rf", str(run_dir)], check=True)
            command = [sys.executable, __file__, "--one", setting, "--run-dir", str(run_dir), "--out", str(out),
                       "--steps", str(args.steps), "--batch", str(args.batch), "--cutoff", str(args.cutoff)]
            done = subprocess.run(command, capture_output=True, text=True)
            line = [x for x in done.stdout.splitlines() if x.startswith("SUMMARY ")]
            if done.returncode or not line:
                raise SystemExit(f"{setting} failed:\n{done.stderr[-3000:]}")
            runs[setting].append(json.loads(line[0][len("SUMMARY "):]))
            print(f"{setting} run {rep}: {runs[setting][-1]['real_tokens_per_s']:.0f} real tokens/s", flush=True)
    print(json.dumps(table(runs), indent=2))


def table(runs: dict[str, list[dict]]) -> dict:
    import torch
    import transformers

    def mean(setting: str, key: str) -> float:
        return statistics.mean(r[key] for r in runs[setting])

    base = "padded" if "padded" in runs else next(iter(runs))
    rows = []
    for setting, rs in runs.items():
        row = {
            "setting": setting,
            "real_tokens_per_s": round(mean(setting, "real_tokens_per_s"), 1),
            "each_run": [round(r["real_tokens_per_s"], 1) for r in rs],
            "supervised_tokens_per_s": round(mean(setting, "supervised_tokens_per_s"), 1),
            "median_step_s": round(statistics.median(r["median_step_s"] for r in rs), 3),
            "samples_per_step": round(rs[0]["samples"] / rs[0]["steps"], 1),
            "padding_efficiency": rs[0]["padding_efficiency"],
            "peak_rss_mb": round(max(r["peak_cpu_rss_mb"] for r in rs), 1),
            "final_loss": round(rs[0]["final_loss"], 4),
            "ratio_vs_padded": round(mean(setting, "real_tokens_per_s") / mean(base, "real_tokens_per_s"), 3),
            "mfu_measured_peak": rs[0].get("mfu_measured_peak"),
        }
        if setting in SAME_BATCHES and base in SAME_BATCHES:
            row["max_step_loss_diff_vs_padded"] = max(
                abs(a - b) for r in rs for a, b in zip(r["losses"], runs[base][0]["losses"], strict=True))
        rows.append(row)
    return {"device": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
            "torch": torch.__version__, "transformers": transformers.__version__,
            "trainable_parameters": runs[base][0]["trainable_parameters"],
            "total_parameters": runs[base][0]["total_parameters"], "rows": rows}


if __name__ == "__main__":
    main()
