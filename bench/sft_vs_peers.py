"""tunelab vs TRL (`SFTTrainer`) vs LLaMA-Factory: the same SFT job on a CPU, each tool in its own environment.

    python bench/sft_vs_peers.py --setup      # once: every tool's virtual environment under .bench-venvs/
    nice -n 5 python bench/sft_vs_peers.py [--steps 30] [--repeats 2] [--full-repeats 1] [--threads 1] [--parallel]

Setup puts TRL and LLaMA-Factory in their own virtual environments (torch 2.13.0 CPU first, then the tool at an
exact version; LLaMA-Factory brings its own transformers/peft/trl pins, and its torchvision/torchaudio CUDA wheels,
which cannot load on the CPU torch, are removed, with a stub for the torchaudio it imports — see
``disable_broken_media_packages``). tunelab gets one too, installed as the README's first line installs it, so
that no tool runs with packages it does not require (``setup_venvs``).

The job, the same in every tool: one tiny Qwen2-architecture model (random init, hidden 512, 8 layers, 8 heads /
2 KV heads, MLP 1536, a 4.5k-token BPE tokenizer trained on the bundled corpus: 26.4M parameters) loaded with
``from_pretrained`` from one folder; one mixed-length zh/en chat data set (tool calls, classification, long-input
extraction, open QA; tens to ~2,000 tokens) in one JSON Lines file, rendered with the same ChatML layout; loss on
assistant turns only; batch 8, cutoff 1024, 30 optimizer steps (``--steps``), constant learning rate, seed 0, fp32,
SDPA attention. Configurations: LoRA r8/alpha 16/dropout 0 on all linear layers (lr 1e-3), and full fine-tuning
(lr 1e-4). Rows: each peer in its default mode (padded; both peers checkpoint activations by default) and its
padding-free/packing mode with checkpointing as by default and switched off (its fastest); tunelab's default
(padding-free), its padded path (the per-step loss reference) and padding-free with checkpointing (the memory
comparison); tunelab in bf16 as a separate, labelled row.

Every run is a fresh process of the tool's own interpreter (``bench/peer_runner.py``) with ``--threads`` torch
threads (1 by default: then the CPU time of a step is the run's own work even when other jobs share the cores),
in rotation A B C …, then reversed, so drifting machine load hits every tool; ``--parallel`` runs the LoRA and the
full-fine-tuning rotations side by side (one process each on the 2 cores), the second one reversed. Each tool is
measured by the same code (see ``peer_runner.py``): real (non-pad) and supervised tokens from the batches the tool
actually feeds, CPU and wall time between optimizer-step ends after ``--warmup`` steps, the process's peak RSS, and
the losses the tool logs each step. Ratios and targets use real tokens per CPU-second. After each table the script
rewrites its marked block of ``bench/RESULTS.md`` (``--results-md``): the run's time, machine, load, command, each
tool's exact versions and the tables; ``--render results.json`` writes that block from a finished run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENVS = ROOT / ".bench-venvs"
RUNNER = Path(__file__).resolve().parent / "peer_runner.py"
TORCH = "torch==2.13.0"  # the CPU build on this machine's disk; an unpinned torch pulls a multi-GB CUDA build
PEERS = {
    "trl": ["trl==1.16.0", "peft==0.21.2", "transformers==5.24.0"],
    "llamafactory": ["llamafactory==0.9.5"],
}
# (tool, mode, label); the first row of each table is tunelab's default, the numerator of every ratio.
ROWS = [
    ("tunelab", "padding_free", "tunelab, default (padding-free)"),
    ("trl", "padded", "TRL SFTTrainer, default (padded, grad. checkpointing on)"),
    ("llamafactory", "padded", "LLaMA-Factory, default (padded, grad. checkpointing on)"),
    ("tunelab", "padded", "tunelab, padded (loss reference)"),
    ("trl", "padding_free", "TRL, padding_free=True (checkpointing on)"),
    ("llamafactory", "neat_packing", "LLaMA-Factory, neat_packing (checkpointing on)"),
    ("trl", "padding_free_nogc", "TRL, padding_free=True, checkpointing off"),
    ("llamafactory", "neat_packing_nogc", "LLaMA-Factory, neat_packing, checkpointing off"),
]
GC_ROW = ("tunelab", "padding_free_gc", "tunelab, padding-free, checkpointing on (train.gradient_checkpointing)")
ALLOCATOR_ROW = ("tunelab", "padding_free_glibc", "tunelab, default but glibc's malloc (train.cpu_allocator=system)")
# What `auto` preloads on a machine without a system jemalloc: the mimalloc that tunelab's own install brings.
WHEEL_ALLOCATOR_ROW = ("tunelab", "padding_free_mimalloc",
                       "tunelab, default with its wheel's mimalloc (auto without a system jemalloc)")
LONG_BATCH_ROW = ("tunelab", "padding_free_nolong",
                  "tunelab, default but no long-batch recompute (train.checkpoint_long_batches=false)")
# A control, not a peer mode: the leanest peer with the allocator tunelab preloads, set by hand (LD_PRELOAD).
PEER_ALLOCATOR_ROW = ("trl", "padding_free+jemalloc", "*control:* TRL, padding_free=True (checkpointing on), "
                      "jemalloc preloaded by hand as tunelab does")
BF16_ROW = ("tunelab", "padding_free_bf16", "tunelab, padding-free, **bf16** (not comparable: other precision)")
PEER_DEFAULT = {"trl": "padded", "llamafactory": "padded"}
LEARNING_RATE = {"lora": 1e-3, "full": 1e-4}
MODEL_SHAPE = dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2, intermediate_size=1536)


# ---- environments ----------------------------------------------------------------------------------------------


def python_of(tool: str) -> str:
    """Every tool runs in an environment of its own, tunelab included (see :func:`setup_venvs`)."""
    return str(VENVS / tool / "bin" / "python")


def setup_venvs() -> None:
    """Create the tools' environments once: torch pinned first, so no requirement can pull a CUDA build.

    tunelab gets one too, installed as the README's first line installs it (``pip install -e .``, no extras). The
    development environment holds packages tunelab never asks for (scipy, boto3, trio, ...) that transformers and
    accelerate import when they are present: about 50 MB of RSS that the peers' clean environments do not pay, and
    that says nothing about the tools. Editable, so the bench measures the working tree (reinstalled on every
    ``--setup``, as its requirements may have changed)."""
    for tool, pins in {**PEERS, "tunelab": ["-e", str(ROOT)]}.items():
        venv = VENVS / tool
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
        if not (venv / "bin" / "python").is_file():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        if tool == "tunelab" or not pinned_versions_installed(venv, [TORCH, *pins]):
            subprocess.run([*pip, TORCH], check=True)
            subprocess.run([*pip, TORCH, *pins], check=True)
        if tool == "llamafactory":
            disable_broken_media_packages(venv)
        freeze = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "freeze"], capture_output=True,
                                text=True, check=True)
        (VENVS / f"{tool}-freeze.txt").write_text(freeze.stdout)
        print(f"{tool}: {venv}")


TORCHAUDIO_STUB = '''"""Stand-in written by tunelab's bench/sft_vs_peers.py, not the real torchaudio.

No torchaudio release loads with torch 2.13.0+cpu (PyPI's newest, 2.11.0, is built for CUDA torch 2.11 and fails to
load its library), yet LLaMA-Factory imports it at module level (llamafactory/data/mm_plugin.py) for audio
inputs that text SFT never uses. Any real use fails here with this message.
"""


def __getattr__(name):
    raise ImportError(f"torchaudio.{name}: torchaudio is disabled in this benchmark environment (no CPU build "
                      "for torch 2.13.0)")
'''


def disable_broken_media_packages(venv: Path) -> None:
    """LLaMA-Factory requires torchvision and torchaudio (multimodal plugins, unused by text SFT); pip resolves them
    to PyPI's CUDA builds, whose compiled operators do not load on the CPU torch. Remove the broken ones; put a
    stub in torchaudio's place because LLaMA-Factory imports it unconditionally (torchvision it imports lazily)."""
    python = str(venv / "bin" / "python")
    for package in ("torchvision", "torchaudio"):
        probe = "import torchvision.ops; torchvision.ops.nms" if package == "torchvision" else "import torchaudio"
        check = subprocess.run([python, "-c", probe], capture_output=True, text=True)
        if check.returncode and "No module named" not in check.stderr:
            print(f"removing {package} from {venv}: {check.stderr.strip().splitlines()[-1]}")
            subprocess.run([python, "-m", "pip", "uninstall", "-y", "-q", package], check=True)
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    if subprocess.run([python, "-c", "import torchaudio"], capture_output=True).returncode:
        stub = Path(site) / "torchaudio"
        stub.mkdir(exist_ok=True)
        (stub / "__init__.py").write_text(TORCHAUDIO_STUB)


def pinned_versions_installed(venv: Path, pins: list[str]) -> bool:
    """Whether ``name==version`` pins are already met (a rerun of --setup must not reinstall the removed packages)."""
    probe = ("import sys; from importlib import metadata\n"
             "def version(name):\n"
             "    try:\n"
             "        return metadata.version(name).split('+')[0]\n"
             "    except metadata.PackageNotFoundError:\n"
             "        return None\n"
             "sys.exit(any(version(n) != v for n, v in (p.split('==') for p in sys.argv[1:])))")
    return subprocess.run([str(venv / "bin" / "python"), "-c", probe, *pins]).returncode == 0


# ---- the shared model and data ---------------------------------------------------------------------------------


def build_model(out: Path) -> Path:
    from tunelab.demo.tiny import build_tiny_model, train_tokenizer

    if (out / "config.json").is_file():
        return out
    corpus = Path(str(resources.files("tunelab.resources").joinpath("demo_corpus.txt"))).read_text("utf-8")
    tokenizer = train_tokenizer(corpus.splitlines(), vocab_size=8000)
    model = build_tiny_model(tokenizer, max_positions=4096, **MODEL_SHAPE)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # transformers 5.24 loads this folder (model_type qwen2) as Qwen2Tokenizer, which swaps in Qwen2's own
    # pre-tokenizer (digits one by one); transformers 5.6, in LLaMA-Factory's environment, keeps the saved one, and
    # the same text then came out ~15% shorter there. Saving the tokenizer as 5.24 loads it makes every tool's
    # environment encode the same text to the same ids.
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(out).save_pretrained(out)
    return out


def _demo_records() -> list[dict]:
    text = Path(str(resources.files("tunelab.resources").joinpath("demo_sft.jsonl"))).read_text("utf-8")
    return [json.loads(line) for line in text.splitlines()]


def _sentences() -> list[str]:
    text = Path(str(resources.files("tunelab.resources").joinpath("demo_corpus.txt"))).read_text("utf-8")
    # Each distinct sentence once: the corpus repeats the demo's system prompt hundreds of times.
    return list(dict.fromkeys(line for line in text.splitlines() if len(line) > 12 and not line.startswith("{")))


def build_data(path: Path, n: int, seed: int = 0) -> Path:
    """Mixed zh/en chats of four kinds, from the bundled demo records and corpus sentences.

    - tool calls (35%): the demo's shopping-assistant requests → JSON tool calls, 1–4 turns under its system prompt;
    - classification (25%): sentiment and product category, 1–3 turns;
    - long-input extraction (15%): a transcript of 15–150 corpus sentences (~250 to ~2,500 tokens, so some exceed
      the cutoff) with one order id and one coupon code planted in it; the answer is a one-line JSON;
    - open QA (25%): 1–4 turns whose answers are 2–15 corpus sentences.
    """
    demo, sentences = _demo_records(), _sentences()
    tools = [r for r in demo if r["messages"][0]["role"] == "system"]
    labels = [r for r in demo if r["messages"][0]["role"] != "system"
              and r["messages"][-1]["content"] in {"positive", "negative", "clothing", "shoes", "electronics",
                                                   "beauty", "food", "home"}]
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        kind = rng.choices(["tool", "classify", "extract", "qa"], weights=[35, 25, 15, 25])[0]
        if kind == "tool":
            picks = rng.sample(tools, rng.choice([1, 1, 2, 3, 4]))
            messages = [picks[0]["messages"][0]] + [m for r in picks for m in r["messages"][1:]]
        elif kind == "classify":
            messages = [m for r in rng.sample(labels, rng.choice([1, 1, 2, 3])) for m in r["messages"]]
        elif kind == "extract":
            zh = rng.random() < 0.5
            order, coupon = f"{rng.randrange(100000, 999999)}", rng.choice(["SAVE10", "NEW50", "VIP15", "LIVE88"])
            lines = rng.sample(sentences, int(min(150, 15 + rng.expovariate(1 / 35))))
            lines.insert(rng.randrange(len(lines) + 1), f"顾客说：我的订单号是{order}。" if zh
                         else f"The customer said: my order id is {order}.")
            lines.insert(rng.randrange(len(lines) + 1), f"主播提醒：今晚可用优惠码{coupon}。" if zh
                         else f"The host said coupon {coupon} works tonight.")
            ask = ("从下面的直播记录中提取订单号和优惠码，只输出 JSON：\n\n" if zh else
                   "Extract the order id and the coupon code from this live-stream transcript. Answer in JSON:\n\n")
            messages = [{"role": "user", "content": ask + "\n".join(lines)},
                        {"role": "assistant", "content": json.dumps({"coupon": coupon, "order_id": order})}]
        else:
            messages = []
            for _ in range(rng.choice([1, 1, 2, 3, 4])):
                question = rng.choice(sentences)
                ask = rng.choice(["请详细说说：", "接着讲讲：", "Tell me more about this: ", "Continue the story: "])
                answer = " ".join(rng.sample(sentences, rng.randint(2, 15)))
                messages += [{"role": "user", "content": ask + question}, {"role": "assistant", "content": answer}]
        rows.append({"messages": messages})
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    # The meter counts real tokens as ids != pad id, so the pad token must never occur in the data.
    assert "<|endoftext|>" not in text
    path.write_text(text, "utf-8")
    write_tunelab_order(path, seed=0)
    return path


def write_tunelab_order(path: Path, seed: int) -> Path:
    """The same records, arranged so that tunelab's own shuffle of its training split (``data.seed``) yields the
    file order of ``path``, which is the order the peers read it in (see ``peer_runner.same_order_for_every_tool``)."""
    from tunelab.data.split import split_order

    lines = path.read_text("utf-8").splitlines(keepends=True)
    order, _, _ = split_order(len(lines), 0.0, 0.0, seed)
    arranged = [""] * len(lines)
    for position, index in enumerate(order):
        arranged[index] = lines[position]
    target = path.with_name("data-tunelab-order.jsonl")
    target.write_text("".join(arranged), "utf-8")
    return target


def write_llamafactory_dataset(work: Path) -> None:
    """LLaMA-Factory reads data sets registered in a dataset_info.json; this one points at the shared file."""
    folder = work / "llamafactory-data"
    folder.mkdir(exist_ok=True)
    info = {"bench_peers": {
        "file_name": str((work / "data.jsonl").resolve()), "formatting": "sharegpt",
        "columns": {"messages": "messages"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                 "system_tag": "system"},
    }}
    (folder / "dataset_info.json").write_text(json.dumps(info, indent=2))


def describe_data(work: Path, cutoff: int) -> dict:
    """Token lengths of the data under tunelab's chatml rendering (each tool's own counts come with its runs)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    lengths = []
    for line in (work / "data.jsonl").read_text("utf-8").splitlines():
        text = tokenizer.apply_chat_template(json.loads(line)["messages"], tokenize=False)
        lengths.append(len(tokenizer(text, add_special_tokens=False)["input_ids"]))
    lengths.sort()
    return {"samples": len(lengths), "min": lengths[0], "median": lengths[len(lengths) // 2],
            "mean": round(statistics.mean(lengths), 1), "p90": lengths[int(0.9 * len(lengths))],
            "max": lengths[-1], "over_cutoff": sum(x > cutoff for x in lengths)}


# ---- running and reporting -------------------------------------------------------------------------------------


def runner_env(work: Path) -> dict[str, str]:
    """The environment of every peer run: offline, no trackers, one datasets cache, and LLaMA-Factory's import-time
    version check off (each tool runs on the versions it pins, installed here by hand)."""
    return {**os.environ, "HF_DATASETS_CACHE": str(work / "hf-datasets-cache"), "TOKENIZERS_PARALLELISM": "false",
            "DISABLE_VERSION_CHECK": "1", "HF_HUB_OFFLINE": "1", "WANDB_DISABLED": "true"}


def run_one(tool: str, mode: str, method: str, rep: int, args: argparse.Namespace) -> dict:
    run_dir = Path(args.out) / "runs" / f"{tool}-{mode}-{method}-{rep}"
    if args.reuse and (run_dir / "result.json").is_file():
        return json.loads((run_dir / "result.json").read_text())
    subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    runner_mode, _, preload = mode.partition("+")
    command = [python_of(tool), str(RUNNER), "--tool", tool, "--mode", runner_mode, "--method", method,
               "--work", str(args.out), "--run-dir", str(run_dir), "--steps", str(args.steps),
               "--batch", str(args.batch), "--cutoff", str(args.cutoff), "--lr", str(LEARNING_RATE[method]),
               "--seed", "0", "--warmup", str(args.warmup)]
    threads = str(args.threads)
    env = {**runner_env(Path(args.out)), "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    if preload:  # the same library and setting tunelab's train.cpu_allocator would preload
        from tunelab.train.allocator import ALLOCATORS, find_allocator

        library = find_allocator(preload)
        if library is None:
            raise SystemExit(f"{mode}: {preload} is not installed here ({ALLOCATORS[preload].install})")
        variable, value = ALLOCATORS[preload].settings
        env.update({"LD_PRELOAD": library, variable: value})
    run_dir.mkdir(parents=True)
    with open(run_dir / "log.txt", "w") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, text=True)
    result_file = run_dir / "result.json"
    if done.returncode or not result_file.is_file():
        tail = (run_dir / "log.txt").read_text(errors="replace")[-4000:]
        raise SystemExit(f"{tool} {mode} {method} failed (exit {done.returncode}):\n{tail}")
    result = json.loads(result_file.read_text())
    result["load_average"] = os.getloadavg()
    result_file.write_text(json.dumps(result, indent=2))
    print(f"  {method} {tool:12s} {mode:18s} rep {rep}: {result['real_tokens_per_cpu_s']:8.1f} real tok/CPU-s, "
          f"{result['real_tokens_per_s']:8.1f} real tok/s wall, median step {result['median_step_cpu_s']:.2f} CPU-s, "
          f"peak RSS {result['peak_rss_mb']:.0f} MB, "
          f"final loss {result['final_loss']:.4f}, load {result['load_average'][0]:.1f}", flush=True)
    return result


def run_method(method: str, repeats: int, rows: list[tuple[str, str, str]], args: argparse.Namespace,
               reverse_first: bool = False) -> dict:
    runs: dict[tuple[str, str], list[dict]] = {(tool, mode): [] for tool, mode, _ in rows}
    for rep in range(repeats):
        # A B C … then … C B A (and the next configuration starts where this one ended): drift hits every tool alike
        order = rows if (rep + reverse_first) % 2 == 0 else rows[::-1]
        for tool, mode, _ in order:
            runs[(tool, mode)].append(run_one(tool, mode, method, rep, args))
    return runs


def summarise(method: str, runs: dict, rows: list[tuple[str, str, str]]) -> list[dict]:
    def speed(key: tuple[str, str], metric: str = "real_tokens_per_cpu_s") -> float:
        return statistics.mean(r[metric] for r in runs[key])

    ours, ours_wall = speed(("tunelab", "padding_free")), speed(("tunelab", "padding_free"), "real_tokens_per_s")
    reference = runs.get(("tunelab", "padded"), [{}])[0].get("losses")
    table = []
    for tool, mode, label in rows:
        rs = runs[(tool, mode)]
        first = rs[0]
        row = {
            "method": method, "tool": tool, "mode": mode, "label": label,
            "real_tokens_per_cpu_s": round(speed((tool, mode)), 1),
            "each_run": [round(r["real_tokens_per_cpu_s"], 1) for r in rs],
            "supervised_tokens_per_cpu_s": round(speed((tool, mode), "supervised_tokens_per_cpu_s"), 1),
            "median_step_cpu_s": round(statistics.median(r["median_step_cpu_s"] for r in rs), 3),
            "real_tokens_per_s_wall": round(speed((tool, mode), "real_tokens_per_s"), 1),
            "median_step_s_wall": round(statistics.median(r["median_step_s"] for r in rs), 3),
            "real_tokens_per_step": first["real_tokens_per_step"],
            # Peak RSS follows the largest step (activations grow with its tokens), not the mean one.
            "largest_step_real_tokens": max(first["real_per_step"]),
            "rows_per_step": first["rows_per_step"],
            "padding_efficiency": first["padding_efficiency"],
            "peak_rss_mb": round(max(r["peak_rss_mb"] for r in rs), 1),
            "final_loss": first["final_loss"],
            "trainable_parameters": first["trainable_parameters"],
            "real_tokens_all_steps": first["real_tokens_all_steps"],
            "supervised_tokens_all_steps": first["supervised_tokens_all_steps"],
            "optim": first["optim"], "attn_implementation": first["attn_implementation"],
            "ratio_tunelab_over_this": round(ours / speed((tool, mode)), 3),
            "ratio_wall": round(ours_wall / speed((tool, mode), "real_tokens_per_s"), 3),
            "load_average": [round(r["load_average"][0], 1) for r in rs if "load_average" in r],
            "versions": first["versions"],
        }
        if tool == "tunelab" and reference and mode in ("padding_free", "padded", "padding_free_gc",
                                                        "padding_free_glibc", "padding_free_mimalloc",
                                                        "padding_free_nolong"):
            row["max_step_loss_diff_vs_tunelab_padded"] = max(
                abs(a - b) for r in rs for a, b in zip(r["losses"], reference, strict=True))
        table.append(row)
    return table


# tunelab's one-setting variants whose peak RSS is held against the leanest peer: targets() key -> (mode, words).
RSS_VARIANTS = {
    "rss_system_allocator_vs_leanest_peer": ("padding_free_glibc", "with glibc's malloc"),
    "rss_wheel_mimalloc_vs_leanest_peer": ("padding_free_mimalloc", "with the wheel's mimalloc"),
    "rss_checkpointing_vs_leanest_peer": ("padding_free_gc", "with checkpointing"),
}


def targets(table: list[dict]) -> dict:
    """The issue's targets, as ratios: ≥1.8× the best peer default, ≥1.15× the best peer fastest mode, RSS ≤ leanest.
    A target whose peer rows were not run (``--rows``) is None."""
    ours = next(r for r in table if r["tool"] == "tunelab" and r["mode"] == "padding_free")
    peers = [r for r in table if r["tool"] != "tunelab" and "+" not in r["mode"]]  # controls are not peer modes
    defaults = [r for r in peers if r["mode"] == PEER_DEFAULT[r["tool"]]]
    best_default = max(defaults, key=lambda r: r["real_tokens_per_cpu_s"], default=None)
    fastest = max(peers, key=lambda r: r["real_tokens_per_cpu_s"], default=None)
    leanest = min(peers, key=lambda r: r["peak_rss_mb"], default=None)

    def speed_vs(peer: dict | None, target: float) -> dict | None:
        return peer and {"peer": peer["label"], "ratio": peer["ratio_tunelab_over_this"], "target": target,
                         "met": peer["ratio_tunelab_over_this"] >= target}

    def rss_vs(mode: str) -> dict | None:
        row = next((r for r in table if r["tool"] == "tunelab" and r["mode"] == mode), None)
        return row and leanest and {"peer": leanest["label"], "tunelab_mb": row["peak_rss_mb"],
                                    "peer_mb": leanest["peak_rss_mb"],
                                    "met": row["peak_rss_mb"] <= leanest["peak_rss_mb"]}

    return {
        "vs_best_peer_default": speed_vs(best_default, 1.8),
        "vs_best_peer_fastest": speed_vs(fastest, 1.15),
        "rss_vs_leanest_peer": rss_vs("padding_free"),
        **{key: rss_vs(mode) for key, (mode, _) in RSS_VARIANTS.items()},
        "loss_diff_padding_free_vs_padded": ours.get("max_step_loss_diff_vs_tunelab_padded"),
        # --rows can leave peer modes out: then "fastest" and "leanest" are only among those that ran
        "all_peer_rows": {(t, m) for t, m, _ in ROWS if t != "tunelab"} <= {(r["tool"], r["mode"]) for r in peers},
    }


def markdown(method: str, table: list[dict], goal: dict) -> str:
    head = ("| tool, mode | real tok/CPU-s | supervised tok/CPU-s | median step CPU-s | real tok/s wall "
            "| real tok/step | rows/step | padding eff. | peak RSS MB | final loss | tunelab ÷ this (CPU) "
            "| (wall) |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [f"**{method}**", "", head]
    for r in table:
        lines.append(
            f"| {r['label']} | {' / '.join(f'{x:,.0f}' for x in r['each_run'])} "
            f"| {r['supervised_tokens_per_cpu_s']:,.0f} | {r['median_step_cpu_s']:.2f} "
            f"| {r['real_tokens_per_s_wall']:,.0f} | {r['real_tokens_per_step']:,.0f} "
            f"| {r['rows_per_step']:g} | {r['padding_efficiency']:.0%} | {r['peak_rss_mb']:,.0f} "
            f"| {r['final_loss']:.4f} | {r['ratio_tunelab_over_this']:.2f} | {r['ratio_wall']:.2f} |")

    def met(entry: dict) -> str:
        return "met" if entry["met"] else "missed"

    parts = [f"vs {words} ({entry['peer']}) {entry['ratio']:.2f}× (target ≥ {entry['target']:g}×, {met(entry)})"
             for key, words in (("vs_best_peer_default", "best peer default"),
                                ("vs_best_peer_fastest", "best peer fastest mode")) if (entry := goal.get(key))]
    if rss := goal.get("rss_vs_leanest_peer"):
        parts.append(f"peak RSS {rss['tunelab_mb']:,.0f} MB vs leanest peer ({rss['peer']}) "
                     f"{rss['peer_mb']:,.0f} MB ({met(rss)})")
    parts += [f"{words} {goal[key]['tunelab_mb']:,.0f} MB ({met(goal[key])})"
              for key, (_, words) in RSS_VARIANTS.items() if goal.get(key)]
    if goal.get("loss_diff_padding_free_vs_padded") is not None:
        parts.append(f"largest per-step loss difference, tunelab padding-free vs padded: "
                     f"{goal['loss_diff_padding_free_vs_padded']:.1e}")
    scope = "" if goal.get("all_peer_rows", True) else ", against only the peer rows that ran"
    lines += ["", f"Targets ({method}{scope}): " + ("; ".join(parts) or "no peer row ran") + "."]
    return "\n".join(lines)


# The block of bench/RESULTS.md that the script keeps up to date (the prose around it is written by hand).
RESULTS_BEGIN = "<!-- bench/sft_vs_peers.py writes from here: the latest run's tables -->"
RESULTS_END = "<!-- bench/sft_vs_peers.py writes up to here -->"
RESULTS_SECTION = "## `bench/sft_vs_peers.py`"


def results_block(report: dict) -> str:
    """The latest run as Markdown: when, where, what, the exact versions of each tool, and the tables."""
    versions: dict[str, dict] = {}
    for table in report["tables"].values():
        for row in table["rows"]:
            versions.setdefault(row["tool"], row["versions"])
    load_before = ", ".join(f"{x:.1f}" for x in report["load_average_before"])
    load_after = ", ".join(f"{x:.1f}" for x in report.get("load_average_after", []))
    lines = [RESULTS_BEGIN, "",
             f"Latest run, written by the script: {report['started']} to {report.get('finished', '?')}, "
             f"{report['device']}, load average (1/5/15 min) {load_before} before and {load_after} after; "
             f"tunelab {report.get('tunelab_rev', '?')}; {report.get('threads', '?')} torch thread(s) per run"
             + (", the configurations side by side" if report.get("parallel") else "") + ".",
             "", f"Command: `{report['command']}`", "", f"Data: {report['data']}", "",
             "Versions: " + "; ".join(f"{tool}: " + ", ".join(f"{k} {v}" for k, v in sorted(found.items()))
                                      for tool, found in versions.items()), ""]
    for table in report["tables"].values():
        lines += [table["markdown"], ""]
    return "\n".join([*lines, RESULTS_END])


def write_results_md(path: Path, report: dict) -> None:
    """Replace the script's block in ``path`` (or put one under the peer benchmark's heading, or at the end)."""
    text = path.read_text("utf-8") if path.is_file() else "# Benchmark results\n"
    block = results_block(report)
    if RESULTS_BEGIN in text and RESULTS_END in text:
        head, rest = text.split(RESULTS_BEGIN, 1)
        text = head + block + rest.split(RESULTS_END, 1)[1]
    elif RESULTS_BEGIN in text or RESULTS_END in text:
        raise SystemExit(f"{path} has one of the markers of the script's block but not the other: fix it by hand")
    elif RESULTS_SECTION in text:
        head, rest = text.split(RESULTS_SECTION, 1)
        heading, _, body = rest.partition("\n")
        text = f"{head}{RESULTS_SECTION}{heading}\n\n{block}\n{body}"
    else:
        text = text.rstrip("\n") + f"\n\n{RESULTS_SECTION} — tunelab vs TRL vs LLaMA-Factory\n\n{block}\n"
    path.write_text(text, "utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setup", action="store_true",
                        help="create the tools' virtual environments (tunelab's too) and exit")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--cutoff", type=int, default=1024)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each row for LoRA")
    parser.add_argument("--full-repeats", type=int, default=1, help="runs of each row for full fine-tuning")
    parser.add_argument("--warmup", type=int, default=2, help="first optimizer steps left out of the timing")
    parser.add_argument("--methods", default="lora,full")
    parser.add_argument("--bf16-methods", default="lora",
                        help="configurations that get tunelab's separate bf16 row (comma-separated; '' for none)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per run (1: CPU time per step stays comparable on a shared machine)")
    parser.add_argument("--parallel", action="store_true",
                        help="run the configurations' rotations side by side (one process each; 2 cores)")
    parser.add_argument("--reuse", action="store_true",
                        help="keep runs that already have a result.json in --out (to add rows to a finished run)")
    parser.add_argument("--rows", default="",
                        help="run only these rows, as comma-separated tool:mode (e.g. trl:padded,tunelab:padding_free;"
                             " default: all). The tables and targets are written only when tunelab's default row is"
                             " among them; with --reuse, rows run earlier into --out are read back instead of re-run")
    parser.add_argument("--out", default="bench/out-peers")
    parser.add_argument("--results-md", default=str(ROOT / "bench" / "RESULTS.md"),
                        help="Markdown file whose marked block gets the tables and versions after each table "
                             "('' to leave it alone)")
    parser.add_argument("--render", metavar="RESULTS_JSON",
                        help="only write --results-md from a finished run's results.json, and exit")
    args = parser.parse_args()
    if args.setup:
        setup_venvs()
        return
    if args.render:
        write_results_md(Path(args.results_md), json.loads(Path(args.render).read_text("utf-8")))
        return
    for tool in ("tunelab", *PEERS):
        if not Path(python_of(tool)).is_file():
            raise SystemExit(f"no environment for {tool}: run `python bench/sft_vs_peers.py --setup` first")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    build_model(out / "model")
    if not (out / "data.jsonl").is_file():
        build_data(out / "data.jsonl", args.samples)
    write_tunelab_order(out / "data.jsonl", seed=0)
    write_llamafactory_dataset(out)
    data = describe_data(out, args.cutoff)
    print(f"data: {data}", flush=True)
    started = datetime.datetime.now()
    load_before = os.getloadavg()
    report = {"data": data, "started": started.isoformat(timespec="seconds"), "load_average_before": load_before,
              "device": f"{platform.machine()} {platform.processor()}, {os.cpu_count()} cores",
              "tunelab_rev": _git_rev(), "command": " ".join(sys.argv), "threads": args.threads,
              "parallel": args.parallel, "tables": {}}
    methods = args.methods.split(",")
    lock = threading.Lock()  # the two rotations of --parallel share the report

    def one_table(index: int, method: str) -> None:
        rows = [*ROWS, GC_ROW, ALLOCATOR_ROW, WHEEL_ALLOCATOR_ROW, LONG_BATCH_ROW, PEER_ALLOCATOR_ROW,
                *([BF16_ROW] if method in args.bf16_methods.split(",") else [])]
        if args.rows:
            wanted = {tuple(key.split(":", 1)) for key in args.rows.split(",")}
            unknown = wanted - {(tool, mode) for tool, mode, _ in rows}
            if unknown:
                raise SystemExit(f"--rows: no such row for {method}: {sorted(':'.join(k) for k in unknown)}")
            rows = [row for row in rows if (row[0], row[1]) in wanted]
        repeats = args.repeats if method == "lora" else args.full_repeats
        # Side by side the second rotation runs in reverse, so the two streams do not meet the same tool at once.
        runs = run_method(method, repeats, rows, args, reverse_first=index % 2 == 1)
        if ("tunelab", "padding_free") not in runs:
            print(f"{method}: tunelab's default row was not among --rows; no table (add it later with --reuse)",
                  flush=True)
            return
        table = summarise(method, runs, rows)
        goal = targets(table)
        with lock:
            report["tables"][method] = {"rows": table, "targets": goal, "markdown": markdown(method, table, goal)}
            print(report["tables"][method]["markdown"], flush=True)
            report["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
            report["load_average_after"] = os.getloadavg()
            (out / "results.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))  # after each table
            print(f"wrote {out / 'results.json'}", flush=True)
            if args.results_md and not args.rows:  # a partial run (--rows) is not the latest run's tables
                write_results_md(Path(args.results_md), report)
                print(f"wrote its tables into {args.results_md}", flush=True)

    if args.parallel:
        with ThreadPoolExecutor(len(methods)) as pool:
            for future in [pool.submit(one_table, i, m) for i, m in enumerate(methods)]:
                future.result()
    else:
        for index, method in enumerate(methods):
            one_table(index, method)


def _git_rev() -> str:
    done = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return done.stdout.strip() + ("+local changes" if dirty else "")


if __name__ == "__main__":
    main()
