"""train.checkpoint_long_batches: the reference batch size, how many layers a long batch recomputes, and that a
batch recomputing some layers (lean activations in the others) gives the same loss and gradients while keeping fewer
tensors for the backward pass."""

from __future__ import annotations

import copy
import math
import statistics

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from tunelab.data.packing import BatchingPlan, FlatCollator, pack_rows
from tunelab.models.lean_activations import apply_lean_activations
from tunelab.models.packed_attention import enable_padding_free
from tunelab.train.long_batches import (
    LongBatchCheckpointing,
    batch_token_percentile,
    checkpointable_layers,
    layers_to_recompute,
    long_batch_checkpointing,
)

LAYERS = 4


def test_layers_to_recompute_keeps_a_long_batch_within_the_reference():
    assert layers_to_recompute(900, 1000, 8) == 0
    assert layers_to_recompute(1000, 1000, 8) == 0
    assert layers_to_recompute(2922, 2300, 8) == 2  # ceil(8 * 0.2129)
    assert layers_to_recompute(10_000, 100, 8) == 8
    assert layers_to_recompute(192, 176, 24) == 2  # 24 * 16 / 192 = 2 exactly (a float ceil gave 3)
    for tokens in range(1001, 20_000, 37):
        k = layers_to_recompute(tokens, 1000, 8)
        assert tokens * (8 - k) <= 1000 * 8  # the kept layer-tokens stay within the reference batch's
        assert k == 0 or tokens * (8 - k + 1) > 1000 * 8  # and no more layers recompute than needed


def test_the_reference_is_the_percentile_of_random_batches():
    lengths = [100] * 90 + [2000] * 10
    flat = batch_token_percentile(lengths, 4, padded=False, percentile=50)
    assert flat == 400  # most batches of 4 hold no long sample (0.9^4 = 66%)
    padded = batch_token_percentile(lengths, 4, padded=True, percentile=90)
    assert padded == 4 * 2000  # a padded batch with one long sample is all long
    sums = [batch_token_percentile(lengths, 4, padded=False, percentile=p) for p in (10, 50, 90, 99)]
    assert sums == sorted(sums) and sums[-1] > sums[0]
    # the estimate does not hinge on the seed
    estimates = [batch_token_percentile(list(range(10, 1010)), 8, padded=False, percentile=90, seed=s)
                 for s in range(5)]
    assert max(estimates) - min(estimates) < 0.03 * statistics.mean(estimates)
    assert batch_token_percentile([], 8, padded=False, percentile=90) == 0
    assert batch_token_percentile([5, 7], 8, padded=False, percentile=90) == 12  # fewer rows than a batch


def test_length_grouped_batches_are_estimated_in_transformers_order():
    """group_by_length sorts mega-batches by length, so long rows share batches: more than three in four padded
    batches hold only short rows, where a third of random batches of 4 hold a long one (1 - 0.9^4 = 34%)."""
    lengths = [100] * 90 + [2000] * 10
    random_p75 = batch_token_percentile(lengths, 4, padded=True, percentile=75)
    grouped_p75 = batch_token_percentile(lengths, 4, padded=True, percentile=75, length_group=4)
    assert random_p75 == 4 * 2000 and grouped_p75 == 4 * 100
    # the same as reading one epoch of transformers' own sampler, batch by batch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    sizes = []
    for epoch in range(64):
        sampler = LengthGroupedSampler(8, lengths=lengths, generator=torch.Generator().manual_seed(epoch))
        order = list(sampler)
        sizes += [4 * max(lengths[i] for i in order[s:s + 4]) for s in range(0, len(order), 4)]
    sizes.sort()
    expected = sizes[math.ceil(0.9 * len(sizes)) - 1]
    assert batch_token_percentile(lengths, 4, padded=True, percentile=90, length_group=8) == expected


def test_packed_row_lengths_are_those_of_the_packed_rows():
    lengths = [7, 3, 12, 5, 9, 1, 16]
    plan = BatchingPlan("packed", row_length=16)
    rows = pack_rows([{"input_ids": list(range(n))} for n in lengths], 16)
    assert plan.row_lengths(lengths) == [len(row["input_ids"]) for row in rows]
    assert BatchingPlan("padding_free").row_lengths(lengths) == lengths


def tiny_model(method: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = AutoConfig.for_model("qwen2", vocab_size=211, hidden_size=32, intermediate_size=96,
                                  num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(config)
    if method == "lora":
        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0))
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.05)
    model.train()
    return model


def flat_batch(model: torch.nn.Module) -> dict:
    torch.manual_seed(1)
    lengths = [29, 11, 40, 7]
    assert enable_padding_free(model, sum(lengths)).ok
    flat = FlatCollator()([{"input_ids": torch.randint(0, 211, (n,)).tolist()} for n in lengths])
    return {k: v for k, v in flat.items() if k != "labels"} | {"labels": flat["labels"]}


def step(model: torch.nn.Module, batch: dict, recompute: int | None) -> tuple[torch.Tensor, dict, int]:
    """One forward and backward with ``recompute`` layers checkpointing (None: no controller): the loss, the
    gradients, and the bytes of the non-parameter tensors kept outside the layers' own hooks."""
    model = copy.deepcopy(model)
    apply_lean_activations(model)
    if recompute is not None:
        controller = LongBatchCheckpointing(checkpointable_layers(model), reference_tokens=100, percentile=90)
        tokens = {0: 50, 1: 130, 2: 200, 4: 10_000}[recompute]  # 100 reference tokens over 4 layers
        assert controller.before_batch(tokens) == recompute
        assert controller.checkpointed_calls == 0
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def record(t):
        if t.untyped_storage().data_ptr() not in params:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(record, lambda t: t):
        loss = model(**batch, use_cache=False).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    if recompute is not None:
        assert controller.checkpointed_calls == recompute  # the layers' forwards went through the checkpoint
        controller.stop()
        assert not any(layer.gradient_checkpointing for layer in checkpointable_layers(model))
    return loss.detach(), grads, sum(kept.values())


@pytest.mark.parametrize("method", ["full", "lora"])
def test_recomputing_layers_gives_the_same_loss_and_gradients_and_keeps_less(method):
    model = tiny_model(method)
    batch = flat_batch(model)
    plain_loss, plain_grads, plain_kept = step(model, batch, None)
    kept_by_recomputed = {}
    for recompute in (0, 1, 2, 4):
        loss, grads, kept = step(model, batch, recompute)
        assert torch.allclose(loss, plain_loss, rtol=0, atol=1e-6), recompute
        assert grads.keys() == plain_grads.keys() and grads
        for name, grad in plain_grads.items():
            assert torch.allclose(grad, grads[name], rtol=1e-5, atol=1e-7), (recompute, name)
        kept_by_recomputed[recompute] = kept
    assert kept_by_recomputed[0] == plain_kept
    # each recomputing layer keeps only its input: fewer bytes with every layer more
    assert plain_kept > kept_by_recomputed[1] > kept_by_recomputed[2] > kept_by_recomputed[4]


def test_the_controller_and_its_line():
    model = tiny_model("full")
    lengths = [20] * 95 + [400] * 5
    controller, note = long_batch_checkpointing(model, lengths, batch_size=4, padded=False, percentile=90, seed=0)
    assert controller is not None and controller.reference_tokens == 460  # p90: one long sample among four
    assert "460 token slots (p90" in note and f"{LAYERS} decoder layers" in note
    assert controller.before_batch(460) == 0 and controller.before_batch(1600) == 3  # ceil(4 * (1 - 460/1600))
    assert [layer.gradient_checkpointing for layer in controller.layers] == [True, True, True, False]
    assert controller.before_batch(80) == 0
    assert not any(layer.gradient_checkpointing for layer in controller.layers)
    assert controller.record() == {"reference_tokens": 460, "percentile": 90, "batches_recomputing": 1,
                                   "most_layers_recomputed": 3, "layers": LAYERS, "checkpointed_layer_calls": 0}
    plain = torch.nn.Sequential(torch.nn.Linear(2, 2))
    none, why = long_batch_checkpointing(plain, lengths, batch_size=4, padded=False, percentile=90, seed=0)
    assert none is None and "no decoder layers" in why


def test_only_layers_that_keep_activations_are_counted():
    """method freeze trains the last layers: the frozen ones before them keep nothing, so a long batch recomputes
    among the trained ones (and k is computed over those)."""
    from tunelab.config.schema import MethodConfig
    from tunelab.models.methods import apply_method

    lengths = [20] * 95 + [400] * 5
    model = apply_method(tiny_model("full"), MethodConfig(name="freeze", freeze={"trainable_layers": 2}))
    controller, note = long_batch_checkpointing(model, lengths, batch_size=4, padded=False, percentile=90, seed=0)
    assert controller is not None and controller.layers == list(model.model.layers[2:])
    assert f"last 2 of the {LAYERS} decoder layers" in note
    assert controller.before_batch(1600) == 2  # ceil(2 * (1 - 460/1600))
    assert [layer.gradient_checkpointing for layer in model.model.layers] == [False, False, True, True]
    controller.stop()
    # what reaches layer 0 with a gradient makes every layer keep activations: trained embeddings ...
    model.get_input_embeddings().weight.requires_grad_(True)
    assert len(long_batch_checkpointing(model, lengths, batch_size=4, padded=False, percentile=90, seed=0)[0].layers) \
        == LAYERS
    # ... or an input made to require grad (as QLoRA does)
    model.get_input_embeddings().weight.requires_grad_(False)
    model.enable_input_require_grads()
    assert len(long_batch_checkpointing(model, lengths, batch_size=4, padded=False, percentile=90, seed=0)[0].layers) \
        == LAYERS
    model.disable_input_require_grads()
    for param in model.parameters():
        param.requires_grad_(False)
    none, why = long_batch_checkpointing(model, lengths, batch_size=4, padded=False, percentile=90, seed=0)
    assert none is None and "no decoder layer keeps activations" in why
