"""tunelab vs LLaMA-Factory on one GPU: the peer bench's SFT job on a bf16 model of real shape.

    python bench/gpu_peers.py --lf-path /tmp/lf [--shape llama3-8b] [--steps 20] [--cutoff 4096]

The job of ``sft_vs_peers.py`` (the same mixed-length zh/en chat data, LoRA r8 on all linear layers, batch 8, loss on
assistant turns, constant learning rate, seed 0, every tool reading the samples in the same order), on a model
built from published dimensions with random weights (``gpu_mfu.SHAPES``; nothing can be downloaded on the GPU
machine), trained in bf16 by every tool. Each run is a fresh process of ``peer_runner.py --device cuda``, so its
peak GPU memory (``torch.cuda.max_memory_allocated``) is its own; runs alternate between the tools (A B A B).

LLaMA-Factory runs from its own pinned stack (transformers 5.6, peft 0.18.1, trl 0.24, datasets 4.0, accelerate
1.11), put first on ``PYTHONPATH`` from ``--lf-path``; tunelab from the environment this script runs in.

Targets (issue 6): real tokens/s at least 2x LLaMA-Factory's default, and peak memory per token at most half of
its. Memory per token is a run's peak allocated memory over its mean real tokens per timed step, so tools that
put different numbers of tokens in a step (LLaMA-Factory's packing) compare fairly.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from gpu_mfu import build_model  # noqa: E402
from sft_vs_peers import build_data, describe_data, runner_env, write_llamafactory_dataset  # noqa: E402

RUNNER = Path(__file__).resolve().parent / "peer_runner.py"
LABELS = {
    ("tunelab", "padding_free"): "tunelab, default (padding-free, eager)",
    ("tunelab", "padding_free_nolean"): "tunelab, default but train.lean_activations=false",
    ("tunelab", "padding_free_compile"): "tunelab, default + train.torch_compile=true",
    ("tunelab", "padding_free_gc"): "tunelab, default + train.gradient_checkpointing=true",
    ("tunelab", "padding_free_nolong"): "tunelab, default but train.checkpoint_long_batches=false",
    ("tunelab", "packed"): "tunelab, data.batching=packed (rows of cutoff tokens)",
    ("tunelab", "packed_gc"): "tunelab, data.batching=packed + train.gradient_checkpointing=true",
    ("llamafactory", "padded"): "LLaMA-Factory, default (padded, grad. checkpointing on)",
    ("llamafactory", "neat_packing_nogc"): "LLaMA-Factory, neat_packing, checkpointing off (its fastest)",
    ("llamafactory", "neat_packing"): "LLaMA-Factory, neat_packing (checkpointing on)",
}


def prepare(work: Path, shape: str, samples: int, cutoff: int) -> None:
    model = work / "model"
    if not (model / "config.json").is_file():
        build_model(model, shape, max_positions=max(cutoff, 4096))
        # Saved as transformers 5.24 loads it, so LLaMA-Factory's transformers 5.6 encodes the same text to the same
        # ids (see sft_vs_peers.build_model).
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(model).save_pretrained(model)
    if not (work / "data.jsonl").is_file():
        build_data(work / "data.jsonl", samples)
        write_llamafactory_dataset(work)


def run_one(tool: str, mode: str, rep: int, args: argparse.Namespace) -> dict:
    work = Path(args.out)
    run_dir = work / "runs" / f"{tool}-{mode}-{rep}"
    run_dir.mkdir(parents=True, exist_ok=True)
    env = runner_env(work)
    if tool == "llamafactory":
        env["PYTHONPATH"] = os.pathsep.join(p for p in (args.lf_path, os.environ.get("PYTHONPATH")) if p)
    command = [sys.executable, str(RUNNER), "--tool", tool, "--mode", mode, "--method", "lora", "--work", str(work),
               "--run-dir", str(run_dir), "--steps", str(args.steps), "--batch", str(args.batch),
               "--cutoff", str(args.cutoff), "--lr", str(args.lr), "--seed", "0", "--warmup", str(args.warmup),
               "--device", args.device]
    started = time.perf_counter()
    with open(run_dir / "log.txt", "w") as log:
        try:
            code: int | str = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                             timeout=args.run_timeout).returncode
        except subprocess.TimeoutExpired:  # one slow run must not cost the others' numbers
            code = f"timed out after {args.run_timeout:.0f} s"
    result_file = run_dir / "result.json"
    if code or not result_file.is_file():
        tail = (run_dir / "log.txt").read_text(errors="replace")[-2500:]
        print(f"FAILED {tool} {mode} rep {rep} ({code}):\n{tail}", flush=True)
        return {"tool": tool, "mode": mode, "error": f"{code}: {tail[-400:]}"}
    result = json.loads(result_file.read_text())
    result["wall_s"] = round(time.perf_counter() - started, 1)  # the whole process: start, model load, compile, steps
    # a CPU dry run (--device cpu) has no GPU memory to read: its peak RSS stands in
    result.setdefault("peak_gpu_allocated_mb", result["peak_rss_mb"])
    tokens = max(result["real_tokens_per_step"], 1)
    result["mb_per_1k_tokens"] = round(1000 * result["peak_gpu_allocated_mb"] / tokens, 1)
    # what training adds over the weights loaded before it (activations, gradients, optimizer state, logits)
    result["training_mb"] = round(result["peak_gpu_allocated_mb"] - result["gpu_allocated_at_train_begin_mb"], 1)
    result["training_mb_per_1k_tokens"] = round(1000 * result["training_mb"] / tokens, 1)
    print(f"RESULT {tool} {mode} rep {rep}: {result['real_tokens_per_s']:.0f} real tok/s, median step "
          f"{result['median_step_s']:.3f} s, {result['real_tokens_per_step']:.0f} real tok/step, padding eff. "
          f"{result['padding_efficiency']}, peak alloc {result['peak_gpu_allocated_mb']:.0f} MB "
          f"({result['mb_per_1k_tokens']} MB per 1k tokens of a step; training's own {result['training_mb']:.0f} MB, "
          f"{result['training_mb_per_1k_tokens']} per 1k), final loss {result['final_loss']}, "
          f"{result['wall_s']} s in all",
          flush=True)
    return result


def summarise(runs: dict[tuple[str, str], list[dict]]) -> list[dict]:
    table = []
    for (tool, mode), results in runs.items():
        good = [r for r in results if "error" not in r]
        if not good:
            table.append({"tool": tool, "mode": mode, "error": results[0].get("error", "")[-200:]})
            continue
        table.append({
            "tool": tool, "mode": mode, "label": LABELS.get((tool, mode), f"{tool} {mode}"), "runs": len(good),
            "real_tokens_per_s": round(statistics.median(r["real_tokens_per_s"] for r in good), 1),
            "supervised_tokens_per_s": round(statistics.median(r["supervised_tokens_per_s"] for r in good), 1),
            "median_step_s": round(statistics.median(r["median_step_s"] for r in good), 4),
            "real_tokens_per_step": good[0]["real_tokens_per_step"],
            "padding_efficiency": good[0]["padding_efficiency"],
            "peak_gpu_allocated_mb": max(r["peak_gpu_allocated_mb"] for r in good),
            "mb_per_1k_tokens": max(r["mb_per_1k_tokens"] for r in good),
            "training_mb": max(r["training_mb"] for r in good),
            "training_mb_per_1k_tokens": max(r["training_mb_per_1k_tokens"] for r in good),
            "final_loss": good[0]["final_loss"], "losses": good[0]["losses"],
            "versions": good[0]["versions"], "gpu": good[0].get("gpu"),
        })
    return table


def targets(table: list[dict]) -> dict:
    rows = {(r["tool"], r["mode"]): r for r in table if "error" not in r}
    ours, default = rows.get(("tunelab", "padding_free")), rows.get(("llamafactory", "padded"))
    if not ours or not default:
        return {}
    goal = {"speed_vs_default": round(ours["real_tokens_per_s"] / default["real_tokens_per_s"], 2),
            "memory_per_token_vs_default": round(ours["mb_per_1k_tokens"] / default["mb_per_1k_tokens"], 2),
            "training_memory_per_token_vs_default": round(
                ours["training_mb_per_1k_tokens"] / default["training_mb_per_1k_tokens"], 2)}
    goal["speed_met"] = goal["speed_vs_default"] >= 2.0
    goal["memory_met"] = goal["memory_per_token_vs_default"] <= 0.5
    fastest = max((r for (tool, _), r in rows.items() if tool == "llamafactory"), key=lambda r: r["real_tokens_per_s"])
    goal["speed_vs_fastest"] = round(ours["real_tokens_per_s"] / fastest["real_tokens_per_s"], 2)
    goal["fastest_peer_mode"] = fastest["mode"]
    return goal


def markdown(table: list[dict], goal: dict, args: argparse.Namespace) -> str:
    gpu = next((row["gpu"] for row in table if row.get("gpu")), "")
    lines = [f"Shape {args.shape}, LoRA r8 all-linear, batch {args.batch}, cutoff {args.cutoff}, {args.steps} steps "
             f"({args.warmup} warm-up left out), bf16, {gpu}",
             "", "| run | real tok/s | sup. tok/s | median step s | real tok/step | padding eff. | peak alloc MB | "
             "MB per 1k tok/step | training's own MB (per 1k tok) | final loss |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in table:
        if "error" in row:
            error = row["error"][-120:].replace("|", "/").replace("\n", " ")
            lines.append(f"| {row['tool']} {row['mode']} | failed: {error} |")
            continue
        lines.append(f"| {row['label']} | {row['real_tokens_per_s']:,.0f} | {row['supervised_tokens_per_s']:,.0f} | "
                     f"{row['median_step_s']} | {row['real_tokens_per_step']:,.0f} | {row['padding_efficiency']} | "
                     f"{row['peak_gpu_allocated_mb']:,.0f} | {row['mb_per_1k_tokens']} | {row['training_mb']:,.0f} "
                     f"({row['training_mb_per_1k_tokens']}) | {row['final_loss']} |")
    if goal:
        lines += ["", f"tunelab / LLaMA-Factory default: {goal['speed_vs_default']}x real tokens/s (target >= 2: "
                  f"{'met' if goal['speed_met'] else 'missed'}), {goal['memory_per_token_vs_default']}x memory per "
                  f"token (target <= 0.5: {'met' if goal['memory_met'] else 'missed'}; training's own memory per token "
                  f"{goal['training_memory_per_token_vs_default']}x); vs its fastest mode "
                  f"({goal['fastest_peer_mode']}): {goal['speed_vs_fastest']}x"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lf-path", required=True, help="folder with LLaMA-Factory's pinned packages")
    parser.add_argument("--shape", default="llama3-8b", help="a gpu_mfu.SHAPES name; issue 6 asks for a 7-8B shape")
    # LLaMA-Factory's neat_packing without checkpointing ran out of an H100's 80 GB at the 1.5B shape: not a default
    parser.add_argument("--rows", default="llamafactory:padded,tunelab:padding_free,llamafactory:padded,"
                                          "tunelab:padding_free", help="tool:mode runs, in the order they run")
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--cutoff", type=int, default=4096)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--run-timeout", type=float, default=200)
    parser.add_argument("--out", default="/tmp/gpu-peers")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: a dry run of the plumbing")
    args = parser.parse_args()
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    prepare(work, args.shape, args.samples, args.cutoff)
    print("data", json.dumps(describe_data(work, args.cutoff)), flush=True)
    runs: dict[tuple[str, str], list[dict]] = {}
    for rep, spec in enumerate(args.rows.split(",")):
        tool, mode = spec.split(":")
        runs.setdefault((tool, mode), []).append(run_one(tool, mode, rep, args))
        text = write_report(work, runs, args)  # after every run: a device call cut short keeps what ran
    print(text, flush=True)


def write_report(work: Path, runs: dict[tuple[str, str], list[dict]], args: argparse.Namespace) -> str:
    table = summarise(runs)
    goal = targets(table)
    text = markdown(table, goal, args)
    (work / "peers.json").write_text(json.dumps({"args": vars(args), "table": table, "targets": goal}, indent=2))
    (work / "peers.md").write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()
