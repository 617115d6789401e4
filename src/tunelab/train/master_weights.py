"""bf16 trained weights in the model, fp32 master copies in the optimizer (``train.master_weights: optimizer``).

With ``params`` (the choice of ``auto`` on a CPU or a multi-process launch) full and freeze fine-tuning keep the
trained weights themselves in fp32 and compute under bf16 autocast: every forward casts each weight to bf16 again,
the residual stream and the norms run in fp32, and each projection casts its fp32 input to bf16 on its own. On an
H100, copy kernels (these casts among them) took 14% and fp32 elementwise work 11% of a 3B full fine-tuning step's
kernel time (bench/RESULTS.md, "GPU pass 5"). Here the model holds its trained weights in bf16, as a LoRA base is
held, and the optimizer updates fp32 copies:

- each bf16 gradient is added into its master's fp32 gradient as soon as the backward pass has produced it (a
  post-accumulate-grad hook), and the bf16 one is dropped: micro-batches of a gradient-accumulation window are
  summed in fp32, not in bf16 (within one backward pass autograd still sums a weight's uses in bf16, e.g. a tied
  embedding's lookup and head);
- clipping and the optimizer see only the masters (their grouping, weight decay and learning rate unchanged);
- after each optimizer step the masters are rounded into the model's bf16 weights. Updates smaller than bf16's
  resolution accumulate in the masters instead of being rounded away, which is why tunelab keeps fp32 weights at
  all (see ``keep_trainable_fp32``).

DeepSpeed's bf16 optimizer and FSDP's ``MixedPrecision(param_dtype=bfloat16)`` do the same for sharded runs; a
single-process Trainer has neither, hence this module. Memory per trained weight at a step's peak is the same
as with fp32 weights under autocast (bf16 weight + fp32 master, against fp32 weight + the bf16 copy autocast keeps
through the step), plus the fp32 gradient and the optimizer state in both. It refuses multi-process runs rather
than guess how DDP's gradient hooks would interleave with its own. Checkpoints store the masters
(``master_weights.safetensors``) beside the bf16 model, so a resumed run continues from the exact fp32 values.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from tunelab.errors import ConfigError, RunError

MASTER_FILE = "master_weights.safetensors"
SINGLE_PROCESS_ONLY = ("train.master_weights: 'optimizer' runs in a single process; for multi-GPU runs use FSDP's "
                       "mixed precision or DeepSpeed's bf16 (they keep fp32 master weights themselves), or "
                       "train.master_weights=params")
# Set on each bf16 trained parameter while its master exists, so checks that read the model's weights (the "did it
# train" check) can read the value the optimizer updates: a small update may not move the bf16 copy at all.
MASTER_ATTRIBUTE = "tunelab_master"


class MasterWeights:
    """fp32 masters of a model's bf16 trainable parameters, their gradient hooks, and the step that writes back."""

    def __init__(self, model: torch.nn.Module) -> None:
        named = bf16_trained(model)
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        self.masters = [p.detach().to(torch.float32, copy=True) for p in self.params]
        self._hooks = [p.register_post_accumulate_grad_hook(_accumulate_into(m))
                       for p, m in zip(self.params, self.masters, strict=True)]
        for param, master in zip(self.params, self.masters, strict=True):
            setattr(param, MASTER_ATTRIBUTE, master)

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Make ``optimizer`` update the masters in place of the bf16 parameters, and write them back after each of
        its steps. Called on a new optimizer: state that some optimizers make at construction (Adagrad's sums) moves
        to the masters in fp32; an optimizer that has stepped is refused (its state would not fit the masters)."""
        master_of = {id(p): m for p, m in zip(self.params, self.masters, strict=True)}
        for group in optimizer.param_groups:
            for param in group["params"]:
                if id(param) in master_of and param in optimizer.state:
                    optimizer.state[master_of[id(param)]] = _moved_state(optimizer.state.pop(param), param)
            group["params"] = [master_of.get(id(p), p) for p in group["params"]]
        # bitsandbytes matches its per-weight settings (Trainer keeps the embedding's optimizer state in 32 bits) by
        # tensor identity at the first step: give each such setting its master too, or it would silently not apply.
        overrides = getattr(getattr(optimizer, "mng", None), "module_weight_config_triple", None)
        if isinstance(overrides, list):
            for module, attr, config in list(overrides):
                master = master_of.get(id(getattr(module, attr, None)))
                if master is not None:
                    overrides.append((SimpleNamespace(**{attr: master}), attr, config))
        self._hooks.append(optimizer.register_step_post_hook(lambda *_: self.write_back()))

    @torch.no_grad()
    def write_back(self) -> None:
        if self.params:
            torch._foreach_copy_(self.params, self.masters)  # one fused copy-and-round (not a launch per tensor)
        for master in self.masters:
            master.grad = None  # the window's sum was used; the next one starts from nothing

    def state(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.masters, strict=True))

    def save(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        save_file({name: t.contiguous() for name, t in self.state().items()}, str(Path(folder) / MASTER_FILE))

    @torch.no_grad()
    def load(self, folder: str | Path) -> bool:
        """Restore the masters (and their bf16 roundings) from a checkpoint; ``False`` when it has none."""
        saved = read_masters(folder)
        if saved is None:
            return False
        missing = [name for name in self.names if name not in saved]
        if missing:
            raise RunError(f"{Path(folder) / MASTER_FILE}: no master weights for {missing[:3]} (a checkpoint of "
                           "another model or method)")
        for name, param, master in zip(self.names, self.params, self.masters, strict=True):
            master.copy_(saved[name])
            param.copy_(master)
        return True

    def release(self) -> None:
        """Remove the gradient hooks, the optimizer's step hook and the attributes; the masters go with the optimizer
        (see ``TunelabTrainer.drop_optimizer``)."""
        for hook in self._hooks:
            hook.remove()
        for param in self.params:
            if hasattr(param, MASTER_ATTRIBUTE):
                delattr(param, MASTER_ATTRIBUTE)
        self._hooks = []


def _moved_state(state: dict[str, Any], param: torch.Tensor) -> dict[str, Any]:
    def moved(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.shape == param.shape and value.is_floating_point():
            return value.float()
        return value

    steps = state.get("step")
    if isinstance(steps, torch.Tensor | int | float) and float(steps) > 0:
        raise RunError("train.master_weights=optimizer: the optimizer has already stepped on the bf16 weights")
    return {key: moved(value) for key, value in state.items()}


def load_masters_into_params(model: torch.nn.Module, folder: str | Path) -> bool:
    """A checkpoint written with ``master_weights=optimizer``, resumed with ``params``: its fp32 masters are the
    trained values, its model file only their bf16 rounding. Copies them into the fp32 trainable parameters;
    ``False`` when the checkpoint has none."""
    saved = read_masters(folder)
    if saved is None:
        return False
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and name in saved:
                param.copy_(saved[name])
    return True


def read_masters(folder: str | Path) -> dict[str, torch.Tensor] | None:
    """A checkpoint's fp32 masters by parameter name; ``None`` when it was written without them."""
    path = Path(folder) / MASTER_FILE
    if not path.is_file():
        return None
    from safetensors.torch import load_file

    return load_file(str(path))


def _accumulate_into(master: torch.Tensor) -> Callable[[torch.Tensor], None]:
    def hook(param: torch.Tensor) -> None:
        grad = param.grad
        if grad is None:
            return
        if master.grad is None:
            master.grad = grad.float()  # a new fp32 tensor, not a view of the bf16 one
        else:
            master.grad.add_(grad)  # fp32 += bf16, in fp32
        param.grad = None
    return hook


def tensor_to_check(param: torch.Tensor) -> torch.Tensor:
    """The value an optimizer step changes: the fp32 master of a bf16 trained weight, else the weight itself."""
    return getattr(param, MASTER_ATTRIBUTE, param)


def master_weights_note(model: torch.nn.Module, choice: MasterWeightsChoice) -> str:
    """The run's printout line for ``train.master_weights``, read before the trained weights are made fp32; "" for
    a model without bf16 trained weights (LoRA and the like: nothing changes) unless ``optimizer`` was asked for."""
    half = bf16_trained(model)
    if not half:
        asked = choice.in_optimizer and not choice.reason.startswith("auto")
        return ("master weights: no bf16 trained weights (LoRA adapters are fp32), so train.master_weights=optimizer "
                "changes nothing here") if asked else ""
    count = sum(p.numel() for _, p in half)
    if choice.in_optimizer:
        return (f"master weights optimizer: {count:,} trained parameters stay bf16 in the model; the optimizer "
                f"updates fp32 copies and gradients are summed in fp32 ({choice.reason})")
    return (f"master weights params: {count:,} trained parameters are fp32 in the model, under bf16 autocast "
            f"({choice.reason})")


@dataclass(frozen=True)
class MasterWeightsChoice:
    """What ``train.master_weights`` resolved to for this run, and why (printed, and kept in summary.json)."""

    in_optimizer: bool
    reason: str


# Launchers that keep fp32 masters themselves; accelerate sets these even for a single process.
SHARDING_LAUNCHERS = ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP")


def decide_master_weights(setting: str, dtype: str, *, env: Mapping[str, str], cuda_devices: int,
                          resume_from: Path | None) -> MasterWeightsChoice:
    """Resolve ``train.master_weights`` before any model loads; an explicit ``optimizer`` the run cannot honour is
    refused (ConfigError), ``auto`` falls back to ``params`` with the reason. ``cuda_devices``: the CUDA devices this
    process sees (0 without a GPU); with several and no launcher it trains on one (``hf_args.training_arguments``
    keeps the Trainer from DataParallel), so that is one GPU in one process too."""
    processes = int(env.get("WORLD_SIZE") or "1")
    sharded = next((name for name in SHARDING_LAUNCHERS
                    if env.get(name, "").strip().lower() in ("1", "true", "yes", "on")), None)
    if setting == "optimizer":
        if dtype != "bf16":
            raise ConfigError(f"train.master_weights: 'optimizer' needs bf16 weights, but model.dtype resolved to "
                              f"{dtype}; set model.dtype=bf16 (a GPU or a CPU with native bf16) or "
                              "train.master_weights=params")
        if processes > 1 or sharded:
            raise ConfigError(SINGLE_PROCESS_ONLY)
        return MasterWeightsChoice(True, "set by train.master_weights")
    if setting == "params":
        return MasterWeightsChoice(False, "set by train.master_weights")
    if dtype != "bf16":
        return MasterWeightsChoice(False, f"auto: {dtype} weights")
    if processes > 1 or sharded:
        return MasterWeightsChoice(False, "auto: a multi-process or sharded launch; DDP keeps fp32 weights, FSDP "
                                          "and DeepSpeed keep fp32 masters of their own")
    if cuda_devices == 0:
        return MasterWeightsChoice(False, "auto: no CUDA GPU; on a CPU bf16 weights train slower than fp32 ones "
                                          "under autocast (bench/cpu_precision.py)")
    # An adapter checkpoint (hybrid's LoRA phase) has no bf16 trained weights, so no masters either way.
    written_with_fp32 = resume_from is not None and not (resume_from / MASTER_FILE).is_file() and not (
        resume_from / "adapter_config.json").is_file()
    if written_with_fp32:
        return MasterWeightsChoice(False, f"auto: resuming {resume_from.name}, written with fp32 weights")
    return MasterWeightsChoice(True, "auto: bf16 on one CUDA GPU in one process; 3B full fine-tuning on an H100 ran "
                                     "1.29x the steps per second of fp32 weights (bench/RESULTS.md, GPU pass 6)")


def master_weights_record(model: torch.nn.Module, choice: MasterWeightsChoice) -> dict[str, str]:
    """summary.json's ``master_weights``: where the fp32 copies were, or "none" where no bf16 weights trained."""
    if not bf16_trained(model):
        return {"in": "none", "reason": "no bf16 trained weights (LoRA adapters are fp32, or fp32 weights)"}
    return {"in": "optimizer" if choice.in_optimizer else "params", "reason": choice.reason}


def bf16_trained(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The trained weights that get masters: bf16 ones (LoRA adapters are fp32 already)."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad and p.dtype == torch.bfloat16]
