"""train.lean_activations: patched decoder layers give bit-identical losses and gradients and keep fewer tensors for
the backward pass (the SiLU output and product, the norms' outputs, the padding-free attention's joined output), and
no save of a remembered tensor happens outside the hooks (which are open only around the tensors' consumers)."""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from tunelab.data.packing import FlatCollator
from tunelab.models import lean_activations
from tunelab.models.lean_activations import (
    DECODER_LAYER_CLASSES,
    SWIGLU_MLP_CLASSES,
    apply_lean_activations,
    lean_activations_problem,
    patch_swiglu_mlp,
)
from tunelab.models.packed_attention import enable_padding_free
from tunelab.train.trainer import plain_lora_layers

LAYERS, HIDDEN, INTERMEDIATE = 2, 32, 96
MODEL_TYPES = {"LlamaMLP": "llama", "Qwen2MLP": "qwen2", "Qwen3MLP": "qwen3", "MistralMLP": "mistral",
               "Qwen3MoeMLP": "qwen3_moe", "Qwen2MoeMLP": "qwen2_moe"}


def tiny_config(model_type: str):
    return AutoConfig.for_model(model_type, vocab_size=211, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                                num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2, head_dim=8)


def step(model, batch, *, lean: bool, bf16: bool, monkeypatch=None):
    """One forward and backward; the loss, every gradient, the bytes of the non-parameter tensors autograd keeps for
    the backward (each storage once): what reaches the test's hook outside the lean hooks, and what the lean hooks
    keep as it is rather than as a recipe; and the saves that reached the test's hook while a recipe of the layer in
    progress stood for them (the lean hooks, open only around consumers, missed them: they must be none, so that
    the kept bytes are those of hooks over the whole layer)."""
    model = copy.deepcopy(model)
    if lean:
        assert apply_lean_activations(model) == LAYERS
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}
    escaped: list[tuple[int, ...]] = []

    def record(t):
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in params:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    def outside(t):
        call = lean_activations._layer_call.get()
        recipe = call.recipes.get(t.untyped_storage().data_ptr()) if call is not None else None
        source = recipe.source() if recipe is not None else None
        if source is not None and source.dtype == t.dtype:  # what the lean hook would have replaced
            escaped.append(tuple(t.shape))
        return record(t)

    if monkeypatch is not None:
        original = lean_activations._pack_with
        monkeypatch.setattr(lean_activations, "_pack_with", lambda recipes: lambda t: record(original(recipes)(t)))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(outside, lambda t: t), autocast:
        loss = model(**batch, use_cache=False).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, sum(kept.values()), escaped


def tiny_model(model_type: str, method: str, precision: str):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type))
    if precision == "bf16-weights":  # tunelab's mixed precision: bf16 load, trainable weights in fp32
        model.to(torch.bfloat16)
    if method == "lora":
        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0))
        for name, param in model.named_parameters():
            if "lora_B" in name:  # nonzero B, so that every LoRA gradient is exercised
                torch.nn.init.normal_(param, std=0.05)
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    return model


def batch_for(model, layout: str, ids: torch.Tensor) -> dict:
    if layout == "padded":
        return {"input_ids": ids, "labels": ids}
    # one flat row of samples: tunelab's padding-free attention, which remembers its joined output (o_proj's input)
    assert enable_padding_free(model, ids.numel()).ok
    lengths = [29, 11, 40, 7]
    samples = ids.flatten().split(lengths)
    flat = FlatCollator()([{"input_ids": s.tolist()} for s in samples])
    return {k: v for k, v in flat.items() if k in ("input_ids", "labels", "position_ids", "cu_seq_lens_q",
                                                   "cu_seq_lens_k", "max_length_q", "max_length_k")}


@pytest.mark.parametrize("layout", ["padded", "flat"])
@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast", "bf16-weights"])
@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
def test_same_loss_and_gradients_bit_for_bit_with_less_kept(model_type, method, precision, layout, monkeypatch):
    model = tiny_model(model_type, method, precision)
    ids = torch.randint(0, 211, (3, 29))
    batch = batch_for(model, layout, ids)
    if precision == "bf16-weights":  # as tunelab's Trainer runs it (under autocast): peft's input casts skipped
        for layer in plain_lora_layers(model):
            layer.cast_input_dtype_enabled = False
    bf16 = precision != "fp32"
    plain_loss, plain_grads, plain_kept, _ = step(model, batch, lean=False, bf16=bf16)
    lean_loss, lean_grads, lean_kept, escaped = step(model, batch, lean=True, bf16=bf16, monkeypatch=monkeypatch)
    assert torch.equal(plain_loss, lean_loss)
    assert plain_grads.keys() == lean_grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        assert torch.equal(grad, lean_grads[name]), name
    assert escaped == []
    # per layer and token, no longer kept: SiLU's output and the product (down_proj's input), the two norms' outputs
    # (the projections' input) and, in a flat row, the joined attention output (o_proj's input), where the
    # projections keep their inputs as the model made them (fp32; bf16 weights with adapters that leave their input
    # casts to autocast). No recipe stands for a copy: under bf16 autocast over fp32 weights, the projections keep
    # autocast's bf16 copies of the norms' outputs, and LoRA layers peft's fp32 copies of all their inputs.
    joined = HIDDEN if layout == "flat" else 0
    if precision == "fp32" or (precision == "bf16-weights" and method == "lora"):
        width = 2 * INTERMEDIATE + 2 * HIDDEN + joined
    else:
        width = 2 * INTERMEDIATE + joined if method == "full" else INTERMEDIATE
    itemsize = 4 if precision == "fp32" else 2
    assert plain_kept - lean_kept >= LAYERS * ids.numel() * width * itemsize


def test_dropout_copies_and_inference_are_left_alone():
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_config(tiny_config("qwen2")),
                           LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.2))
    ids = torch.randint(0, 211, (2, 17))
    torch.manual_seed(5)
    plain_loss, plain_grads, _, _ = step(model, {"input_ids": ids, "labels": ids}, lean=False, bf16=False)
    torch.manual_seed(5)
    lean_loss, lean_grads, _, _ = step(model, {"input_ids": ids, "labels": ids}, lean=True, bf16=False)
    assert torch.equal(plain_loss, lean_loss)
    assert all(torch.equal(g, lean_grads[n]) for n, g in plain_grads.items())
    patched = copy.deepcopy(model)
    apply_lean_activations(patched)
    model.eval()
    patched.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, patched(input_ids=ids).logits)


def test_projections_replaced_after_the_patch_run_under_the_hooks():
    """hybrid's switch wraps the projections of a patched model in LoRA layers: the layer finds them at its next
    call, and their saves of remembered tensors still become recipes."""
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(tiny_config("qwen2"))
    ids = torch.randint(0, 211, (3, 29))
    batch = batch_for(base, "flat", ids)
    lean = copy.deepcopy(base)
    assert apply_lean_activations(lean) == LAYERS
    step(lean, batch, lean=False, bf16=False)  # a first (full fine-tuning) step before the switch
    models = []
    for model in (base, lean):
        torch.manual_seed(1)
        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0))
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.05)
        models.append(model)
    plain_loss, plain_grads, plain_kept, _ = step(models[0], batch, lean=False, bf16=False)
    lean_loss, lean_grads, lean_kept, escaped = step(models[1], batch, lean=False, bf16=False)
    assert torch.equal(plain_loss, lean_loss)
    assert plain_grads.keys() == lean_grads.keys() and plain_grads
    assert all(torch.equal(g, lean_grads[n]) for n, g in plain_grads.items())
    assert escaped == []
    assert plain_kept - lean_kept >= LAYERS * ids.numel() * (2 * INTERMEDIATE + 3 * HIDDEN) * 4


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
    assert "activation_offload" in problem(torch_compile=False, liger_kernel=False, gradient_checkpointing=False,
                                           activation_offload=True)
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
    patched = copy.deepcopy(model)
    assert apply_lean_activations(patched) == LAYERS
    layer = next(m for m in patched.modules() if type(m).__name__ == class_name)
    assert isinstance(layer.input_layernorm.forward, functools.partial)  # the norm is one of the known classes
    ids = torch.randint(0, 211, (2, 13))
    batch = {"input_ids": ids, "labels": ids}
    plain_loss, plain_grads, _, _ = step(model, batch, lean=False, bf16=False)
    # MoE layers: their sparse block is not a SwiGLU MLP the patch replaces, so it runs under the hooks whole
    lean_loss, lean_grads, _, escaped = step(model, batch, lean=True, bf16=False)
    assert torch.equal(plain_loss, lean_loss)
    assert plain_grads.keys() == lean_grads.keys() and plain_grads
    assert all(torch.equal(g, lean_grads[n]) for n, g in plain_grads.items())
    assert escaped == []


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


def test_patching_twice_changes_nothing_more():
    model = tiny_model("qwen2", "full", "fp32")
    ids = torch.randint(0, 211, (2, 16))
    once = step(model, {"input_ids": ids, "labels": ids}, lean=True, bf16=False)
    assert apply_lean_activations(model) == LAYERS and apply_lean_activations(model) == LAYERS
    twice = step(model, {"input_ids": ids, "labels": ids}, lean=True, bf16=False)  # step patches its copy again
    assert torch.equal(once[0], twice[0]) and once[2] == twice[2] and twice[3] == []
