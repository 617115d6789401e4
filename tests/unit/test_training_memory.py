"""What the training process holds besides the model: imports on the `tunelab train` path, the dataset, the loss."""

import json
import subprocess
import sys
from array import array

import pytest
import torch
import torch.nn.functional as F

from tunelab.data.collate import PaddedCollator, training_features
from tunelab.data.packing import FlatCollator, pack_rows
from tunelab.data.tokenize import IGNORE_INDEX, Example
from tunelab.train.loss import _LinearCrossEntropySum

# Imported by other commands (report, serve, evaluate's judge): none of them may load before or during training.
NOT_ON_THE_TRAINING_PATH = ("matplotlib", "fastapi", "uvicorn", "starlette", "sklearn", "openai", "tunelab.serve")


def test_the_training_entry_point_imports_no_plotting_or_serving_stack():
    # A fresh interpreter: this test process has imported everything by now.
    code = (
        "import sys, json; import tunelab.cli; from tunelab.train.run import run_training; "
        "import tunelab.workflow; "
        f"print(json.dumps(sorted(m for m in {NOT_ON_THE_TRAINING_PATH!r} if m in sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_training_features_hold_four_bytes_a_token_and_collate_to_the_same_batches():
    examples = [Example(input_ids=list(range(300 + 50 * i, 300 + 50 * i + n)),
                        labels=[IGNORE_INDEX] * (n // 2) + list(range(300 + 50 * i + n // 2, 300 + 50 * i + n)),
                        source=f"f.jsonl:{i}") for i, n in enumerate((7, 3, 12, 5))]
    as_lists = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
    features = training_features(examples)
    for feature, example in zip(features, examples, strict=True):
        assert isinstance(feature["input_ids"], array) and feature["input_ids"].itemsize == 4
        assert list(feature["input_ids"]) == example.input_ids and list(feature["labels"]) == example.labels
    for collator in (FlatCollator(), PaddedCollator(pad_token_id=0)):
        got, expected = collator(features), collator(as_lists)
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(got[key], value) if isinstance(value, torch.Tensor) else got[key] == value
    assert [{k: list(v) for k, v in row.items()} for row in pack_rows(features, 16)] == pack_rows(as_lists, 16)
    with pytest.raises(OverflowError):  # an id that does not fit is an error, never a silent wrap-around
        training_features([Example(input_ids=[2**31], labels=[2**31], source="x")])


def _previous_forward(hidden, weight, bias, targets, chunk_rows):
    """The lean loss's forward before it computed the softmax in place (kept here as the numerical reference)."""
    total = torch.zeros((), dtype=torch.float32)
    grad_hidden = torch.empty_like(hidden)
    grad_weight = torch.zeros_like(weight, dtype=torch.float32)
    grad_bias = torch.zeros_like(bias, dtype=torch.float32) if bias is not None else None
    for start in range(0, hidden.shape[0], chunk_rows):
        end = min(start + chunk_rows, hidden.shape[0])
        piece, wanted = hidden[start:end], targets[start:end]
        logits = F.linear(piece, weight, bias).float()
        log_z = torch.logsumexp(logits, dim=-1)
        total += (log_z - logits.gather(1, wanted[:, None]).squeeze(1)).sum()
        grad = torch.exp(logits.sub_(log_z[:, None]))
        grad[torch.arange(end - start), wanted] -= 1.0
        grad = grad.to(hidden.dtype)
        grad_hidden[start:end] = grad @ weight
        grad_weight += (grad.t() @ piece).float()
        if grad_bias is not None:
            grad_bias += grad.float().sum(0)
    return total, grad_hidden, grad_weight, grad_bias


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_lean_loss_gives_bit_identical_losses_and_gradients(dtype, with_bias):
    torch.manual_seed(0)
    hidden = torch.randn(37, 24, dtype=dtype)
    weight = torch.randn(90, 24, dtype=dtype)
    bias = torch.randn(90, dtype=dtype) if with_bias else None
    targets = torch.randint(0, 90, (37,))
    total, grad_hidden, grad_weight, grad_bias = _previous_forward(hidden, weight, bias, targets, chunk_rows=8)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    b = bias.clone().requires_grad_() if bias is not None else None
    got = _LinearCrossEntropySum.apply(h, w, b, targets, 8)  # 5 chunks, the last one short
    assert torch.equal(got, total)
    got.backward()
    assert torch.equal(h.grad, grad_hidden) and torch.equal(w.grad, grad_weight.to(dtype))
    if with_bias:
        assert torch.equal(b.grad, grad_bias.to(dtype))
