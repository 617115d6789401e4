"""train.lean_activations: patched decoder layers give bit-identical losses and gradients and keep fewer tensors for
the backward pass (the SiLU output and product, the norms' outputs)."""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from tunelab.models import lean_activations
from tunelab.models.lean_activations import (
    DECODER_LAYER_CLASSES,
    SWIGLU_MLP_CLASSES,
    apply_lean_activations,
    lean_activations_problem,
    patch_swiglu_mlp,
)

LAYERS, HIDDEN, INTERMEDIATE = 2, 32, 96
MODEL_TYPES = {"LlamaMLP": "llama", "Qwen2MLP": "qwen2", "Qwen3MLP": "qwen3", "MistralMLP": "mistral",
               "Qwen3MoeMLP": "qwen3_moe", "Qwen2MoeMLP": "qwen2_moe"}


def tiny_config(model_type: str):
    return AutoConfig.for_model(model_type, vocab_size=211, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                                num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2, head_dim=8)


def step(model, ids, *, lean: bool, bf16: bool, monkeypatch=None):
    """One forward and backward; the loss, every gradient, and the bytes of the non-parameter tensors autograd
    keeps for the backward (each storage once): what reaches the test's hook outside the layers, and what the lean
    layers' own hook keeps as it is rather than as a recipe."""
    model = copy.deepcopy(model)
    if lean:
        assert apply_lean_activations(model) == LAYERS
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def record(t):
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in params:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    if monkeypatch is not None:
        original = lean_activations._pack_with
        monkeypatch.setattr(lean_activations, "_pack_with", lambda recipes: lambda t: record(original(recipes)(t)))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(record, lambda t: t), autocast:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, sum(kept.values())


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
def test_same_loss_and_gradients_bit_for_bit_with_less_kept(model_type, method, bf16, monkeypatch):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type))
    if method == "lora":
        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0))
        for name, param in model.named_parameters():
            if "lora_B" in name:  # nonzero B, so that every LoRA gradient is exercised
                torch.nn.init.normal_(param, std=0.05)
    ids = torch.randint(0, 211, (3, 29))
    plain_loss, plain_grads, plain_kept = step(model, ids, lean=False, bf16=bf16)
    lean_loss, lean_grads, lean_kept = step(model, ids, lean=True, bf16=bf16, monkeypatch=monkeypatch)
    assert torch.equal(plain_loss, lean_loss)
    assert plain_grads.keys() == lean_grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        assert torch.equal(grad, lean_grads[name]), name
    # per layer, no longer kept in fp32: SiLU's output and the product (down_proj's input), and the two norms'
    # outputs (the projections' input). Under bf16 autocast at least one intermediate-width tensor: the
    # projections then keep autocast's own bf16 copies of some inputs, which no recipe can stand for.
    width, itemsize = (INTERMEDIATE, 2) if bf16 else (2 * INTERMEDIATE + 2 * HIDDEN, 4)
    assert plain_kept - lean_kept >= LAYERS * ids.numel() * width * itemsize


def test_dropout_copies_and_inference_are_left_alone():
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_config(tiny_config("qwen2")),
                           LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.2))
    ids = torch.randint(0, 211, (2, 17))
    torch.manual_seed(5)
    plain_loss, plain_grads, _ = step(model, ids, lean=False, bf16=False)
    torch.manual_seed(5)
    lean_loss, lean_grads, _ = step(model, ids, lean=True, bf16=False)
    assert torch.equal(plain_loss, lean_loss)
    assert all(torch.equal(g, lean_grads[n]) for n, g in plain_grads.items())
    patched = copy.deepcopy(model)
    apply_lean_activations(patched)
    model.eval()
    patched.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, patched(input_ids=ids).logits)


@pytest.mark.parametrize("class_name", sorted(SWIGLU_MLP_CLASSES))
def test_every_listed_class_has_the_forward_the_patch_assumes(class_name):
    model_type = MODEL_TYPES[class_name]
    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    torch.manual_seed(0)
    mlp = getattr(module, class_name)(tiny_config(model_type))
    lean = copy.deepcopy(mlp)
    assert patch_swiglu_mlp(lean)
    x = torch.randn(2, 5, HIDDEN, requires_grad=True)
    y = x.detach().clone().requires_grad_()
    out_plain, out_lean = mlp(x), lean(y)
    assert torch.equal(out_plain, out_lean)
    out_plain.square().sum().backward()
    out_lean.square().sum().backward()
    assert torch.equal(x.grad, y.grad)


def test_off_where_something_else_recomputes():
    problem = lean_activations_problem
    assert problem(torch_compile=False, liger_kernel=False, gradient_checkpointing=False) == ""
    assert "compile" in problem(torch_compile=True, liger_kernel=False, gradient_checkpointing=False)
    assert "Liger" in problem(torch_compile=False, liger_kernel=True, gradient_checkpointing=False)
    assert "checkpointing" in problem(torch_compile=False, liger_kernel=False, gradient_checkpointing=True)
    gelu = AutoModelForCausalLM.from_config(AutoConfig.for_model("gemma", vocab_size=211, hidden_size=HIDDEN,
                                                                 intermediate_size=INTERMEDIATE, num_hidden_layers=1,
                                                                 num_attention_heads=4, num_key_value_heads=2,
                                                                 head_dim=8))
    assert apply_lean_activations(gelu) == 0  # Gemma: not a layer class the patch knows, so untouched


@pytest.mark.parametrize("class_name", sorted(DECODER_LAYER_CLASSES))
def test_every_listed_layer_class_is_patched_with_its_norms_and_mlp(class_name):
    model_type = MODEL_TYPES[class_name.replace("DecoderLayer", "MLP")]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type))
    plain = copy.deepcopy(model)
    assert apply_lean_activations(model) == LAYERS
    layer = next(m for m in model.modules() if type(m).__name__ == class_name)
    assert isinstance(layer.input_layernorm.forward, functools.partial)  # the norm is one of the known classes
    ids = torch.randint(0, 211, (2, 13))
    plain(input_ids=ids, labels=ids).loss.backward()
    model(input_ids=ids, labels=ids).loss.backward()
    for (name, p), (_, q) in zip(plain.named_parameters(), model.named_parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None) and (p.grad is None or torch.equal(p.grad, q.grad)), name


def test_the_train_switch_and_what_turns_it_off():
    from rich.console import Console

    from tunelab.config.schema import TrainConfig
    from tunelab.train.run import use_lean_activations

    def layers_patched(**train):
        model = AutoModelForCausalLM.from_config(tiny_config("qwen2"))
        console = Console(record=True, width=200)
        count = use_lean_activations(model, TrainConfig(**train), console)
        patched = [isinstance(m.forward, functools.partial) for m in model.model.layers]
        return count, patched, console.export_text()

    count, patched, printed = layers_patched()
    assert count == LAYERS and all(patched) and "lean activations: 2 decoder layers" in printed
    count, patched, printed = layers_patched(lean_activations=False)
    assert count == 0 and not any(patched) and printed == ""
    count, patched, printed = layers_patched(gradient_checkpointing=True)
    assert count == 0 and not any(patched)
    assert "lean activations off: gradient checkpointing recomputes the whole layer" in printed
