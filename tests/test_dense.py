"""dense_attention (torch SDPA) against the reference: causal, GQA, scale, gradients."""

import pytest
import torch

import ring_attention as ra
from tests.inputs import qkv
from tests.strategies import naive_attention, naive_weights

SHAPES = [(1, 1, 1, 1, 4), (2, 9, 4, 4, 8), (2, 16, 6, 2, 16), (1, 33, 8, 1, 4)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("scale", [None, 0.1])
def test_dense_matches_reference(shape, causal, scale):
    q, k, v = qkv(*shape)
    out = ra.dense_attention(q, k, v, causal=causal, scale=scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    expected = ra.reference_attention(q, k, v, causal=causal, scale=scale)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_dense_matches_naive_loop():
    q, k, v = qkv(2, 10, 4, 2, 8)
    w = naive_weights(None, 10, 4, True)
    torch.testing.assert_close(ra.dense_attention(q, k, v, causal=True), naive_attention(q, k, v, w))


@pytest.mark.parametrize("shape", SHAPES[1:])
@pytest.mark.parametrize("causal", [False, True])
def test_dense_gradients_match_reference(shape, causal):
    q, k, v = qkv(*shape, requires_grad=True)
    g = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    got = torch.autograd.grad((ra.dense_attention(q, k, v, causal=causal) * g).sum(), (q, k, v))
    expected = torch.autograd.grad((ra.reference_attention(q, k, v, causal=causal) * g).sum(), (q, k, v))
    for a, e in zip(got, expected):
        assert a.shape == e.shape
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dense_low_precision(dtype):
    q, k, v = qkv(2, 16, 4, 2, 8, dtype=dtype)
    out = ra.dense_attention(q, k, v, causal=True)
    assert out.dtype == dtype
    expected = ra.reference_attention(q.double(), k.double(), v.double(), causal=True)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)


def test_dense_gradcheck():
    q, k, v = qkv(1, 5, 2, 1, 4, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v: ra.dense_attention(q, k, v, causal=True), (q, k, v))


@pytest.mark.parametrize("scale", [0.0, -0.5])
def test_causal_with_non_positive_scale_matches_reference(scale):
    # SDPA multiplies its causal -inf mask by the scale: 0 * -inf is NaN without the fold
    q, k, v = (torch.randn(1, 24, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = ra.dense_attention(q, k, v, causal=True, scale=scale)
    ref = ra.reference_attention(q, k, v, causal=True, scale=scale)
    torch.testing.assert_close(out, ref)
    g = torch.autograd.grad(out.sum(), (q, k, v))
    e = torch.autograd.grad(ref.sum(), (q, k, v))
    for a, b in zip(g, e):
        torch.testing.assert_close(a, b)
