"""Machine-dependent training settings: precision under ``auto``, optimizers, activation offload, compile time."""

import importlib.machinery
import importlib.util
import typing
from pathlib import Path

import pytest
import torch

from tunelab.config.load import load_config
from tunelab.config.schema import TrainConfig
from tunelab.errors import ConfigError
from tunelab.models import load as model_load
from tunelab.models.load import Precision, choose_precision, cpu_flags, native_cpu_bf16
from tunelab.train.callbacks import StepTimerCallback
from tunelab.train.preflight import OPTIMIZER_NEEDS, optimizer_problem


def _cpu(monkeypatch, feature: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(model_load, "native_cpu_bf16", lambda: feature)


def _gpu(monkeypatch, name: str, bf16: bool, capability: tuple[int, int]) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: name)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=0: capability)


def test_auto_precision_on_a_cpu_follows_native_bf16(monkeypatch):
    _cpu(monkeypatch, "AMX")
    choice = choose_precision("auto", training=True)
    assert choice.dtype == "bf16" and "natively (AMX)" in choice.reason and "autocast" in choice.reason
    assert choose_precision("auto").dtype == "fp32"  # evaluation and serving on a CPU stay fp32
    _cpu(monkeypatch, "")
    choice = choose_precision("auto", training=True)
    assert choice == Precision("fp32", "auto: this CPU has no native bf16 (AMX or AVX512_BF16), so bf16 would be "
                                       "emulated and slower than fp32")
    assert choose_precision("bf16", training=True) == Precision("bf16", "set by model.dtype")
    with pytest.raises(ConfigError, match="model.dtype: fp16 training needs a CUDA GPU"):
        choose_precision("fp16", training=True)


@pytest.mark.parametrize(("name", "bf16", "capability", "expected"), [
    ("NVIDIA H100", True, (9, 0), "bf16"),
    ("Tesla T4", False, (7, 5), "fp16"),
    ("Tesla P100", False, (6, 0), "fp32"),
])
def test_auto_precision_on_a_gpu(monkeypatch, name, bf16, capability, expected):
    _gpu(monkeypatch, name, bf16, capability)
    for training in (True, False):
        choice = choose_precision("auto", training=training)
        assert choice.dtype == expected and name in choice.reason


def test_native_cpu_bf16_reads_kernel_flags_without_torch_probes(monkeypatch, tmp_path: Path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n\nprocessor\t: 1\n")
    assert "avx512_bf16" in cpu_flags(cpuinfo) and cpu_flags(tmp_path / "missing") == set()
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    monkeypatch.setattr(model_load, "cpu_flags", lambda: {"avx2", "avx512_bf16"})
    assert native_cpu_bf16() == "AVX512_BF16"
    monkeypatch.setattr(model_load, "cpu_flags", lambda: {"avx2", "avx512f"})
    assert native_cpu_bf16() == ""


def test_optimizer_registry_matches_the_schema_and_transformers():
    from transformers.training_args import OptimizerNames

    choices = set(typing.get_args(TrainConfig.model_fields["optim"].annotation))
    assert set(OPTIMIZER_NEEDS) == choices
    assert choices <= {o.value for o in OptimizerNames}
    assert TrainConfig().optim == "adamw_torch_fused"  # what transformers picks by default on torch >= 2.8


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed here")
def test_bitsandbytes_optimizers_need_bitsandbytes():
    message = optimizer_problem("paged_adamw_8bit")
    assert message.startswith("train.optim: paged_adamw_8bit needs bitsandbytes, with a CUDA GPU or bitsandbytes' "
                              "CPU backend (pip install 'tunelab[gpu]'); importing it failed (ModuleNotFoundError")
    assert "Use train.optim=adamw_torch_fused" in message
    assert optimizer_problem("adafactor") == "" and optimizer_problem("sgd") == ""


def test_torchao_optimizers_need_torchao_and_a_compiler(monkeypatch):
    import builtins

    from tunelab.train import compile as compile_module

    real_import = builtins.__import__

    def without_torchao(name, *args, **kwargs):
        if name.split(".")[0] == "torchao":
            raise ModuleNotFoundError("No module named 'torchao'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_torchao)
    message = optimizer_problem("adamw_torch_8bit")
    assert message.startswith("train.optim: adamw_torch_8bit needs torchao (pip install 'tunelab[gpu]'); importing it "
                              "failed (ModuleNotFoundError")
    monkeypatch.setattr(builtins, "__import__", real_import)
    if importlib.util.find_spec("torchao") is None:
        return
    monkeypatch.setattr(compile_module, "compile_problem", lambda backend: "inductor on a CPU needs a C++ compiler")
    assert optimizer_problem("adamw_torch_4bit") == ("train.optim: adamw_torch_4bit compiles its updates with "
                                                     "torch.compile, which cannot run here: inductor on a CPU needs a "
                                                     "C++ compiler")


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed here")
@pytest.mark.skipif(torch.cuda.is_available(), reason="activation offload is allowed on a GPU")
def test_machine_checks_fail_before_the_model_loads(tmp_path: Path):
    from tunelab.train.run import run_training

    # The model path does not exist: reaching the loader would raise ModelError instead.
    config = load_config(None, [f"model.name_or_path={tmp_path / 'no-model'}", f"train.output_dir={tmp_path / 'run'}",
                                "train.optim=adamw_bnb_8bit", "train.activation_offload=true"])
    with pytest.raises(ConfigError) as err:
        run_training(config)
    lines = str(err.value).splitlines()
    assert lines[0].startswith("train.optim: adamw_bnb_8bit needs bitsandbytes")
    assert lines[1].startswith("train.activation_offload: needs a CUDA GPU (it moves saved activations from GPU "
                               "memory to CPU memory) and there is none here")
    assert "train.gradient_checkpointing=true" in lines[1]


def test_compile_without_a_compiler_names_the_field_and_the_way_out(monkeypatch):
    import torch._inductor.cpp_builder as cpp_builder

    from tunelab.train.preflight import compile_setting_problem

    def no_compiler() -> str:
        raise RuntimeError("no working C++ compiler found")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    config = load_config(None, ["train.torch_compile=true"])
    message = compile_setting_problem(config)
    assert message.startswith("train.torch_compile: inductor on a CPU needs a C++ compiler (g++ or clang++ on PATH, "
                              "or $CXX): RuntimeError: no working C++ compiler found")
    assert "train.torch_compile_backend=aot_eager" in message
    assert compile_setting_problem(load_config(None, ["train.torch_compile=true",
                                                      "train.torch_compile_backend=aot_eager"])) == ""
    assert "hybrid" in compile_setting_problem(load_config(None, ["train.torch_compile=true", "method.name=hybrid"]))


def test_compile_time_is_the_warmup_excess_and_left_out_of_rates():
    timer = StepTimerCallback(compiled=True)
    timer.durations = [30.0, 12.0, 1.5, 1.0, 1.0, 1.2]
    timer._tokens_start, timer._tokens_end, timer._tokens_at_warmup_end = 0, 600, 300
    report = timer.report()
    assert report["compile_s"] == pytest.approx(29.0 + 11.0 + 0.5)
    assert report["tokens_per_s"] == pytest.approx(600 / (46.7 - 40.5), abs=0.01)
    assert report["train_step_time_s"] == pytest.approx(46.7)
    plain = StepTimerCallback()
    plain.durations = list(timer.durations)
    plain._tokens_start, plain._tokens_end = 0, 600
    assert "compile_s" not in plain.report() and plain.report()["tokens_per_s"] == pytest.approx(600 / 46.7, abs=0.01)
    short = StepTimerCallback(compiled=True)
    short.durations, short._tokens_end = [30.0, 1.0], 100
    assert short.report()["compile_s"] is None  # nothing after warm-up to compare with


def test_activation_offload_moves_saved_tensors_and_keeps_the_gradients(tiny_model, tmp_path, monkeypatch):
    from transformers import TrainingArguments

    from tunelab.config.schema import ModelConfig
    from tunelab.data.packing import FlatCollator
    from tunelab.models.load import load_model
    from tunelab.train import trainer as trainer_module
    from tunelab.train.loss import supervised_lm_loss
    from tunelab.train.trainer import TunelabTrainer

    packed: list[torch.Size] = []

    class CountingSaveOnCpu(torch.autograd.graph.save_on_cpu):
        def __init__(self, pin_memory: bool = False) -> None:
            super().__init__(pin_memory=pin_memory)
            pack = self.pack_hook

            def counting(tensor: torch.Tensor):
                packed.append(tensor.shape)
                return pack(tensor)

            self.pack_hook = counting

    monkeypatch.setattr(trainer_module, "save_on_cpu", CountingSaveOnCpu)
    model = load_model(ModelConfig(name_or_path=str(tiny_model), dtype="fp32"))
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    generator = torch.Generator().manual_seed(0)
    batch = FlatCollator()([{"input_ids": ids, "labels": ids} for ids in
                            (torch.randint(0, 400, (n,), generator=generator).tolist() for n in (9, 14, 6))])

    def loss_and_grads(offload: bool) -> tuple[float, dict[str, torch.Tensor]]:
        model.zero_grad()
        trainer = TunelabTrainer(model=model, args=args, loss_fn=supervised_lm_loss, activation_offload=offload)
        loss = trainer.compute_loss(model, dict(batch))
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}

    plain_loss, plain_grads = loss_and_grads(False)
    assert packed == []
    offload_loss, offload_grads = loss_and_grads(True)
    assert len(packed) > 20  # every layer's saved activations went through the CPU
    assert offload_loss == plain_loss
    for name, grad in plain_grads.items():
        torch.testing.assert_close(offload_grads[name], grad, rtol=0, atol=0, msg=name)


def test_lean_loss_runs_under_the_mixed_precision_autocast(tiny_model, tmp_path):
    """accelerate applies bf16 autocast by wrapping model.forward, which the lean loss bypasses: with fp32 master
    weights (full fine-tuning) every matmul ran in fp32 until the trainer entered the autocast itself."""
    from transformers import TrainingArguments

    from tunelab.config.schema import ModelConfig
    from tunelab.data.packing import FlatCollator
    from tunelab.models.load import load_model
    from tunelab.train.loss import supervised_lm_loss
    from tunelab.train.trainer import TunelabTrainer

    model = load_model(ModelConfig(name_or_path=str(tiny_model), dtype="fp32"))
    seen: list[torch.dtype] = []
    layer = model.model.layers[0]
    for module in (layer.self_attn.q_proj, layer.mlp.down_proj):
        module.register_forward_hook(lambda _module, _inputs, output: seen.append(output.dtype))
    batch = FlatCollator()([{"input_ids": ids, "labels": ids} for ids in ([5, 9, 14, 30, 7], [8, 3, 2])])
    for bf16, expected in ((True, torch.bfloat16), (False, torch.float32)):
        seen.clear()
        args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", bf16=bf16)
        trainer = TunelabTrainer(model=model, args=args, loss_fn=supervised_lm_loss)
        loss = trainer.compute_loss(model, dict(batch))
        assert seen == [expected, expected]
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32


def test_optimizer_reaches_the_training_arguments(tmp_path: Path):
    from tunelab.config.hf_args import training_arguments

    config = load_config(None, [f"train.output_dir={tmp_path}", "train.optim=adafactor"])
    assert training_arguments(config, dtype="fp32", has_validation=False).optim == "adafactor"


@pytest.mark.skipif(torch.cuda.is_available(), reason="Liger's kernels run on this GPU")
def test_liger_kernel_on_a_cpu_fails_before_the_model_loads(tmp_path: Path):
    from tunelab.train.run import run_training

    config = load_config(None, [f"model.name_or_path={tmp_path / 'no-model'}", f"train.output_dir={tmp_path / 'run'}",
                                "train.liger_kernel=true"])
    with pytest.raises(ConfigError) as err:
        run_training(config)
    assert str(err.value).startswith("train.liger_kernel: Liger's kernels are written in Triton and need a CUDA GPU; "
                                     "there is none here. Set train.liger_kernel=false")


def _fake_liger(monkeypatch, calls: list) -> None:
    """A stand-in liger_kernel package with the two names tunelab uses, on a machine that claims a GPU."""
    import sys
    import types

    patch = types.ModuleType("liger_kernel.transformers.monkey_patch")
    patch.MODEL_TYPE_TO_APPLY_LIGER_FN = {"llama": None, "qwen2": None}
    patch._apply_liger_kernel_to_instance = lambda **kwargs: calls.append(kwargs)
    package = types.ModuleType("liger_kernel")
    package.__spec__ = importlib.machinery.ModuleSpec("liger_kernel", None)
    for name, module in (("liger_kernel", package), ("liger_kernel.transformers", types.ModuleType("t")),
                         ("liger_kernel.transformers.monkey_patch", patch)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def test_liger_kernel_patches_norms_mlp_and_rope_but_leaves_the_loss_to_lean_loss(monkeypatch, tiny_model):
    from transformers import AutoModelForCausalLM

    from tunelab.models.liger import apply_liger_kernels

    calls: list = []
    _fake_liger(monkeypatch, calls)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    line = apply_liger_kernels(model)
    assert calls == [{"model": model, "rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False,
                      "fused_linear_cross_entropy": False}]
    assert line == f"liger-kernel: fused RMSNorm, SwiGLU and RoPE kernels in this {model.config.model_type} model"


def test_liger_kernel_names_the_model_types_it_supports(monkeypatch, tiny_model):
    from transformers import AutoModelForCausalLM

    from tunelab.models.liger import apply_liger_kernels

    calls: list = []
    _fake_liger(monkeypatch, calls)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model.config.model_type = "gpt2"
    with pytest.raises(ConfigError, match=r"train.liger_kernel: liger-kernel has no kernels for model type 'gpt2' "
                                          r"\(it has: llama, qwen2\); set train.liger_kernel=false"):
        apply_liger_kernels(model)
    assert calls == []


def test_liger_kernel_without_the_package_says_how_to_install(monkeypatch):
    from tunelab.models.liger import liger_problem

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert liger_problem() == ("train.liger_kernel: liger-kernel is not installed (pip install 'tunelab[gpu]' or "
                               "liger-kernel)")


def test_liger_kernel_with_torch_compile_is_refused_with_the_measured_reason():
    from tunelab.train.preflight import liger_setting_problem

    config = load_config(None, ["train.liger_kernel=true", "train.torch_compile=true"])
    message = liger_setting_problem(config.train)
    assert message.startswith("train.liger_kernel: cannot be combined with train.torch_compile")
    assert liger_setting_problem(load_config(None, ["train.torch_compile=true"]).train) == ""


def test_trainer_per_step_values_match_transformers_without_walking_the_model(tiny_model, tmp_path):
    """tunelab's Trainer keeps the parameter count behind total_flos and the trainable parameters it clips instead of
    walking the module tree at every step; the values must stay exactly transformers' own."""
    from transformers import Trainer, TrainingArguments

    from tunelab.config.schema import ModelConfig
    from tunelab.models.load import load_model
    from tunelab.train.trainer import TunelabTrainer

    model = load_model(ModelConfig(name_or_path=str(tiny_model), dtype="fp32"))
    for name, parameter in model.named_parameters():  # a partly frozen model, as with freeze or LoRA
        parameter.requires_grad_("layers.0." not in name)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_grad_norm=0.5)
    trainer = TunelabTrainer(model=model, args=args)
    inputs = {"input_ids": torch.ones(3, 7, dtype=torch.long)}
    expected = Trainer.floating_point_ops(trainer, inputs)
    assert trainer.floating_point_ops(inputs) == expected > 0
    counted = []
    model.num_parameters = lambda **kwargs: counted.append(kwargs)  # type: ignore[method-assign]
    # a later step (another batch shape) uses the kept count: no walk, and transformers' formula
    assert trainer.floating_point_ops({"input_ids": torch.ones(2, 5, dtype=torch.long)}) == expected // 21 * 10
    assert counted == []

    generator = torch.Generator().manual_seed(0)
    grads = {n: torch.randn(p.shape, generator=generator) for n, p in model.named_parameters() if p.requires_grad}

    def clipped(clip: typing.Any) -> tuple[float, dict[str, torch.Tensor]]:
        for name, parameter in model.named_parameters():
            parameter.grad = grads[name].clone() if name in grads else None
        norm = clip(model)
        return float(norm), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ours, ours_grads = clipped(trainer._clip_grad_norm)
    theirs, their_grads = clipped(lambda m: Trainer._clip_grad_norm(trainer, m))
    assert ours == theirs > 0.5
    walks = []
    parameters = model.parameters
    model.parameters = lambda *a, **k: (walks.append(1), parameters(*a, **k))[1]  # type: ignore[method-assign]
    assert clipped(trainer._clip_grad_norm)[0] == ours and walks == []  # the kept list, no walk over the model
    assert ours_grads.keys() == their_grads.keys() == grads.keys()
    for name, grad in their_grads.items():
        torch.testing.assert_close(ours_grads[name], grad, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize(("method", "dropout", "checkpointing"),
                         [("lora", 0.0, False), ("dora", 0.0, False), ("lora", 0.0, True), ("lora", 0.05, True)])
def test_lora_input_casts_left_to_autocast_change_no_bit(tiny_model, tmp_path, monkeypatch, method, dropout,
                                                         checkpointing):
    """Under bf16 autocast tunelab's Trainer stops peft casting each LoRA layer's bf16 input to the fp32 adapter's
    dtype (autocast casts it straight back): the same loss and gradients bit for bit, fewer copies. DoRA layers and
    layers with dropout keep the cast."""
    from peft.tuners.lora import LoraLayer
    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers import TrainingArguments

    from tunelab.config.schema import MethodConfig, ModelConfig
    from tunelab.data.packing import FlatCollator
    from tunelab.models.load import load_model
    from tunelab.models.methods import apply_method
    from tunelab.train import trainer as trainer_module
    from tunelab.train.loss import supervised_lm_loss
    from tunelab.train.trainer import TunelabTrainer

    class CountCopies(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.copies = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            self.copies += func is torch.ops.aten._to_copy.default
            return func(*args, **(kwargs or {}))

    model = load_model(ModelConfig(name_or_path=str(tiny_model), dtype="bf16"))
    model = apply_method(model, MethodConfig(name=method, lora={"dropout": dropout}))
    adapters = [p for n, p in model.named_parameters() if p.requires_grad]
    assert adapters and all(p.dtype == torch.float32 for p in adapters)
    if checkpointing:  # the recomputation in the backward pass runs outside the skip, with peft's casts
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # as in training (checkpointing applies only then)
    layer_calls = []
    mlp = model.base_model.model.model.layers[0].mlp
    mlp_forward = mlp.forward  # counted by wrapping: forward hooks do not run again when checkpointing recomputes
    mlp.forward = lambda x: (layer_calls.append(1), mlp_forward(x))[1]
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", bf16=True)
    batch = FlatCollator()([{"input_ids": ids, "labels": ids} for ids in ([5, 9, 14, 30, 7], [8, 3, 2, 11])])

    def loss_and_grads() -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        model.zero_grad()
        trainer = TunelabTrainer(model=model, args=args, loss_fn=supervised_lm_loss)
        torch.manual_seed(0)  # the same LoRA dropout masks
        with CountCopies() as counter:
            loss = trainer.compute_loss(model, dict(batch))
            loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, \
            counter.copies

    skipped_loss, skipped_grads, skipped_copies = loss_and_grads()
    assert len(layer_calls) == (2 if checkpointing else 1)  # checkpointing recomputes the layer in the backward pass
    lora_layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert lora_layers and all(layer.cast_input_dtype_enabled for layer in lora_layers)  # restored after the loss
    monkeypatch.setattr(trainer_module, "plain_lora_layers", lambda model: [])  # peft's own casts
    cast_loss, cast_grads, cast_copies = loss_and_grads()
    assert torch.equal(skipped_loss, cast_loss)
    assert skipped_grads.keys() == cast_grads.keys() and len(cast_grads) == len(adapters)
    for name, grad in cast_grads.items():
        assert torch.equal(skipped_grads[name], grad), name
    if method == "dora" or dropout:  # these layers keep peft's cast
        assert skipped_copies == cast_copies
    else:
        # per adapted layer, at least peft's cast to fp32 and autocast's cast back in the forward
        assert cast_copies - skipped_copies >= 2 * len(lora_layers)


def test_several_gpus_in_one_process_train_on_one_instead_of_dataparallel(monkeypatch, tmp_path):
    import torch

    from tunelab.config import hf_args
    from tunelab.config.load import load_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert hf_args.gpus_without_launcher({}) == 4
    assert hf_args.gpus_without_launcher({"WORLD_SIZE": "4"}) == 0  # torchrun: one GPU per process already
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert hf_args.gpus_without_launcher({}) == 0

    # the Trainer reads n_gpu to decide on DataParallel; pinned to 1 after the device setup that would set it
    monkeypatch.setattr(hf_args, "gpus_without_launcher", lambda: 4)
    args = hf_args.training_arguments(load_config(None, [f"train.output_dir={tmp_path}"]), dtype="fp32",
                                      has_validation=False)
    assert args.n_gpu == 1
