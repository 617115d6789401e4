"""Method and model options that need a model but no training: freeze patterns, LoRA extras, IA3, QLoRA, RoPE."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tunelab.config.load import load_config
from tunelab.errors import ConfigError, RunError
from tunelab.models.load import add_new_tokens, load_model, load_tokenizer, match_vocabulary
from tunelab.models.methods import (
    apply_method,
    check_adapter_targets,
    check_method,
    keep_trainable_fp32,
    method_quantization,
)
from tunelab.models.methods.hybrid import switch_step


def configured(model: Path, *overrides: str):
    return load_config(None, [f"model.name_or_path={model}", "model.dtype=fp32", *overrides])


def trainable_names(model) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_freeze_patterns_add_to_layers_and_can_stand_alone(tiny_model):
    config = configured(tiny_model, "method.name=freeze", "method.freeze.trainable_layers=0",
                        r"method.freeze.trainable_patterns=['mlp\.down_proj', 'layers\.0\.self_attn\.q_proj\.bias']")
    names = trainable_names(apply_method(load_model(config.model), config.method))
    assert names == {"model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight",
                     "model.layers.0.self_attn.q_proj.bias"}
    config = configured(tiny_model, "method.name=freeze", "method.freeze.trainable_layers=[0]",
                        r"method.freeze.trainable_patterns=['^model\.norm\.weight$']")
    names = trainable_names(apply_method(load_model(config.model), config.method))
    assert {n for n in names if ".layers.0." not in n} == {"model.norm.weight"}
    assert any(".layers.0.mlp." in n for n in names)


def test_freeze_pattern_that_matches_nothing_is_an_error(tiny_model):
    config = configured(tiny_model, "method.name=freeze", "method.freeze.trainable_patterns=['mlp\\.up_projj']")
    with pytest.raises(ConfigError, match=r"trainable_patterns: 'mlp\\\\.up_projj' matches no parameter name; "
                                          r"names look like 'model\."):
        apply_method(load_model(config.model), config.method)
    config = configured(tiny_model, "method.name=freeze", "method.freeze.trainable_layers=0")
    with pytest.raises(ConfigError, match="method.freeze: nothing trains"):
        apply_method(load_model(config.model), config.method)
    with pytest.raises(ConfigError, match=r"method.freeze.trainable_patterns: '\(' is not a regular"):
        configured(tiny_model, "method.freeze.trainable_patterns=['(']")


def test_adapter_targets_that_match_nothing_are_config_errors_before_training(tiny_model):
    model = load_model(configured(tiny_model).model)
    for overrides, message in (
        (["method.name=hybrid", "method.lora.target_modules=[nomod]"],
         r"method\.lora\.target_modules: \['nomod'\] matches no module of this model; its linear layers are named "
         r"down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj \(or use all-linear\)"),
        (["method.name=ia3", "method.ia3.target_modules=[nomod]"], r"method\.ia3\.target_modules: \['nomod'\]"),
        (["method.lora.modules_to_save=[nomod]"], r"method\.lora\.modules_to_save: 'nomod' is not a module"),
    ):
        with pytest.raises(ConfigError, match=message):
            check_adapter_targets(model, configured(tiny_model, *overrides).method)
    for overrides in ([], ["method.lora.target_modules=[q_proj, v_proj]", "method.lora.modules_to_save=[lm_head]"],
                      ["method.name=ia3"], ["method.name=freeze"]):
        check_adapter_targets(model, configured(tiny_model, *overrides).method)


def test_the_padding_free_and_lean_loss_probes_pass_with_fp32_trained_layers_over_a_bf16_base(tiny_model):
    # freeze keeps its trained layers in fp32 beside the frozen bf16 ones; training runs under autocast, and so must
    # the probes, or both features fall back for no reason
    from tunelab.models.packed_attention import enable_padding_free, restore_attention
    from tunelab.train.loss import lean_loss_unsupported

    config = configured(tiny_model, "model.dtype=bf16", "method.name=freeze", "method.freeze.trainable_layers=1")
    model = keep_trainable_fp32(apply_method(load_model(config.model), config.method))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16, torch.float32}
    assert lean_loss_unsupported(model) == ""
    support = enable_padding_free(model, 64)
    assert support.ok, support.reason
    restore_attention(model, support.previous_attention)


def test_freeze_with_new_tokens_trains_the_embeddings(tiny_model):
    config = configured(tiny_model, "method.name=freeze", "method.freeze.trainable_layers=1")
    names = trainable_names(apply_method(load_model(config.model), config.method, [479]))
    assert "model.embed_tokens.weight" in names


def test_lora_modules_to_save_train_whole_modules(tiny_model):
    config = configured(tiny_model, "method.name=lora", "method.lora.modules_to_save=[embed_tokens]")
    names = trainable_names(apply_method(load_model(config.model), config.method))
    saved = {n for n in names if "lora_" not in n}
    assert saved and all("embed_tokens.modules_to_save" in n for n in saved)


def test_new_tokens_grow_the_tokenizer_and_the_embeddings(tiny_model):
    config = configured(tiny_model)
    tokenizer = load_tokenizer(config.model)
    before = len(tokenizer)
    ids = add_new_tokens(tokenizer, ["<calc>", "<|im_end|>", "</calc>"])  # <|im_end|> exists already
    assert ids == [before, before + 1] and tokenizer.encode("<calc>") == [before]
    model = load_model(config.model)
    original = model.get_input_embeddings().weight[:before].clone()
    match_vocabulary(model, tokenizer, seed=3)
    weight = model.get_input_embeddings().weight
    assert weight.shape[0] == before + 2 and torch.equal(weight[:before], original)
    again = match_vocabulary(load_model(config.model), tokenizer, seed=3).get_input_embeddings().weight
    assert torch.equal(again, weight)  # seeded: a resumed run and its evaluation get the same new rows


def test_ia3_targets_and_feedforward_modules(tiny_model):
    config = configured(tiny_model, "method.name=ia3", "method.ia3.target_modules=[v_proj, down_proj]",
                        "method.ia3.feedforward_modules=[down_proj]")
    names = trainable_names(apply_method(load_model(config.model), config.method))
    assert names and all("ia3_l" in n and ("v_proj" in n or "down_proj" in n) for n in names)
    config = configured(tiny_model, "method.name=ia3", "method.ia3.target_modules=[q_proj]")
    assert all("q_proj" in n for n in trainable_names(apply_method(load_model(config.model), config.method)))
    with pytest.raises(ConfigError, match=r"method.ia3: feedforward_modules \['down_proj'\] are not in "
                                          "target_modules"):
        configured(tiny_model, "method.ia3.target_modules=[q_proj]", "method.ia3.feedforward_modules=[down_proj]")


def test_qlora_settings_become_a_bitsandbytes_config():
    config = load_config(None, ["method.name=qlora", "method.qlora.quant_type=fp4", "method.qlora.double_quant=false"])
    quant = method_quantization(config.method, torch.float32)
    assert quant.load_in_4bit and quant.bnb_4bit_quant_type == "fp4" and not quant.bnb_4bit_use_double_quant
    assert quant.bnb_4bit_compute_dtype == torch.float32
    config = load_config(None, ["method.name=qlora", "method.qlora.compute_dtype=bf16"])
    assert method_quantization(config.method, torch.float32).bnb_4bit_compute_dtype == torch.bfloat16
    assert method_quantization(load_config(None, ["method.name=qlora", "method.qlora.bits=8"]).method,
                               torch.float32).load_in_8bit
    assert method_quantization(load_config(None, ["method.name=lora"]).method, torch.float32) is None
    with pytest.raises(ConfigError, match=r"method.qlora.bits: got 3; allowed values: 4 or 8"):
        load_config(None, ["method.qlora.bits=3"])


def test_new_tokens_with_a_frozen_embedding_method_fail_before_loading():
    config = load_config(None, ["method.name=ia3", "model.new_special_tokens=['<x>']"])
    with pytest.raises(ConfigError, match="model.new_special_tokens: method ia3 cannot train embeddings"):
        check_method(config)


def test_prefix_tuning_with_gradient_checkpointing_fails_before_loading():
    # its KV-cache prefix would be extended again by each layer's recompute (a shape error deep in attention)
    config = load_config(None, ["method.name=prefix", "train.gradient_checkpointing=true"])
    with pytest.raises(ConfigError, match="train.gradient_checkpointing: method prefix hands its virtual keys"):
        check_method(config)
    check_method(load_config(None, ["method.name=ptuning", "train.gradient_checkpointing=true"]))


def test_rope_scaling_is_validated_and_applied(tiny_model, tmp_path):
    config = configured(tiny_model, "model.rope_scaling={type: dynamic, factor: 2.0}")
    model = load_model(config.model)
    assert model.config.rope_parameters == {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    linear = load_model(configured(tiny_model, "model.rope_scaling={type: linear, factor: 2.0}").model)
    plain = load_model(configured(tiny_model).model)
    assert torch.allclose(linear.model.rotary_emb.inv_freq * 2, plain.model.rotary_emb.inv_freq)
    with pytest.raises(ConfigError, match=r"model.rope_scaling.factor: Input should be greater than 1"):
        configured(tiny_model, "model.rope_scaling={type: linear, factor: 1.0}")
    with pytest.raises(ConfigError, match=r"model.rope_scaling.type: got 'yarn'; allowed values: 'linear' or"):
        configured(tiny_model, "model.rope_scaling={type: yarn, factor: 2.0}")

    scaled = tmp_path / "scaled"  # a checkpoint that ships its own scaling: stacking another is refused
    shutil.copytree(tiny_model, scaled)
    data = json.loads((scaled / "config.json").read_text())
    data["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (scaled / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="already uses 'yarn' RoPE scaling"):
        load_model(configured(scaled, "model.rope_scaling={type: linear, factor: 2.0}").model)


def test_switch_step_leaves_each_phase_at_least_one_step():
    assert switch_step(0.2, 100) == 20
    assert switch_step(0.3, 10) == 3
    assert switch_step(0.01, 10) == 1 and switch_step(0.99, 10) == 9
    with pytest.raises(RunError, match="hybrid needs at least 2 optimizer steps"):
        switch_step(0.2, 1)
    with pytest.raises(ConfigError, match="method.hybrid.full_fraction: Input should be less than 1"):
        load_config(None, ["method.hybrid.full_fraction=1.0"])
