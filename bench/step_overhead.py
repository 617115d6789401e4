"""Host-side cost of one training step, where arithmetic is negligible: the regime of short steps on a GPU.

On an H100, a 1.5B LoRA step of 1,526 tokens (the GPU peer bench, bench/RESULTS.md "GPU pass 4") held ~10 TFLOP
of math yet took 310 ms: the GPU waited on Python, dispatch and kernel launches. This measures that part on a CPU,
with a model of the same depth (28 Qwen2 layers) but tiny width (hidden 64), so a step's time is almost all
per-operation overhead. Two numbers per setting, for one forward + backward of the training loss:

- aten operations dispatched (a ``TorchDispatchMode`` count): device-independent; view operations (no kernel on a
  GPU) are counted apart from the rest (about one kernel launch each on a GPU);
- CPU-seconds (one thread), median of ``--steps`` steps, settings alternating so that drift hits all.

It also times the walks over the model that transformers' Trainer makes at every step (the parameter count behind
``total_flos``, ``zero_grad``, gradient clipping over every parameter), which tunelab's Trainer replaces by kept
values where it can.

Settings: tunelab's lean loss with ``train.lean_activations`` on (the default) and off, and transformers + peft's own
forward with the model's loss over a padded batch (what a plain Trainer runs). The same 8 samples in each, LoRA r8 on
all linear layers, dropout 0. On a CPU the padding-free attention runs one SDPA call per sample (on CUDA one varlen
kernel per layer), so tunelab's attention counts here are higher than on a GPU.

    python bench/step_overhead.py [--dtype fp32|bf16] [--steps 20] [--layers 28]
"""

from __future__ import annotations

import argparse
import collections
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Tokens per sample: short, so that a step's CPU time is per-operation overhead rather than arithmetic (the operation
# count does not depend on the lengths).
LENGTHS = [12, 30, 9, 20, 15, 40, 13, 22]
VIEW_OPS = {"view", "_unsafe_view", "t", "transpose", "detach", "slice", "expand", "alias", "as_strided", "unsqueeze",
            "squeeze", "permute", "select", "unbind", "split", "reshape", "_reshape_alias", "split_with_sizes"}


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def build(folder: Path, layers: int) -> Path:
    from importlib import resources

    from tunelab.demo.tiny import build_tiny_model, train_tokenizer

    corpus = Path(str(resources.files("tunelab.resources").joinpath("demo_corpus.txt"))).read_text("utf-8")
    tokenizer = train_tokenizer(corpus.splitlines(), vocab_size=2000)
    model = build_tiny_model(tokenizer, max_positions=1024, hidden_size=64, num_layers=layers, num_heads=4,
                             num_kv_heads=2, intermediate_size=128)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def settings(folder: Path, dtype: str, out: str) -> dict[str, Any]:
    """name -> a callable that runs one forward + backward of that setting's training loss."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, TrainingArguments

    from tunelab.config.schema import MethodConfig, ModelConfig
    from tunelab.data.packing import FlatCollator, plan_batching
    from tunelab.models.lean_activations import apply_lean_activations
    from tunelab.models.load import load_model
    from tunelab.models.methods import apply_method, keep_trainable_fp32
    from tunelab.train.loss import supervised_lm_loss
    from tunelab.train.trainer import TunelabTrainer

    generator = torch.Generator().manual_seed(0)
    samples = [torch.randint(3, 2000, (n,), generator=generator).tolist() for n in LENGTHS]
    flat = FlatCollator()([{"input_ids": ids, "labels": ids} for ids in samples])
    longest = max(LENGTHS)
    padded_ids = torch.tensor([ids + [0] * (longest - len(ids)) for ids in samples])
    past_end = torch.arange(longest) >= torch.tensor(LENGTHS)[:, None]
    padded = {"input_ids": padded_ids, "attention_mask": (~past_end).long(),
              "labels": padded_ids.masked_fill(past_end, -100)}
    args = TrainingArguments(output_dir=out, use_cpu=True, report_to="none", bf16=dtype == "bf16")
    runs = {}
    for name, lean in (("tunelab, lean activations on (default)", True), ("tunelab, lean activations off", False)):
        model = keep_trainable_fp32(apply_method(load_model(ModelConfig(name_or_path=str(folder), dtype=dtype)),
                                                 MethodConfig(name="lora", lora={"dropout": 0.0})))
        plan_batching("padding_free", model, 1024)
        if lean:
            apply_lean_activations(model)
        model.train()
        trainer = TunelabTrainer(model=model, args=args, loss_fn=supervised_lm_loss)
        runs[name] = (lambda trainer=trainer, model=model: trainer.compute_loss(model, dict(flat)).backward())
    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    plain = get_peft_model(plain, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    plain.train()

    def plain_step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss = plain(**padded, use_cache=False).loss
        loss.backward()

    runs["transformers + peft, padded, model's own loss"] = plain_step
    return runs


def trainer_walks(folder: Path, repeats: int = 50) -> dict[str, float]:
    """Milliseconds per call of the per-step walks over a LoRA model's module tree (frozen tensors included)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(folder), LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    for parameter in trainable:
        parameter.grad = torch.zeros_like(parameter)

    def per_call(work: Any) -> float:
        work()
        start = time.process_time()
        for _ in range(repeats):
            work()
        return round(1000 * (time.process_time() - start) / repeats, 2)

    return {"tensors": len(list(model.parameters())),
            "parameter count (total_flos)": per_call(lambda: model.num_parameters(exclude_embeddings=True)),
            "clip over every parameter": per_call(lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)),
            "clip over the kept trainable list": per_call(lambda: torch.nn.utils.clip_grad_norm_(trainable, 1e9)),
            "zero_grad": per_call(lambda: model.zero_grad(set_to_none=False))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--layers", type=int, default=28)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = build(Path(tmp) / "model", args.layers)
        walks = trainer_walks(folder)
        runs = settings(folder, args.dtype, tmp)
        ops: dict[str, collections.Counter[str]] = {}
        for name, step in runs.items():
            step()  # warm-up
            with OpCounter() as counter:
                step()
            ops[name] = counter.ops
        seconds: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.steps):
            for name, step in runs.items():  # A B C A B C …
                start = time.process_time()
                step()
                seconds[name].append(time.process_time() - start)
    print(f"{args.layers} Qwen2 layers, hidden 64, LoRA r8 all-linear, {args.dtype}, 8 samples ({sum(LENGTHS)} "
          f"tokens), torch {torch.__version__}, 1 thread; median of {args.steps} steps")
    print("| setting | aten ops / step | of which views | CPU ms / step |")
    print("|---|---:|---:|---:|")
    for name in runs:
        total = sum(ops[name].values())
        views = sum(count for op, count in ops[name].items() if op in VIEW_OPS)
        print(f"| {name} | {total:,} | {views:,} | {1000 * statistics.median(seconds[name]):.1f} |")
    print(f"\nWalks over the LoRA model ({walks.pop('tensors')} tensors), CPU ms per call:")
    for name, ms in walks.items():
        print(f"- {name}: {ms}")


if __name__ == "__main__":
    main()
