"""``train.torch_compile``: every decoder layer compiled in place; the padding-free attention stays eager.

Why not transformers' ``TrainingArguments(torch_compile=True)``: accelerate then wraps the whole model in
torch.compile's ``OptimizedModule`` and hands the trainer that wrapper, so the lean loss (which runs the decoder
body and the LM head itself, and only on the model the trainer owns) falls back to the model's own full-logit
loss; saving and adapters then have to see through ``_orig_mod``.

Why per layer ("regional compilation": PyTorch's recipe for cold-start time, accelerate's
``use_regional_compilation``): the layers run the same code, so one compiled graph serves all of them — the
compile time of one layer, not of the whole model. ``nn.Module.compile`` works in place, so parameter names, state
dicts, checkpoints and peft adapters stay exactly those of the eager model. Embeddings, the final norm and the loss
stay eager.

The padding-free attention (``tunelab_varlen_sdpa``) runs between the graphs (``torch.compiler.disable``): it reads
each row's sample boundaries as Python numbers, which a graph would specialise on and recompile for at every step.
Token counts change at every step too: dynamo marks them dynamic at the first recompile (step 2), and the graphs
are reused from then on. The time this takes is reported as ``compile_s`` (see ``StepTimerCallback``).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch


def compile_problem(backend: str) -> str:
    """Why ``backend`` cannot compile on this machine ("" when it can): inductor needs Triton on a GPU and a C++
    compiler on a CPU. Asks inductor itself how it finds its compiler (``CXX``, then g++), not a guess of ours."""
    if backend != "inductor":
        return ""
    if torch.cuda.is_available():
        return "" if importlib.util.find_spec("triton") else "inductor on a GPU needs triton (pip install triton)"
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as exc:  # any failure means inductor cannot build CPU kernels here; the message names it
        return f"inductor on a CPU needs a C++ compiler (g++ or clang++ on PATH, or $CXX): {type(exc).__name__}: {exc}"
    return ""


def compile_layers(model: Any, backend: str) -> list[torch.nn.Module]:
    """Compile each decoder layer of ``model`` in place (the whole decoder body when it has no ``layers`` list);
    returns the compiled modules, for :func:`uncompile`."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = inner.get_decoder() if hasattr(inner, "get_decoder") else inner
    layers = getattr(body, "layers", None)
    modules = list(layers) if isinstance(layers, torch.nn.ModuleList) and len(layers) else [body]
    for module in modules:
        module.compile(backend=backend)
    return modules


def uncompile(modules: list[torch.nn.Module]) -> None:
    """Back to eager calls (after training: generation would otherwise recompile for every new cache shape).

    ``nn.Module.compile`` stores the compiled call as the instance attribute ``_compiled_call_impl`` and torch has
    no public inverse; removing it restores the class default (``None``: the eager call).
    """
    for module in modules:
        module.__dict__.pop("_compiled_call_impl", None)
