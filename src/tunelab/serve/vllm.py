"""``tunelab serve --engine vllm``: the same command line, served by vLLM's OpenAI server.

tunelab's own engine batches continuously too, but pads its rows to a common length in a contiguous KV cache and
runs eager PyTorch; vLLM pages the KV cache (PagedAttention), captures CUDA graphs and has fused kernels. Choose
it on a CUDA machine for many concurrent clients or long contexts. tunelab's part is the translation: flags to vLLM's,
adapters to ``--lora-modules``, and a run's tunelab template to a ``--chat-template`` file, so vLLM prompts the
model exactly as it was trained.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from tunelab.errors import ConfigError, RunError
from tunelab.evaluate.generate import eval_columns, run_template_settings

VLLM_DTYPES = {"auto": "auto", "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
VLLM_MODULE = "vllm.entrypoints.openai.api_server"
NOT_IN_VLLM = {"max_queue": "--max-queue", "max_request_bytes": "--max-request-bytes",
               "max_tokens_limit": "--max-tokens-limit", "max_batch_size": "--max-batch-size"}


def check_vllm() -> None:
    """Fail with what is needed when vLLM cannot run here."""
    import torch

    if importlib.util.find_spec("vllm") is None:
        raise RunError("--engine vllm: vLLM is not installed. It needs Linux and a CUDA GPU: pip install vllm "
                       "(or use the default --engine tunelab, which runs anywhere, CPU included)")
    if not torch.cuda.is_available():
        raise RunError("--engine vllm: no CUDA GPU is visible; vLLM needs one (use --engine tunelab on CPU)")


def vllm_command(args: argparse.Namespace, api_key: str | None, chat_template: Path | None) -> list[str]:
    """The vLLM server command line equivalent to a ``tunelab serve`` one."""
    if args.port == 0:
        raise ConfigError("--port: vLLM needs an explicit port (0 is only for --engine tunelab)")
    command = [sys.executable, "-m", VLLM_MODULE, "--model", args.model, "--host", args.host, "--port",
               str(args.port), "--dtype", VLLM_DTYPES[args.dtype], "--max-num-seqs", str(args.max_concurrency)]
    if args.served_model_name:
        command += ["--served-model-name", args.served_model_name]
    if api_key is not None:
        command += ["--api-key", api_key]
    columns = eval_columns(args.adapter, base=False) if args.adapter else []
    if columns:
        ranks = [json.loads((c.adapter / "adapter_config.json").read_text("utf-8")).get("r", 8)
                 for c in columns if c.adapter is not None]
        command += ["--enable-lora", "--max-lora-rank", str(_vllm_rank(max(ranks))), "--lora-modules",
                    *(f"{c.name}={c.adapter}" for c in columns)]
    if chat_template is not None:
        command += ["--chat-template", str(chat_template)]
    return command


def _vllm_rank(rank: int) -> int:
    """vLLM accepts only some LoRA ranks for --max-lora-rank: the smallest that holds ``rank``."""
    return next((r for r in (8, 16, 32, 64, 128, 256, 320, 512) if r >= rank), rank)


def chat_template_file(args: argparse.Namespace) -> tuple[Path | None, str]:
    """A Jinja file for the template the run trained with (``None`` when the tokenizer's own is right)."""
    from tunelab.config.schema import ModelConfig
    from tunelab.data.template import StringTemplate, build_template
    from tunelab.export.chat_template import install_chat_template
    from tunelab.models.load import load_tokenizer

    folders = [c.adapter for c in eval_columns(args.adapter, base=False)] if args.adapter else []
    folders.append(Path(args.model) if Path(args.model).is_dir() else None)
    settings = {run_template_settings(folder) for folder in folders if folder is not None} - {(None, None)}
    if args.template is None and len(settings) > 1:
        raise ConfigError("--engine vllm: the adapters were trained with different templates and vLLM uses one "
                          "chat template for all; pass --template, or serve them with --engine tunelab")
    name, custom = (args.template, None) if args.template is not None else next(iter(settings), (None, None))
    tokenizer = load_tokenizer(ModelConfig(name_or_path=args.model))
    template = build_template(name, tokenizer, custom)
    if not isinstance(template, StringTemplate):
        return None, "the tokenizer's own chat template"
    install_chat_template(template, tokenizer)
    path = Path(tempfile.mkdtemp(prefix="tunelab-vllm-")) / f"{template.name}.jinja"
    path.write_text(tokenizer.chat_template, "utf-8")
    return path, f"tunelab template {template.name!r} ({path})"


def run_vllm(args: argparse.Namespace, api_key: str | None, console: Any) -> int:
    check_vllm()
    ignored = [flag for field, flag in NOT_IN_VLLM.items() if getattr(args, field) != _default(field)]
    if ignored:
        console.print(f"note: vLLM has no equivalent of {', '.join(ignored)}; not enforced", markup=False)
    template, described = chat_template_file(args)
    command = vllm_command(args, api_key, template)
    shown = [("***" if i and command[i - 1] == "--api-key" else part) for i, part in enumerate(command)]
    console.print(f"chat template: {described}\nhanding over to vLLM: {' '.join(shown)}", markup=False)
    sys.stdout.flush()
    os.execv(sys.executable, command)
    return 0  # not reached


def _default(field: str) -> Any:
    from tunelab.cli import build_parser

    parser = build_parser()
    return parser.parse_args(["serve", "--model", "x"]).__dict__[field]
