"""Flat-row collation, bin packing, per-sample attention, the chunked linear cross-entropy and the meter's pieces."""

import typing

import pytest
import torch
import torch.nn.functional as F

from tunelab.config.schema import DataConfig
from tunelab.data.packing import BATCHINGS, FlatCollator, pack_rows
from tunelab.data.tokenize import IGNORE_INDEX
from tunelab.models.packed_attention import _sample_bounds, attention_dtype, same_logits, varlen_sdpa_attention
from tunelab.train.loss import linear_cross_entropy_sum
from tunelab.train.meter import FedBatches, TrainingCheckCallback, meter_summary


def features(*lengths: int, start: int = 10) -> list[dict]:
    out = []
    for n, length in enumerate(lengths):
        ids = list(range(start + 100 * n, start + 100 * n + length))
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (length // 2) + ids[length // 2 :]})
    return out


def test_batching_registry_matches_schema():
    assert set(BATCHINGS) == set(typing.get_args(DataConfig.model_fields["batching"].annotation))
    assert DataConfig().batching == "padding_free"


def test_flat_collator_restarts_positions_and_never_predicts_across_samples():
    samples = features(3, 5, 2)
    samples[2]["labels"] = list(samples[2]["input_ids"])  # fully supervised, like a text record
    batch = FlatCollator()(samples)
    assert batch["input_ids"].shape == (1, 10)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4, 0, 1]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 8, 10] and batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["max_length_q"] == batch["max_length_k"] == 5
    labels = batch["labels"][0].tolist()
    # the first token of every sample is never a target (the padded batch never has that target either)
    assert [labels[i] for i in (0, 3, 8)] == [IGNORE_INDEX] * 3
    assert labels[1:3] == [11, 12] and labels[4:8] == [IGNORE_INDEX, 112, 113, 114] and labels[9] == 211


def test_flat_collator_reads_packed_rows():
    rows = pack_rows(features(3, 5, 2), row_length=8)
    batch = FlatCollator()(rows)
    assert sorted(batch["cu_seq_lens_q"].diff().tolist()) == [2, 3, 5]
    starts = batch["cu_seq_lens_q"][:-1].tolist()
    assert all(batch["position_ids"][0, s] == 0 for s in starts)
    assert all(batch["labels"][0, s] == IGNORE_INDEX for s in starts)


def test_pack_rows_keeps_every_sample_whole_within_the_row_length():
    lengths = [7, 3, 9, 1, 4, 4, 6, 2, 8, 5]
    rows = pack_rows(features(*lengths), row_length=10)
    assert all(sum(r["sample_lengths"]) <= 10 and len(r["input_ids"]) == sum(r["sample_lengths"]) for r in rows)
    assert sorted(n for r in rows for n in r["sample_lengths"]) == sorted(lengths)
    assert len(rows) == 5  # 49 tokens in rows of 10: best fit reaches the optimum here
    flat = sorted(t for r in rows for t in r["input_ids"])
    assert flat == sorted(t for f in features(*lengths) for t in f["input_ids"])
    assert rows == pack_rows(features(*lengths), row_length=10)  # deterministic
    with pytest.raises(ValueError, match="longer than the packed row"):
        pack_rows(features(11), row_length=10)


def test_sample_bounds_from_cu_seq_lens_or_position_ids():
    assert _sample_bounds({"cu_seq_lens_q": torch.tensor([0, 3, 8])}, 8) == [0, 3, 8]
    assert _sample_bounds({"position_ids": torch.tensor([[0, 1, 2, 0, 1, 0]])}, 6) == [0, 3, 5, 6]
    assert _sample_bounds({"position_ids": torch.arange(6)[None]}, 6) == [0, 6]
    assert _sample_bounds({}, 6) == [0, 6]


class _Attn(torch.nn.Module):
    is_causal = True
    num_key_value_groups = 2


@pytest.mark.parametrize("window", [None, 3])
def test_varlen_attention_equals_a_block_diagonal_causal_mask(window):
    torch.manual_seed(0)
    lengths = [5, 1, 7, 4]
    total = sum(lengths)
    q, k, v = torch.randn(1, 4, total, 8), torch.randn(1, 2, total, 8), torch.randn(1, 2, total, 8)
    cu = torch.tensor([0, 5, 6, 13, 17], dtype=torch.int32)
    out, _ = varlen_sdpa_attention(_Attn(), q, k, v, None, scaling=0.3, sliding_window=window, cu_seq_lens_q=cu)
    sample = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    pos = torch.arange(total)
    mask = (sample[:, None] == sample[None, :]) & (pos[:, None] >= pos[None, :])
    if window is not None:
        mask &= pos[:, None] - pos[None, :] < window
    expected = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                              attn_mask=mask, scale=0.3)
    assert out.shape == (1, total, 4, 8)
    torch.testing.assert_close(out, expected.transpose(1, 2), atol=1e-6, rtol=1e-5)


def _reference_ce(hidden, weight, bias, targets):
    return F.cross_entropy(F.linear(hidden, weight, bias), targets, reduction="sum")


def test_isolation_probe_tolerates_rounding_but_not_attention_bugs():
    """Half precision: kernel rounding (about 1% here) passes, a wrong mask or position (tens of %) does not."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 1000, generator=generator) * 4
    rounding = logits * (1 + 0.01 * torch.randn(5, 1000, generator=generator))
    wrong = logits + 0.4 * torch.randn(5, 1000, generator=generator) * logits.std()
    assert same_logits(rounding, logits, torch.bfloat16) and not same_logits(wrong, logits, torch.bfloat16)
    assert same_logits(logits + 1e-5, logits, torch.float32) and not same_logits(rounding, logits, torch.float32)


def test_attention_runs_in_the_autocast_precision_like_sdpa():
    """fp32 queries (fp32 master weights) under bf16 autocast attend in bf16, as SDPA would: the varlen kernel is
    chosen by this dtype, so full fine-tuning is not sent down the slow per-sample path."""
    query = torch.zeros(1, 2, 4, 8)
    assert attention_dtype(query) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert attention_dtype(query) == torch.bfloat16
        assert attention_dtype(query.half()) == torch.float16  # already half precision: kept
    assert attention_dtype(query.bfloat16()) == torch.bfloat16


@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_linear_cross_entropy_matches_full_logits(with_bias):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=with_bias)
    hidden = torch.randn(23, 16, requires_grad=True)
    targets = torch.randint(0, 50, (23,))
    expected = _reference_ce(hidden, head.weight, head.bias, targets)
    grads = torch.autograd.grad(expected * 0.7, [hidden, *head.parameters()])
    got = linear_cross_entropy_sum(hidden, head, targets, chunk_rows=5)  # 5 chunks, the last one short
    assert abs(got.item() - expected.item()) < 1e-5
    for g_got, g_ref in zip(torch.autograd.grad(got * 0.7, [hidden, *head.parameters()]), grads, strict=True):
        torch.testing.assert_close(g_got, g_ref, atol=1e-6, rtol=1e-5)


def test_chunked_cross_entropy_with_a_frozen_head_and_any_head_module():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False).requires_grad_(False)
    hidden = torch.randn(9, 16, requires_grad=True)
    targets = torch.randint(0, 50, (9,))
    expected = _reference_ce(hidden, head.weight, None, targets)
    (g_ref,) = torch.autograd.grad(expected, hidden)
    (g_got,) = torch.autograd.grad(linear_cross_entropy_sum(hidden, head, targets, chunk_rows=4), hidden)
    torch.testing.assert_close(g_got, g_ref)
    wrapped = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Linear(16, 50))  # not a plain Linear: checkpointed
    expected = F.cross_entropy(wrapped(hidden), targets, reduction="sum")
    g_ref = torch.autograd.grad(expected, [hidden, *wrapped.parameters()])
    got = linear_cross_entropy_sum(hidden, wrapped, targets, chunk_rows=4)
    assert abs(got.item() - expected.item()) < 1e-5
    for a, b in zip(torch.autograd.grad(got, [hidden, *wrapped.parameters()]), g_ref, strict=True):
        torch.testing.assert_close(a, b)
    empty = linear_cross_entropy_sum(hidden[:0], head, targets[:0], chunk_rows=4)
    assert empty.item() == 0.0 and empty.requires_grad


def test_fed_batches_counts_slots_samples_and_squared_lengths():
    fed = FedBatches()
    fed.add({"input_ids": torch.zeros(2, 5), "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1] * 5])})
    fed.add(FlatCollator()(features(3, 4)))
    assert fed.slots == 10 + 7 and fed.samples == 4
    assert int(fed.squared_lengths) == 9 + 25 + 9 + 16
    # The largest micro-batch: 10 slots (longest 5 × 2 rows) holding 8 real tokens; the flat one holds 7 in 7.
    assert fed.largest_slots == 10 and int(fed.largest_tokens) == 8


def test_training_check_flags_a_run_that_did_not_train():
    check = TrainingCheckCallback()
    weight = torch.nn.Parameter(torch.ones(3))
    model = torch.nn.Module()
    model.weight = weight
    check.on_train_begin(None, None, None, model=model)
    check.on_train_end(None, None, None)
    history = [{"loss": 2.0, "grad_norm": 0.0}, {"loss": 2.0, "grad_norm": 0.0}]
    report = check.report(history)
    assert report == {"grad_norm_above_zero": False, "parameters_changed": False, "loss_fell": False, "ok": False,
                      "unchecked": [], "sampled_tensors": 1}

    class Stub:
        fed = FedBatches()
        _new_tokens = None
        state = type("State", (), {"log_history": history})()

    class Timer:
        _tokens_run = 0

        def report(self):
            return {}

    _, lines = meter_summary(Stub(), Timer(), check, batching="padded", dtype="fp32",
                             recorded={"peak_cpu_rss_mb": 1.0})
    warnings = [line for line in lines if "did it train?" in line]
    assert len(warnings) == 3 and any("gradient norm was 0" in w for w in warnings)

    with torch.no_grad():
        weight.add_(1.0)
    check.on_train_end(None, None, None)
    report = check.report([{"loss": 2.0, "grad_norm": 0.5}, {"loss": 1.0, "grad_norm": 0.4}])
    assert report["ok"] and report["parameters_changed"] and report["loss_fell"]
