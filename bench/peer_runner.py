"""One SFT run of one tool (tunelab, TRL or LLaMA-Factory), measured the same way whatever the tool.

Run by ``bench/sft_vs_peers.py`` with each tool's own interpreter (its own virtual environment), one process per
run, so peak RSS is that run's own:

    <venv>/bin/python bench/peer_runner.py --tool trl --mode padding_free --method lora --work bench/out-peers \
        --run-dir bench/out-peers/runs/trl-padding_free-lora-0 --steps 30 --batch 8 --cutoff 1024 --lr 1e-3

This file imports nothing from tunelab at module level: the peers' environments do not have it. All three tools
train through ``transformers.Trainer``, so one measurement fits all: ``Trainer.__init__`` is wrapped to add the
meter callback and ``Trainer.training_step`` to count what each step is really fed, before the tool's own code
runs. Nothing else of a tool is changed, except that runs without packing read the samples in file order
(``same_order_for_every_tool``), so every tool's step n sees the same batch.

- real tokens: input tokens that are not padding (``input_ids != pad id``; the bench data never contains the pad
  token, which the builder checks), whatever the layout (padded rows, flat rows, packed rows);
- supervised tokens: ``labels != -100`` (every tool masks the first token of a sample, so no shift is needed);
- token slots: every input position, padding included;
- step time: the interval between two optimizer-step ends, so a tool's data loading and collation (a packed
  batch's 4-D mask, say) count, and the first ``--warmup`` steps are left out; both wall-clock time and the
  process's CPU time (``time.process_time``: all its threads), which is what stays comparable when other jobs
  share the cores and the run uses one thread;
- loss: the loss each tool logs at every step (``logging_steps=1``);
- peak RSS: the process's high-water mark (``VmHWM``) at the end, and at the start of training.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

# The ChatML layout tunelab's ``chatml`` template and the tiny tokenizer's own template render, with TRL's
# {% generation %} markers around what an assistant turn must learn (its text and end-of-turn line), so that TRL's
# ``assistant_only_loss`` supervises the same tokens as tunelab and LLaMA-Factory.
CHATML_WITH_GENERATION = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endgeneration %}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
IGNORE_INDEX = -100
PACKING_MODES = ("neat_packing", "neat_packing_nogc", "packing", "packing_nogc", "packed")


def vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Meter:
    """Counts what each optimizer step is fed and times the steps; installed into ``transformers.Trainer``."""

    def __init__(self, pad_id: int, synchronize: Any = None) -> None:
        self.pad_id = pad_id
        # On a GPU a step's kernels are still running when on_step_end is called; waiting for them makes each step's
        # interval its own work (the sum over the run is the same either way).
        self.synchronize = synchronize
        self.gpu_at_train_begin = 0.0
        self.step_end: list[float] = []
        self.step_end_cpu: list[float] = []
        self.real: list[int] = []
        self.supervised: list[int] = []
        self.slots: list[int] = []
        self.rows: list[int] = []
        self.losses: dict[int, float] = {}
        self.train_begin = 0.0
        self.train_begin_cpu = 0.0
        self.rss_at_train_begin = 0.0
        self._pending = [0, 0, 0, 0]
        self.trainer: Any = None

    def gpu_allocated(self) -> float:
        """MB the GPU holds for tensors now (weights and whatever the tool made before training): the base that
        ``peak_gpu_allocated_mb`` minus it leaves the training's own peak (activations, gradients, optimizer)."""
        if self.synchronize is None or "torch" not in sys.modules:
            return 0.0
        import torch

        return torch.cuda.memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0

    def count(self, inputs: dict[str, Any]) -> None:
        ids = inputs["input_ids"]
        labels = inputs.get("labels")
        self._pending[0] += int((ids != self.pad_id).sum())
        self._pending[1] += int((labels != IGNORE_INDEX).sum()) if labels is not None else 0
        self._pending[2] += ids.numel()
        self._pending[3] += ids.shape[0] if ids.dim() > 1 else 1

    def install(self) -> None:
        from transformers import Trainer, TrainerCallback

        meter = self

        class MeterCallback(TrainerCallback):
            def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                meter.rss_at_train_begin = vm_hwm_mb()
                meter.gpu_at_train_begin = meter.gpu_allocated()
                meter.train_begin = time.perf_counter()
                meter.train_begin_cpu = time.process_time()

            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                if meter.synchronize is not None:
                    meter.synchronize()
                meter.step_end.append(time.perf_counter())
                meter.step_end_cpu.append(time.process_time())
                for bucket, value in zip((meter.real, meter.supervised, meter.slots, meter.rows), meter._pending,
                                         strict=True):
                    bucket.append(value)
                meter._pending = [0, 0, 0, 0]

            def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
                if logs and "loss" in logs:
                    meter.losses[state.global_step] = float(logs["loss"])

        original_init, original_step = Trainer.__init__, Trainer.training_step

        def init(trainer: Any, *args: Any, **kwargs: Any) -> None:
            original_init(trainer, *args, **kwargs)
            trainer.add_callback(MeterCallback())
            meter.trainer = trainer

        def training_step(trainer: Any, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
            meter.count(inputs)
            return original_step(trainer, model, inputs, *args, **kwargs)

        Trainer.__init__ = init  # type: ignore[method-assign]
        Trainer.training_step = training_step  # type: ignore[method-assign]

    def report(self, warmup: int) -> dict[str, Any]:
        starts = [self.train_begin, *self.step_end[:-1]]
        durations = [end - start for start, end in zip(starts, self.step_end, strict=True)]
        cpu_starts = [self.train_begin_cpu, *self.step_end_cpu[:-1]]
        cpu = [end - start for start, end in zip(cpu_starts, self.step_end_cpu, strict=True)]
        timed = slice(warmup, None) if len(durations) > warmup else slice(None)
        seconds, cpu_seconds = sum(durations[timed]), sum(cpu[timed])
        real, supervised, slots = sum(self.real[timed]), sum(self.supervised[timed]), sum(self.slots[timed])
        steps = sorted(self.losses)
        trainer = self.trainer
        return {
            "steps": len(durations),
            "timed_steps": len(durations[timed]),
            "step_s": [round(d, 4) for d in durations],
            "median_step_s": round(statistics.median(durations[timed]), 4) if durations else None,
            "step_cpu_s": [round(c, 4) for c in cpu],
            "median_step_cpu_s": round(statistics.median(cpu[timed]), 4) if cpu else None,
            "real_tokens_per_cpu_s": round(real / cpu_seconds, 2) if cpu_seconds else 0.0,
            "supervised_tokens_per_cpu_s": round(supervised / cpu_seconds, 2) if cpu_seconds else 0.0,
            "real_tokens_per_s": round(real / seconds, 2) if seconds else 0.0,
            "supervised_tokens_per_s": round(supervised / seconds, 2) if seconds else 0.0,
            "real_tokens_per_step": round(real / max(len(durations[timed]), 1), 1),
            "padding_efficiency": round(real / slots, 4) if slots else None,
            "rows_per_step": round(sum(self.rows[timed]) / max(len(durations[timed]), 1), 2),
            "real_tokens_all_steps": sum(self.real),
            "supervised_tokens_all_steps": sum(self.supervised),
            "real_per_step": self.real,
            "supervised_per_step": self.supervised,
            "losses": [self.losses[s] for s in steps],
            "final_loss": self.losses[steps[-1]] if steps else None,
            "optim": str(trainer.args.optim) if trainer is not None else None,
            "attn_implementation": _attn(trainer.model) if trainer is not None else None,
            "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
            if trainer is not None else None,
            "rss_at_train_begin_mb": round(self.rss_at_train_begin, 1),
            "gpu_allocated_at_train_begin_mb": round(self.gpu_at_train_begin, 1),
        }


def same_order_for_every_tool() -> None:
    """Every tool reads the training samples in the order of its data file (transformers' ``sequential`` sampler
    instead of ``random``), so step n of every tool sees the same 8 samples: with a few timed steps, different
    random batches would weigh more than the tools do. The bench writes the file already shuffled (and tunelab,
    which shuffles its training split itself, a copy arranged so that its shuffle gives that same order)."""
    from transformers import TrainingArguments

    original = TrainingArguments.__post_init__

    def post_init(self: Any) -> None:
        original(self)
        if self.train_sampling_strategy == "random":
            self.train_sampling_strategy = "sequential"

    TrainingArguments.__post_init__ = post_init  # type: ignore[method-assign]


def _attn(model: Any) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) if config is not None else None


def versions() -> dict[str, str]:
    found = {}
    for name in ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "llamafactory", "tunelab"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    return found


# ---- the three tools -------------------------------------------------------------------------------------------


def run_tunelab(args: argparse.Namespace, work: Path, out: Path) -> None:
    from tunelab.config.load import load_config
    from tunelab.train.run import run_training

    batching, dtype, settings = TUNELAB_MODES[args.mode]
    if args.device == "cuda":  # every tool trains a bf16 model on the GPU (LLaMA-Factory's bf16=True)
        dtype = "bf16"
    overrides = [
        f"model.name_or_path={work / 'model'}", f"model.dtype={dtype}",
        f"data.datasets=[{{path: '{work / 'data-tunelab-order.jsonl'}'}}]", "data.seed=0", "data.template=chatml",
        f"data.cutoff_len={args.cutoff}", f"data.batching={batching}",
        f"data.cache_dir={work / 'tunelab-cache'}", f"method.name={args.method}", "method.lora.rank=8",
        "method.lora.alpha=16", "method.lora.dropout=0.0", "method.lora.target_modules=all-linear",
        f"train.output_dir={out / 'output'}", f"train.max_steps={args.steps}",
        f"train.per_device_train_batch_size={args.batch}", "train.gradient_accumulation_steps=1",
        "train.logging_steps=1", "train.save_steps=100000", "train.report_to=none",
        "train.lr_scheduler_type=constant", "train.warmup_ratio=0.0", f"train.learning_rate={args.lr}",
        f"train.seed={args.seed}", *settings,
        # extra tunelab settings for an A/B run by hand, e.g. TUNELAB_BENCH_OVERRIDES="train.lean_activations=false"
        *os.environ.get("TUNELAB_BENCH_OVERRIDES", "").split(),
    ]
    run_training(load_config(None, overrides))


# tunelab's rows: mode -> (data.batching, model.dtype on a CPU, the settings that differ from tunelab's defaults).
# The one-setting variants are A/B rows: memory (checkpointing, glibc's malloc) and host-bound GPU steps.
TUNELAB_MODES: dict[str, tuple[str, str, list[str]]] = {
    "padding_free": ("padding_free", "fp32", []),
    "padded": ("padded", "fp32", []),
    "packed": ("packed", "fp32", []),
    "packed_gc": ("packed", "fp32", ["train.gradient_checkpointing=true"]),
    "padding_free_bf16": ("padding_free", "bf16", []),
    "padding_free_gc": ("padding_free", "fp32", ["train.gradient_checkpointing=true"]),
    "padding_free_glibc": ("padding_free", "fp32", ["train.cpu_allocator=system"]),
    "padding_free_mimalloc": ("padding_free", "fp32", ["train.cpu_allocator=mimalloc"]),
    "padding_free_nolean": ("padding_free", "fp32", ["train.lean_activations=false"]),
    "padding_free_nolong": ("padding_free", "fp32", ["train.checkpoint_long_batches=false"]),
    "padding_free_compile": ("padding_free", "fp32", ["train.torch_compile=true"]),
}


def tunelab_allocator(mode: str) -> str:
    """The train.cpu_allocator of a tunelab mode (the runner preloads it as `tunelab train` would)."""
    settings = TUNELAB_MODES[mode][2]
    return next((item.split("=", 1)[1] for item in settings if item.startswith("train.cpu_allocator=")), "auto")


def run_trl(args: argparse.Namespace, work: Path, out: Path) -> None:
    import datasets
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    tokenizer.chat_template = CHATML_WITH_GENERATION
    dataset = datasets.load_dataset("json", data_files=str(work / "data.jsonl"), split="train")
    common = dict(
        output_dir=str(out / "output"), max_steps=args.steps, per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
        logging_steps=1, save_strategy="no", report_to="none", seed=args.seed, bf16=args.device == "cuda", fp16=False,
        use_cpu=args.device == "cpu", disable_tqdm=True, assistant_only_loss=True, dataloader_num_workers=0,
        # SFTConfig turns gradient checkpointing on by default (unlike TrainingArguments); the *_nogc modes turn it off.
        gradient_checkpointing=not args.mode.endswith("_nogc"),
    )
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype="float32")
    if args.mode in ("padding_free", "padding_free_nogc"):
        # TRL enforces max_length only by packing; for padding-free batches of whole samples it asks for inputs
        # already truncated. TRL's own preparation (chat template, assistant mask, truncation to max_length) makes
        # them, exactly as in its default mode, outside the timed steps.
        prep = SFTTrainer(model=model, args=SFTConfig(**common, max_length=args.cutoff), train_dataset=dataset,
                          processing_class=tokenizer)
        dataset = prep.train_dataset
        del prep
        config = SFTConfig(**common, max_length=None, padding_free=True)
    elif args.mode == "packing":
        config = SFTConfig(**common, max_length=args.cutoff, packing=True, packing_strategy="bfd")
    else:
        config = SFTConfig(**common, max_length=args.cutoff)
    peft_config = (LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                              task_type="CAUSAL_LM") if args.method == "lora" else None)
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config)
    trainer.train()


def run_llamafactory(args: argparse.Namespace, work: Path, out: Path) -> None:
    from llamafactory.train.tuner import run_exp

    config: dict[str, Any] = dict(
        stage="sft", do_train=True, model_name_or_path=str(work / "model"), trust_remote_code=False,
        dataset="bench_peers", dataset_dir=str(work / "llamafactory-data"), template="chatml",
        cutoff_len=args.cutoff, overwrite_cache=True, preprocessing_num_workers=None,
        finetuning_type=args.method, output_dir=str(out / "output"), overwrite_output_dir=True,
        per_device_train_batch_size=args.batch, gradient_accumulation_steps=1, learning_rate=args.lr,
        lr_scheduler_type="constant", warmup_steps=0, max_steps=args.steps, logging_steps=1,
        save_strategy="no", report_to="none", seed=args.seed, bf16=args.device == "cuda", fp16=False,
        plot_loss=False, disable_tqdm=True, dataloader_num_workers=0,
    )
    if args.method == "lora":
        config.update(lora_rank=8, lora_alpha=16, lora_dropout=0.0, lora_target="all")
    if args.mode.startswith("neat_packing"):
        config.update(packing=True, neat_packing=True)
    elif args.mode.startswith("packing"):
        config.update(packing=True)
    if args.mode.endswith("_nogc"):  # LLaMA-Factory checkpoints activations unless told not to
        config.update(disable_gradient_checkpointing=True)
    run_exp(args=config)


TOOLS = {"tunelab": run_tunelab, "trl": run_trl, "llamafactory": run_llamafactory}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tool", choices=sorted(TOOLS), required=True)
    parser.add_argument("--mode", required=True)
    parser.add_argument("--method", choices=["lora", "full"], required=True)
    parser.add_argument("--work", required=True, help="folder with model/, data.jsonl and llamafactory-data/")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--cutoff", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: bf16 on the GPU, peak GPU memory recorded")
    args = parser.parse_args()
    if args.tool == "tunelab":  # what `tunelab train` does first, before torch is imported
        from tunelab.train.allocator import reexec_with_allocator

        reexec_with_allocator(tunelab_allocator(args.mode))
    work, out = Path(args.work).resolve(), Path(args.run_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    pad_id = json.loads((work / "model" / "config.json").read_text())["pad_token_id"]
    meter = Meter(pad_id, synchronize=cuda_synchronize if args.device == "cuda" else None)
    meter.install()
    if args.mode not in PACKING_MODES:  # packed rows come in the tool's own packing order, shuffled as it does
        same_order_for_every_tool()
    started = time.perf_counter()
    TOOLS[args.tool](args, work, out)
    result = {
        "tool": args.tool, "mode": args.mode, "method": args.method, **meter.report(args.warmup),
        "wall_s": round(time.perf_counter() - started, 2), "peak_rss_mb": round(vm_hwm_mb(), 1),
        "peak_rss_children_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
        "versions": versions(), "python": sys.version.split()[0], "torch_threads": _threads(),
        "pid": os.getpid(), "allocator": mapped_allocator(), "device": args.device, **gpu_memory(args.device),
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print("RESULT " + json.dumps(result))


def mapped_allocator() -> str:
    """The malloc library mapped into this process (however it was preloaded), else glibc's. The same reading as
    ``tunelab.train.allocator.allocator_in_use``, written again because the peers' environments lack tunelab."""
    maps = Path("/proc/self/maps").read_text() if Path("/proc/self/maps").exists() else ""
    names = {Path(line.split()[-1]).name for line in maps.splitlines() if "/" in line}
    return next((n for n in ("jemalloc", "mimalloc", "tcmalloc") if any(m.startswith(f"lib{n}") for m in names)),
                "glibc")


def cuda_synchronize() -> None:
    import torch

    torch.cuda.synchronize()


def gpu_memory(device: str) -> dict[str, Any]:
    """Peak GPU memory of the whole run (model, optimizer state and activations) and the GPU's name."""
    if device != "cuda":
        return {}
    import torch

    return {"gpu": torch.cuda.get_device_name(0),
            "peak_gpu_allocated_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1),
            "peak_gpu_reserved_mb": round(torch.cuda.max_memory_reserved() / 2**20, 1)}


def _threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
