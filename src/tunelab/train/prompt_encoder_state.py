"""The whole prompt encoder of a prompt-learning adapter in each checkpoint, for an exact resume.

peft's adapter file keeps what inference needs: for P-tuning only the encoder's output (the virtual tokens'
embeddings), not the MLP or LSTM that computes it, nor its input embedding. A run resumed from that file would
restart the encoder from its initial weights while the optimizer state carries on: the losses drift from the
uninterrupted run's. So each checkpoint also holds the encoder's trainable tensors, and a resume copies them back
after the Trainer has loaded the adapter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tunelab.errors import RunError

PROMPT_ENCODER_FILE = "prompt_encoder.safetensors"


def prompt_encoder_tensors(model: Any) -> dict[str, torch.Tensor]:
    """The trainable tensors of the model's prompt encoders (empty for any other model)."""
    return {name: param for name, param in model.named_parameters()
            if param.requires_grad and ".prompt_encoder." in f".{name}"}


def save_prompt_encoder(model: Any, folder: str | Path) -> None:
    from safetensors.torch import save_file

    tensors = prompt_encoder_tensors(model)
    if tensors:
        save_file({name: t.detach().contiguous().cpu() for name, t in tensors.items()},
                  str(Path(folder) / PROMPT_ENCODER_FILE))


def load_prompt_encoder(model: Any, folder: str | Path) -> None:
    """Copy a checkpoint's encoder tensors into ``model``; nothing when it has none (not a prompt-learning run, or
    written before this file existed)."""
    from safetensors.torch import load_file

    path = Path(folder) / PROMPT_ENCODER_FILE
    tensors = prompt_encoder_tensors(model)
    if not tensors or not path.is_file():
        return
    saved = load_file(str(path))
    if set(saved) != set(tensors):
        raise RunError(f"{path}: its tensors {sorted(saved)[:3]} do not match this run's prompt encoder "
                       f"{sorted(tensors)[:3]}; resume with the method settings the checkpoint was written with")
    with torch.no_grad():
        for name, param in tensors.items():
            param.copy_(saved[name].to(param.device, param.dtype))
