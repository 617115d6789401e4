"""The call into PyTorch's varlen FlashAttention (CUDA only) checked on a CPU, against a stand-in kernel.

``torch.nn.attention.varlen.varlen_attn`` runs only on CUDA, and its keywords changed between torch releases
(``window_size``/``enable_gqa`` in newer ones, ``is_causal`` in older ones). Each stand-in below has one of the two
signatures and computes what the real kernel computes, sample by sample, so the layout, the causal window, the
grouped-query heads and the scale that ``_cuda_varlen`` passes are checked against plain per-sample SDPA.
"""

import inspect

import pytest
import torch
import torch.nn.functional as F

from tunelab.models import packed_attention

BOUNDS = [0, 5, 12, 15]  # three samples of 5, 7 and 3 tokens in one flat row


def per_sample(query, key, value, window):
    """``[T, heads, d]`` -> ``[T, heads, d]``: attention within each sample, query i over keys i-window+1 .. i."""
    outputs = []
    for start, end in zip(BOUNDS[:-1], BOUNDS[1:], strict=True):
        q, k, v = (t[start:end].transpose(0, 1) for t in (query, key, value))
        rows = torch.arange(end - start)
        allowed = rows[None, :] <= rows[:, None]
        if window is not None:
            allowed &= rows[None, :] > rows[:, None] - window
        outputs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=0.3).transpose(0, 1))
    return torch.cat(outputs)


def new_kernel(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
               window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    assert cu_seq_q.dtype == torch.int32 and cu_seq_q.tolist() == BOUNDS and max_q == max_k == 7 and scale == 0.3
    left, right = window_size
    assert right == 0  # causal
    if enable_gqa:
        key, value = (t.repeat_interleave(query.shape[1] // t.shape[1], dim=1) for t in (key, value))
    assert key.shape[1] == query.shape[1]
    return per_sample(query, key, value, None if left < 0 else left + 1)


def old_kernel(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, is_causal=False):
    assert is_causal and key.shape[1] == query.shape[1]  # no grouped-query support: heads come repeated
    return per_sample(query, key, value, None)


@pytest.fixture
def kernel(monkeypatch):
    import torch.nn.attention.varlen as varlen

    def use(fake):
        monkeypatch.setattr(varlen, "varlen_attn", fake)
        monkeypatch.setattr(packed_attention, "_VARLEN", {"usable": True, "params": None})

    return use


def flat_row(heads=4, kv_heads=2):
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(1, n, BOUNDS[-1], 8, generator=generator) for n in (heads, kv_heads, kv_heads)]


def expected(query, key, value, window=None):
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    return per_sample(q, k, v, window).unsqueeze(0)


@pytest.mark.parametrize("fake", [new_kernel, old_kernel], ids=["window_size+enable_gqa", "is_causal"])
def test_the_row_goes_to_the_kernel_as_each_torch_release_names_it(kernel, fake):
    kernel(fake)
    query, key, value = flat_row()
    out = packed_attention._cuda_varlen(query, key, value, BOUNDS, None, 0.3, None, gqa=True)
    assert out is not None and out.shape == (1, BOUNDS[-1], 4, 8)
    assert torch.allclose(out, expected(query, key, value), atol=1e-6)
    assert packed_attention._VARLEN["usable"]


def test_a_sliding_window_needs_window_size(kernel):
    query, key, value = flat_row()
    kernel(new_kernel)
    out = packed_attention._cuda_varlen(query, key, value, BOUNDS, None, 0.3, 3, gqa=True)
    assert torch.allclose(out, expected(query, key, value, window=3), atol=1e-6)
    kernel(old_kernel)  # no way to pass a window: the per-sample loop takes it, and the kernel stays usable
    assert packed_attention._cuda_varlen(query, key, value, BOUNDS, None, 0.3, 3, gqa=True) is None
    assert packed_attention._VARLEN["usable"]


def test_the_signature_is_read_once_and_a_failure_disables_the_kernel(kernel, monkeypatch):
    kernel(new_kernel)
    reads = []
    real_signature = inspect.signature
    monkeypatch.setattr(inspect, "signature", lambda f: reads.append(f) or real_signature(f))
    query, key, value = flat_row()
    for _ in range(3):
        packed_attention._cuda_varlen(query, key, value, BOUNDS, None, 0.3, None, gqa=True)
    assert len(reads) == 1

    def failing(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                enable_gqa=False):
        raise RuntimeError("FlashAttention only supports head dimensions up to 256")

    kernel(failing)
    assert packed_attention._cuda_varlen(query, key, value, BOUNDS, None, 0.3, None, gqa=True) is None
    assert not packed_attention._VARLEN["usable"]
