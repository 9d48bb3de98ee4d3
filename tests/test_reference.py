"""The dense reference against an independent naive weighted-softmax loop."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ring_attention as ra
from tests.strategies import cases, naive_attention, naive_weights


def _rand(*shape, dtype=torch.float64, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)


def _qkv(b=2, n=8, h=4, hkv=2, d=4, dtype=torch.float64, seed=0, requires_grad=False):
    return (
        _rand(b, n, h, d, dtype=dtype, seed=seed, requires_grad=requires_grad),
        _rand(b, n, hkv, d, dtype=dtype, seed=seed + 1, requires_grad=requires_grad),
        _rand(b, n, hkv, d, dtype=dtype, seed=seed + 2, requires_grad=requires_grad),
    )


@given(cases(dtypes=(torch.float64,), max_seq_len=24), st.sampled_from([None, 0.0, 0.37, 2.0]))
def test_reference_matches_naive(case, scale):
    q, k, v = case.qkv()
    w = naive_weights(case.pattern, case.seq_len, case.heads, case.causal)
    out = ra.reference_attention(q, k, v, pattern=case.pattern, causal=case.causal, scale=scale)
    expected = naive_attention(q, k, v, w, scale=scale)
    assert out.dtype == torch.float64 and out.shape == q.shape
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    # rows no pair keeps are exactly zero
    empty = (w.sum(-1) == 0).T  # [N, H]
    assert bool((out[:, empty] == 0).all())


@given(cases(dtypes=(torch.float64,), max_seq_len=16, max_batch=1))
def test_reference_gradients_match_naive(case):
    q, k, v = case.qkv(requires_grad=True)
    w = naive_weights(case.pattern, case.seq_len, case.heads, case.causal)
    g = torch.randn(q.shape, dtype=torch.float64)
    out = ra.reference_attention(q, k, v, pattern=case.pattern, causal=case.causal)
    grads = torch.autograd.grad((out * g).sum(), (q, k, v))
    expected = torch.autograd.grad((naive_attention(q, k, v, w) * g).sum(), (q, k, v))
    for a, e in zip(grads, expected):
        assert not a.isnan().any()
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("causal", [False, True])
def test_reference_full_attention_matches_softmax(causal):
    q, k, v = _qkv(h=2, hkv=2)
    s = torch.einsum("bihd,bjhd->bhij", q, k) / 2.0  # D=4 -> 1/sqrt(4)
    if causal:
        s = s.masked_fill(~torch.ones(8, 8, dtype=torch.bool).tril(), float("-inf"))
    expected = torch.einsum("bhij,bjhd->bihd", s.softmax(-1), v)
    torch.testing.assert_close(ra.reference_attention(q, k, v, causal=causal), expected)


def test_reference_causal_first_row_is_first_value():
    q, k, v = _qkv(hkv=4)
    out = ra.reference_attention(q, k, v, causal=True)
    torch.testing.assert_close(out[:, 0], v[:, 0], rtol=0, atol=1e-15)


def test_reference_scale_zero_is_weighted_mean():
    # scale 0: every score is 0, so O = sum_j W v_j / sum_j W (mixture double counts)
    p = ra.DilatedPattern((4, 8), (1, 2))
    q, k, v = _qkv(b=1, n=8, h=2, hkv=1)
    out = ra.reference_attention(q, k, v, pattern=p, scale=0.0)
    w = naive_weights(p, 8, 2, False).double()
    for h in range(2):
        denom = w[h].sum(-1, keepdim=True)
        expected = torch.where(denom > 0, (w[h] @ v[0, :, 0]) / denom.clamp_min(1), 0.0)
        torch.testing.assert_close(out[0, :, h], expected)


def test_reference_custom_scale():
    q, k, v = _qkv()
    a = ra.reference_attention(q, k, v, scale=0.25)
    b = ra.reference_attention(q * 0.5, k, v)  # default 1/sqrt(4) = 0.5
    torch.testing.assert_close(a, b)
    c = ra.reference_attention(q, k, v)
    assert not torch.allclose(a, c)


def test_reference_gqa_equals_repeated_kv():
    p = ra.DilatedPattern((4, 8), (1, 2), mode="head_groups")
    q, k, v = _qkv(h=6, hkv=2)
    out = ra.reference_attention(q, k, v, pattern=p, causal=True)
    kx, vx = k.repeat_interleave(3, dim=2), v.repeat_interleave(3, dim=2)
    torch.testing.assert_close(out, ra.reference_attention(q, kx, vx, pattern=p, causal=True))
    # query head h reads kv head h // 3, not h % 2
    single = ra.reference_attention(q[:, :, 1:2], k[:, :, 0:1], v[:, :, 0:1], causal=True)
    full = ra.reference_attention(q, k, v, causal=True)
    torch.testing.assert_close(full[:, :, 1:2], single)


def test_reference_fully_masked_rows_zero_and_no_nan_grads():
    # rate 2 over segment 4: head 0 keeps even rows, head 1 odd rows; the others are empty
    p = ra.DilatedPattern((4,), (2,))
    q, k, v = _qkv(h=2, hkv=1, requires_grad=True)
    out = ra.reference_attention(q, k, v, pattern=p, causal=True)
    assert not out.isnan().any()
    assert bool((out[:, 1::2, 0] == 0).all()) and bool((out[:, 0::2, 1] == 0).all())
    assert bool((out[:, 0::2, 0] != 0).all())
    out.sum().backward()
    for t in (q, k, v):
        assert not t.grad.isnan().any() and t.grad.isfinite().all()
    assert bool((q.grad[:, 1::2, 0] == 0).all()) and bool((q.grad[:, 0::2, 1] == 0).all())
    # unselected keys pass no gradient either
    assert bool((v.grad[:, :, 0] != 0).all())  # each position is kept by some head


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_reference_returns_input_dtype_computed_in_float32(dtype):
    q, k, v = _qkv(dtype=dtype)
    out = ra.reference_attention(q, k, v, causal=True)
    assert out.dtype == dtype
    expected = ra.reference_attention(q.double(), k.double(), v.double(), causal=True)
    tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-6}[dtype]
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)


def test_reference_large_logits_finite():
    q, k, v = _qkv(requires_grad=False)
    q = (q * 1e3).requires_grad_()
    out = ra.reference_attention(q, k, v, causal=True)
    assert out.isfinite().all()
    out.sum().backward()
    assert q.grad.isfinite().all()
