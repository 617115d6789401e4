"""Load tokenizers and causal LMs the way users' real models load: ``from_pretrained`` on a hub id or folder."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunelab.config.schema import ModelConfig
from tunelab.errors import ConfigError, ModelError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Precision:
    dtype: str
    """fp32, fp16 or bf16."""
    reason: str
    """Why, in words: printed at the start of a run and stored in summary.json."""


def choose_precision(name: str, *, training: bool = False) -> Precision:
    """``model.dtype`` for this machine. ``auto``: on a GPU bf16 where it runs natively, else fp16 on tensor cores
    (compute capability 7+), else fp32; in training on a CPU, bf16 autocast where the processor computes bf16
    natively (AMX or AVX512_BF16), else fp32.

    Evaluation, chat and serving on a CPU (``training=False``) stay fp32 under ``auto``: bf16 weights would change
    the generated answers with the processor they run on, and those are compared against fp32 references.
    fp16 needs CUDA (its loss scaling is CUDA-only).
    """
    if name == "fp16" and not torch.cuda.is_available():
        raise ConfigError("model.dtype: fp16 training needs a CUDA GPU; on CPU use fp32 or bf16")
    if name != "auto":
        return Precision(name, "set by model.dtype")
    if torch.cuda.is_available():
        return _gpu_precision()
    if not training:
        return Precision("fp32", "auto on a CPU outside training: fp32")
    feature = native_cpu_bf16()
    if feature:
        return Precision("bf16", f"auto: this CPU computes bf16 natively ({feature}); bf16 autocast, trained "
                                 "weights kept in fp32")
    return Precision("fp32", "auto: this CPU has no native bf16 (AMX or AVX512_BF16), so bf16 would be emulated "
                             "and slower than fp32")


def _gpu_precision() -> Precision:
    name = torch.cuda.get_device_name(0)
    try:  # without emulation: torch counts an emulated (slow) bf16 on pre-Ampere GPUs as supported by default
        bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch < 2.3 has no such argument and counts native support only
        bf16 = torch.cuda.is_bf16_supported()
    if bf16:
        return Precision("bf16", f"auto: {name} computes bf16 natively")
    if torch.cuda.get_device_capability(0)[0] >= 7:
        return Precision("fp16", f"auto: {name} has no native bf16; fp16 on its tensor cores, with loss scaling")
    return Precision("fp32", f"auto: {name} has neither bf16 nor fp16 tensor cores")


def native_cpu_bf16() -> str:
    """The CPU feature that computes bf16 natively ("AMX", "AVX512_BF16"), or "" when bf16 would be emulated.

    ``torch.backends.cpu.get_cpu_capability()`` cannot tell (it says "AVX512" with or without bf16), so this asks
    torch's cpuinfo probes, or reads the kernel's CPU flags where this torch has no probes.
    """
    probes = (("AMX", "_is_amx_tile_supported"), ("AVX512_BF16", "_is_avx512_bf16_supported"))
    if all(hasattr(torch.cpu, attr) for _, attr in probes):
        return next((feature for feature, attr in probes if getattr(torch.cpu, attr)()), "")
    flags = cpu_flags()
    return next((feature for feature, flag in (("AMX", "amx_bf16"), ("AVX512_BF16", "avx512_bf16")) if flag in flags),
                "")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The ``flags`` of the first processor in ``/proc/cpuinfo`` (empty off Linux)."""
    try:
        text = cpuinfo.read_text("utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def resolve_dtype(name: str) -> str:
    """``model.dtype`` for loading a model outside training (see :func:`choose_precision`)."""
    return choose_precision(name).dtype


def load_tokenizer(config: ModelConfig) -> Any:
    from transformers import AutoTokenizer

    if not config.name_or_path:
        raise ConfigError("model.name_or_path: required (a hub id or a local folder)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(config.name_or_path, trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.name_or_path: cannot load a tokenizer from {config.name_or_path!r}: {exc}") from None
    if tokenizer.pad_token is None:
        # Padding positions are masked out of attention and loss, so reusing EOS as pad changes nothing learned.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def probe_autocast(model: Any) -> contextlib.AbstractContextManager[Any]:
    """What a probe forward of ``model`` runs under to compute as training does: autocast to its bf16/fp16 when
    trained fp32 weights sit beside frozen low-precision ones (freeze and hybrid keep trained weights in fp32, and the
    Trainer's forward runs under autocast); nothing for a model in one dtype."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    low = sorted(dtypes & {torch.bfloat16, torch.float16}, key=str)
    if not low or dtypes <= {low[0]}:
        return contextlib.nullcontext()
    return torch.autocast(next(model.parameters()).device.type, dtype=low[0])


def weight_dtype(name: str) -> torch.dtype:
    """The precision weights are loaded in. fp16 weights stay fp32: fp16 runs as autocast with HF's loss scaling."""
    dtype = resolve_dtype(name)
    return torch.float32 if dtype == "fp16" else DTYPES[dtype]


def load_model(config: ModelConfig, path: str | None = None, *, quantization: Any = None) -> Any:
    """A causal LM in the configured precision (``quantization``: a BitsAndBytesConfig for QLoRA)."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {
        "dtype": weight_dtype(config.dtype),
        "trust_remote_code": config.trust_remote_code,
    }
    if config.attn_implementation is not None:
        check_attention(config.attn_implementation)
        kwargs["attn_implementation"] = config.attn_implementation
    if config.rope_scaling is not None:
        kwargs["rope_parameters"] = rope_parameters(config)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    source = path or config.name_or_path
    try:
        return AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load a causal LM from {source!r}: {exc}") from None


def check_attention(name: str | None) -> None:
    """Fail before anything loads when the chosen attention kernel cannot run here."""
    if name == "flash_attention_2":
        import importlib.util

        if not torch.cuda.is_available():
            raise ConfigError("model.attn_implementation: flash_attention_2 needs a CUDA GPU; use sdpa or eager")
        if importlib.util.find_spec("flash_attn") is None:
            raise ConfigError(
                "model.attn_implementation: flash_attention_2 needs the flash-attn package "
                "(pip install 'tunelab[gpu]'); use sdpa otherwise"
            )


def rope_parameters(config: ModelConfig) -> dict[str, Any]:
    """The checkpoint's RoPE parameters with ``model.rope_scaling`` applied; checked before any weights load.

    Only the checkpoint's config.json is read. transformers 5 keeps RoPE settings in ``config.rope_parameters``
    (``rope_type``, ``factor``, ``rope_theta``); a model without one has no rotary embedding to scale.
    """
    from transformers import AutoConfig

    assert config.rope_scaling is not None
    try:
        model_config = AutoConfig.from_pretrained(config.name_or_path, trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.name_or_path: cannot read the config of {config.name_or_path!r}: {exc}") from None
    current = getattr(model_config.get_text_config(), "rope_parameters", None)
    if not isinstance(current, dict) or "rope_theta" not in current:
        raise ConfigError(f"model.rope_scaling: {model_config.model_type} models have no rotary position "
                          "embedding to scale; remove model.rope_scaling")
    kind = current.get("rope_type", "default")
    if kind not in ("default", config.rope_scaling.type):
        raise ConfigError(f"model.rope_scaling: this checkpoint already uses {kind!r} RoPE scaling; stacking "
                          f"{config.rope_scaling.type!r} on it is not supported")
    return {**current, "rope_type": config.rope_scaling.type, "factor": config.rope_scaling.factor}


def add_new_tokens(tokenizer: Any, tokens: list[str]) -> list[int]:
    """Add ``model.new_special_tokens`` to the tokenizer; the ids of those that were not in it already."""
    if not tokens:
        return []
    before = len(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": list(tokens)}, replace_extra_special_tokens=False)
    return [i for i in tokenizer.convert_tokens_to_ids(list(tokens)) if i >= before]


def match_vocabulary(model: Any, tokenizer: Any, seed: int = 0) -> Any:
    """Grow the embeddings (and head) to the tokenizer when it has tokens the checkpoint lacks.

    New rows start from a normal distribution with the old embeddings' mean and covariance (transformers'
    ``mean_resizing``), drawn under ``seed`` so a resumed run and evaluation get the same rows.
    """
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    return model
