"""The two training phases of ``method.name: hybrid`` (full fine-tuning, then LoRA), driven from ``run.py``.

How the switch works, and why:

* Phase 1 trains every weight with the whole run's ``max_steps``, so its learning-rate schedule is the run's
  schedule. A callback stops it after step S = round(full_fraction * max_steps) and saves ``checkpoint-S``.
* The fully tuned model is frozen (cast back to its load precision), saved once to ``hybrid-base/`` and gets
  LoRA adapters (``method.lora``). A new Trainer (same arguments) continues from ``hybrid-switch/``, a checkpoint
  folder made from ``checkpoint-S``: its trainer state (global step, log history), RNG state and learning-rate
  scheduler, plus the fresh adapters and an optimizer state without moments. So the schedule continues from the
  global step, the data order continues where phase 1 stopped, and Adam's moments restart for the adapters (the
  full model's moments belong to other parameters).
* Checkpoints after the switch hold the adapter; the frozen base they belong to is ``hybrid-base/`` next to them.
  Resuming from one loads that base and the adapter; resuming from ``checkpoint-S`` itself redoes the switch.
* The final run folder holds the adapter at its top level (like a LoRA run) and the full weights it applies to in
  ``hybrid-base/``: evaluate with ``tunelab eval --model RUN/hybrid-base --adapter RUN``.
* Under DDP every rank switches its own replica (same weights, same seeded adapters); only the main process writes
  ``hybrid-base/``, the switch checkpoint and the log entry, and the others wait for it before they resume.
"""

from __future__ import annotations

import gc
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from transformers import TrainerCallback

from tunelab.config.schema import TunelabConfig
from tunelab.models.load import weight_dtype
from tunelab.models.methods import count_parameters, keep_trainable_fp32
from tunelab.models.methods.hybrid import HYBRID_BASE_DIR, attach_lora_to_full, switch_step

BASE_DIR = HYBRID_BASE_DIR
SWITCH_DIR = "hybrid-switch"
SWITCH_EVENT = "hybrid_switch"
_COPIED_STATE = ("trainer_state.json", "rng_state*.pth", "scheduler.pt", "scaler.pt")  # rng_state_N.pth per rank


class StopAtSwitch(TrainerCallback):
    """Ends phase 1 after optimizer step S with a checkpoint; ``step`` is S once training has begun."""

    def __init__(self, full_fraction: float) -> None:
        self.full_fraction = full_fraction
        self.step: int | None = None
        self.reached = False

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.step = switch_step(self.full_fraction, state.max_steps)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step:
            self.reached = True
            control.should_save = True
            control.should_training_stop = True


def train_hybrid(
    config: TunelabConfig,
    trainer: Any,
    make_trainer: Callable[..., Any],
    resume_from: Path | None,
    console: Console,
    interrupted: Callable[[], bool],
) -> tuple[Any, dict[str, Any]]:
    """Run (or resume) both phases; returns the trainer that ran last and facts for the summary.

    ``trainer`` holds the model prepared for phase 1; ``make_trainer(model=...)`` builds another with the same
    arguments. When resuming at or after the switch, the saved weights are loaded into that same model object
    (whatever run.py did to it stays done, and no second copy is ever in memory). ``interrupted`` tells whether a
    stop signal arrived.
    """
    out = config.train.output_path
    fraction = config.method.hybrid.full_fraction
    model = trainer.model
    full_trainable = count_parameters(model)[0]
    if resume_from is not None and _is_adapter_checkpoint(resume_from):
        del trainer
        load_weights(model, resume_from.parent / BASE_DIR)
        trainer = make_trainer(model=_attach(model, config))
        console.print(f"hybrid: resuming the LoRA phase on the full weights in {resume_from.parent / BASE_DIR}")
        trainer.train(resume_from_checkpoint=str(resume_from))
        return trainer, _facts(_switch_step_logged(out / "metrics.jsonl"), full_trainable, resume_from.parent)

    if resume_from is not None and _phase_one_complete(resume_from, fraction):
        # Phase 1 ended in the checkpoint we resume from: its weights become the base; only the switch is redone.
        load_weights(model, resume_from)
        switch_checkpoint = resume_from
    else:
        stopper = StopAtSwitch(fraction)
        trainer.add_callback(stopper)
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        if not stopper.reached or interrupted():
            return trainer, {"hybrid": {"switch_step": stopper.step, "switched": False}}
        switch_checkpoint = out / f"checkpoint-{stopper.step}"
    # Phase 1's optimizer moments (two copies of every weight) must go before the LoRA phase. The caller still holds
    # this trainer, so its references to the optimizer are dropped here rather than left to whatever else Trainer
    # keeps (with master_weights=optimizer they held phase 1's fp32 masters too: test_hybrid checks both).
    trainer.drop_optimizer()
    del trainer
    gc.collect()

    from accelerate import PartialState

    processes = PartialState()
    step = _read_state(switch_checkpoint)["global_step"]
    base_dir = out / BASE_DIR
    model.to(weight_dtype(config.model.dtype))
    if processes.is_main_process:
        model.save_pretrained(base_dir)
    trainer = make_trainer(model=_attach(model, config))
    adapter_trainable = count_parameters(trainer.model)[0]
    switch_dir = out / SWITCH_DIR
    if processes.is_main_process:
        trainer.processing_class.save_pretrained(base_dir)  # hybrid-base/ is then a complete model folder
        _write_switch_checkpoint(trainer, switch_checkpoint, switch_dir)
        _log_switch(out / "metrics.jsonl", step, full_trainable, adapter_trainable)
        console.print(f"[bold]hybrid switch[/] after step {step}: full weights saved to {base_dir} and frozen; "
                      f"LoRA continues with {adapter_trainable:,} trainable parameters (was {full_trainable:,})")
    processes.wait_for_everyone()
    try:
        trainer.train(resume_from_checkpoint=str(switch_dir))
    finally:
        processes.wait_for_everyone()
        if processes.is_main_process:
            shutil.rmtree(switch_dir, ignore_errors=True)
    return trainer, _facts(step, full_trainable, out)


def _attach(model: Any, config: TunelabConfig) -> Any:
    # The adapters' initial values come from their own seed: an uninterrupted run and one resumed at the switch
    # start from the same ones (after the switch, the checkpoint's trained values replace them anyway).
    return keep_trainable_fp32(attach_lora_to_full(
        model, config.method, base_dtype=weight_dtype(config.model.dtype), seed=config.train.seed))


def _facts(step: int | None, full_trainable: int, run_dir: Path) -> dict[str, Any]:
    return {"hybrid": {"switch_step": step, "switched": True, "full_phase_trainable_parameters": full_trainable,
                       "base": str(run_dir / BASE_DIR)}}


def load_weights(model: Any, folder: Path) -> None:
    """Load a saved model folder's weights (one file or shards) into ``model``, in place."""
    single = folder / "model.safetensors"
    if not single.is_file():
        from transformers.trainer_utils import load_sharded_checkpoint

        load_sharded_checkpoint(model, str(folder), strict=False)
        return
    from safetensors.torch import load_file

    missing, unexpected = model.load_state_dict(load_file(str(single)), strict=False)
    tied = {name for name in missing if name.endswith("lm_head.weight")}  # saved once, under the embedding
    if unexpected or set(missing) - tied:
        from tunelab.errors import RunError

        raise RunError(f"{folder}: its weights do not fit this model (missing {sorted(set(missing) - tied)[:3]}, "
                       f"unexpected {sorted(unexpected)[:3]})")


def _is_adapter_checkpoint(checkpoint: Path) -> bool:
    return (checkpoint / "adapter_model.safetensors").is_file()


def _phase_one_complete(checkpoint: Path, full_fraction: float) -> bool:
    state = _read_state(checkpoint)
    return bool(state["global_step"] >= switch_step(full_fraction, state["max_steps"]))


def _read_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / "trainer_state.json").read_text("utf-8"))


def _write_switch_checkpoint(trainer: Any, checkpoint: Path, folder: Path) -> Path:
    """A checkpoint folder the LoRA phase resumes from: phase 1's state at the switch, fresh adapter and optimizer.

    The optimizer state has the new trainer's parameter groups and no moments; each group's learning rate is the
    one phase 1's scheduler set for the next step (what a resumed optimizer would hold).
    """
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for pattern in _COPIED_STATE:
        for path in checkpoint.glob(pattern):
            shutil.copy2(path, folder / path.name)
    trainer.model.save_pretrained(folder)
    scheduler = torch.load(checkpoint / "scheduler.pt", weights_only=True)
    trainer.create_optimizer()
    optimizer_state = trainer.optimizer.state_dict()
    trainer.optimizer = None  # train() creates it again and loads the state written here
    for index, group in enumerate(optimizer_state["param_groups"]):
        source = min(index, len(scheduler["_last_lr"]) - 1)
        group["lr"] = scheduler["_last_lr"][source]
        group["initial_lr"] = scheduler["base_lrs"][source]
    torch.save(optimizer_state, folder / "optimizer.pt")
    return folder


def _log_switch(metrics_path: Path, step: int, full_trainable: int, adapter_trainable: int) -> None:
    """One ``hybrid_switch`` entry in metrics.jsonl (replacing one from an earlier attempt at the same switch)."""
    lines = metrics_path.read_text("utf-8").splitlines() if metrics_path.exists() else []
    kept = [line for line in lines if line.strip() and json.loads(line).get("event") != SWITCH_EVENT]
    entry = {"step": step, "event": SWITCH_EVENT, "full_phase_trainable_parameters": full_trainable,
             "trainable_parameters": adapter_trainable, "time": round(time.time(), 3)}
    metrics_path.write_text("".join(line + "\n" for line in [*kept, json.dumps(entry)]), "utf-8")


def _switch_step_logged(metrics_path: Path) -> int | None:
    if not metrics_path.exists():
        return None
    for line in metrics_path.read_text("utf-8").splitlines():
        if line.strip() and (entry := json.loads(line)).get("event") == SWITCH_EVENT:
            return int(entry["step"])
    return None
