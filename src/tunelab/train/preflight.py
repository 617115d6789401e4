"""Checks of the ``train`` section that depend on this machine (a GPU, a package, a compiler).

The schema cannot know the machine, so these run at the start of ``run_training``, before any model loads, and
report every problem at once.
"""

from __future__ import annotations

from typing import Literal

import torch

from tunelab.config.schema import TrainConfig, TunelabConfig
from tunelab.errors import ConfigError

Needs = Literal["torch", "bitsandbytes", "bitsandbytes+cuda", "torchao"]

# What each ``train.optim`` choice needs beyond torch (a test keeps the keys equal to the schema's choices).
# Paged optimizers move their state through CUDA unified memory, so they need a GPU even with bitsandbytes' CPU
# backend; the other bitsandbytes optimizers run on either.
OPTIMIZER_NEEDS: dict[str, Needs] = {
    "adamw_torch_fused": "torch",
    "adamw_torch": "torch",
    "adafactor": "torch",
    "sgd": "torch",
    "adagrad": "torch",
    "rmsprop": "torch",
    "adamw_bnb_8bit": "bitsandbytes",
    "lion_8bit": "bitsandbytes",
    "lion_32bit": "bitsandbytes",
    "ademamix": "bitsandbytes",
    "ademamix_8bit": "bitsandbytes",
    "paged_adamw_8bit": "bitsandbytes+cuda",
    "paged_adamw_32bit": "bitsandbytes+cuda",
    "paged_lion_8bit": "bitsandbytes+cuda",
    "paged_lion_32bit": "bitsandbytes+cuda",
    "paged_ademamix_8bit": "bitsandbytes+cuda",
    "paged_ademamix_32bit": "bitsandbytes+cuda",
    # torchao's AdamW with 8- or 4-bit state: compiled updates, without bitsandbytes' device synchronisation after
    # every tensor (434 a step for a 3B model: bench/RESULTS.md, GPU pass 5)
    "adamw_torch_8bit": "torchao",
    "adamw_torch_4bit": "torchao",
}


def check_train_machine(config: TunelabConfig) -> None:
    """Raise one ConfigError naming every ``train`` field this machine cannot honour."""
    problems = [p for p in (optimizer_problem(config.train.optim), offload_problem(config.train.activation_offload),
                            compile_setting_problem(config), liger_setting_problem(config.train)) if p]
    if problems:
        raise ConfigError("\n".join(problems))


def optimizer_problem(optim: str) -> str:
    needs = OPTIMIZER_NEEDS[optim]
    if needs == "torch":
        return ""
    if needs == "torchao":
        return torchao_problem(optim)
    try:
        import bitsandbytes  # noqa: F401  (imported, not just found: a broken install fails here, not mid-run)
    except Exception as exc:
        return (f"train.optim: {optim} needs bitsandbytes, with a CUDA GPU or bitsandbytes' CPU backend (pip install "
                f"'tunelab[gpu]'); importing it failed ({type(exc).__name__}: {exc}). "
                "Use train.optim=adamw_torch_fused or adafactor (less optimizer memory) instead")
    if needs == "bitsandbytes+cuda" and not torch.cuda.is_available():
        return (f"train.optim: {optim} pages optimizer state through CUDA unified memory and needs a CUDA GPU; "
                "on this machine use one without paged_ (adamw_bnb_8bit, lion_8bit, ...) or adamw_torch_fused")
    return ""


def torchao_problem(optim: str) -> str:
    from tunelab.train.compile import compile_problem

    try:
        import torchao.optim  # noqa: F401
    except Exception as exc:
        return (f"train.optim: {optim} needs torchao (pip install 'tunelab[gpu]'); importing it failed "
                f"({type(exc).__name__}: {exc}). Use adamw_bnb_8bit or adamw_torch_fused instead")
    problem = compile_problem("inductor")  # torchao compiles each update with torch.compile
    if problem:
        return f"train.optim: {optim} compiles its updates with torch.compile, which cannot run here: {problem}"
    return ""


def offload_problem(activation_offload: bool) -> str:
    if activation_offload and not torch.cuda.is_available():
        return ("train.activation_offload: needs a CUDA GPU (it moves saved activations from GPU memory to CPU "
                "memory) and there is none here; on a CPU they are in CPU memory already: set it to false, and use "
                "train.gradient_checkpointing=true to store fewer of them")
    return ""


def compile_setting_problem(config: TunelabConfig) -> str:
    from tunelab.train.compile import compile_problem

    train = config.train
    if not train.torch_compile:
        return ""
    if config.method.name == "hybrid":
        return ("train.torch_compile: not supported with method.name=hybrid yet (its LoRA phase changes the compiled "
                "layers mid-run); set train.torch_compile=false")
    problem = compile_problem(train.torch_compile_backend)
    if problem:
        return (f"train.torch_compile: {problem}. Set train.torch_compile=false, or train.torch_compile_backend="
                "aot_eager to check compilation without a compiler (no speed-up)")
    return ""


def liger_setting_problem(train: TrainConfig) -> str:
    from tunelab.models.liger import liger_problem

    if not train.liger_kernel:
        return ""
    if train.torch_compile:
        # Measured on an H200 (bench/RESULTS.md, GPU pass 3): dynamo cannot trace Liger's Triton kernels (thousands
        # of warnings, a 3B full fine-tuning run failed in its RMSNorm), and where it ran it was slower than
        # torch.compile alone (38.0% vs 40.6% MFU, Llama-3-8B shape, LoRA).
        return ("train.liger_kernel: cannot be combined with train.torch_compile (torch.compile does not trace "
                "Liger's Triton kernels). Use one: train.torch_compile=true fuses the same steps and was faster on an "
                "H200 (40.6% vs 32.2% MFU, Llama-3-8B LoRA); train.liger_kernel=true needs no compile time")
    return liger_problem()
