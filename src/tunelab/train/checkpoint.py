"""Where a run writes, and which checkpoint a resume continues from."""

from __future__ import annotations

import re
from pathlib import Path

from tunelab.config.schema import TrainConfig
from tunelab.errors import RunError

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")


def is_complete(checkpoint: Path) -> bool:
    """Trainer writes trainer_state.json after weights, optimizer and RNG states: its presence marks completion."""
    return (checkpoint / "trainer_state.json").is_file() and any((checkpoint / f).is_file() for f in WEIGHT_FILES)


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = []
    if output_dir.is_dir():
        for child in output_dir.iterdir():
            match = CHECKPOINT_PATTERN.match(child.name)
            if match and child.is_dir() and is_complete(child):
                found.append((int(match.group(1)), child))
    return max(found)[1] if found else None


def resolve_resume(config: TrainConfig, check_empty: bool = True) -> Path | None:
    """The checkpoint to resume from, or ``None`` for a fresh run; refuses to overwrite a used output_dir."""
    output_dir = config.output_path
    if config.resume is False:
        if check_empty and output_dir.exists() and any(output_dir.iterdir()):
            raise RunError(
                f"train.output_dir {output_dir} is not empty; pass train.resume=true to continue its latest "
                "checkpoint, or choose another train.output_dir"
            )
        return None
    if config.resume is True:
        checkpoint = latest_checkpoint(output_dir)
        if checkpoint is None:
            raise RunError(f"train.resume: no complete checkpoint-N folder in {output_dir} to resume from")
        return checkpoint
    checkpoint = Path(config.resume)
    if not is_complete(checkpoint):
        raise RunError(f"train.resume: {checkpoint} is not a complete checkpoint (no trainer_state.json or weights)")
    return checkpoint
