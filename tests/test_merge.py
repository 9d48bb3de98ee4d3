"""Log-sum-exp merge of partials: exact union, algebra, masked rows, large LSE."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ring_attention.merge import accumulation_dtype, merge, merge_into_


def _partial(q, k, v, scale):
    """``(out, lse)`` of softmax attention of ``q [M, D]`` over keys ``k, v [L, D]`` (plain math)."""
    s = (q @ k.T) * scale
    lse = torch.logsumexp(s, dim=-1)
    return torch.exp(s - lse[:, None]) @ v, lse


@given(
    st.integers(0, 2**31 - 1),
    st.integers(1, 12),
    st.integers(1, 12),
    st.integers(1, 12),
    st.sampled_from([torch.float32, torch.float64]),
)
def test_merge_of_disjoint_partials_is_union(seed, m, la, lb, dtype):
    torch.manual_seed(seed)
    d = 8
    q = torch.randn(m, d, dtype=torch.float64)
    k = torch.randn(la + lb, d, dtype=torch.float64) * 2
    v = torch.randn(la + lb, d, dtype=torch.float64)
    perm = torch.randperm(la + lb)  # disjoint, interleaved key subsets
    ia, ib = perm[:la], perm[la:]
    oa, sa = _partial(q, k[ia], v[ia], 0.5)
    ob, sb = _partial(q, k[ib], v[ib], 0.5)
    o_full, s_full = _partial(q, k, v, 0.5)
    out, lse = merge(oa.to(dtype), sa.to(dtype), ob.to(dtype), sb.to(dtype))
    assert out.dtype == dtype and lse.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out.double(), o_full, rtol=tol, atol=tol)
    torch.testing.assert_close(lse.double(), s_full, rtol=tol, atol=tol)


def _three(seed, m=5, d=4):
    torch.manual_seed(seed)
    parts = []
    for _ in range(3):
        parts.append((torch.randn(m, d, dtype=torch.float64), torch.randn(m, dtype=torch.float64) * 3))
    # some rows see no key in some partials
    parts[0][1][0] = float("-inf")
    parts[0][0][0] = 0
    parts[1][1][1] = float("-inf")
    parts[1][0][1] = 0
    return parts


@given(st.integers(0, 2**31 - 1))
def test_merge_commutative_and_associative(seed):
    (a, la), (b, lb), (c, lc) = _three(seed)
    ab = merge(a, la, b, lb)
    ba = merge(b, lb, a, la)
    torch.testing.assert_close(ab[0], ba[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ab[1], ba[1], rtol=1e-12, atol=1e-12)
    left = merge(*ab, c, lc)
    right = merge(a, la, *merge(b, lb, c, lc))
    torch.testing.assert_close(left[0], right[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(left[1], right[1], rtol=1e-12, atol=1e-12)
    # independent closed form: weights softmax over the lse's
    lses = torch.stack([la, lb, lc], dim=-1)
    wts = torch.softmax(lses, dim=-1)
    expected = a * wts[:, :1] + b * wts[:, 1:2] + c * wts[:, 2:]
    torch.testing.assert_close(left[0], expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(left[1], torch.logsumexp(lses, -1), rtol=1e-12, atol=1e-12)


def test_merge_with_one_empty_side_is_identity():
    a, la = torch.randn(3, 4), torch.randn(3)
    empty_o, empty_l = torch.zeros(3, 4), torch.full((3,), float("-inf"))
    for out, lse in (merge(a, la, empty_o, empty_l), merge(empty_o, empty_l, a, la)):
        torch.testing.assert_close(out, a, rtol=0, atol=0)
        torch.testing.assert_close(lse, la, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_merge_both_masked_rows_are_zero_without_nan(dtype):
    # An empty partial is (0, -inf): what the kernels give a row without keys and what
    # the accumulators start from.
    oa = torch.randn(4, 3, dtype=dtype)
    ob = torch.randn(4, 3, dtype=dtype)
    la = torch.tensor([float("-inf"), 0.5, float("-inf"), 1.0], dtype=dtype)
    lb = torch.tensor([float("-inf"), float("-inf"), 2.0, 1.0], dtype=dtype)
    oa[la == float("-inf")] = 0
    ob[lb == float("-inf")] = 0
    out, lse = merge(oa, la, ob, lb)
    assert not out.isnan().any() and not lse.isnan().any()
    assert bool((out[0] == 0).all())
    assert lse[0] == float("-inf")
    torch.testing.assert_close(out[1], oa[1], rtol=0, atol=0)
    torch.testing.assert_close(out[2], ob[2], rtol=0, atol=0)
    assert math.isclose(float(lse[3]), 1.0 + math.log(2.0), rel_tol=1e-6)


def test_merge_into_matches_merge_including_masked_rows():
    torch.manual_seed(0)
    oa, ob = torch.randn(2, 5, 3, 4), torch.randn(2, 5, 3, 4)
    la, lb = torch.randn(2, 5, 3) * 10, torch.randn(2, 5, 3) * 10
    la[0, 0, 0] = lb[0, 0, 0] = float("-inf")
    oa[0, 0, 0] = ob[0, 0, 0] = 0
    la[1, 2, 1] = float("-inf")
    oa[1, 2, 1] = 0
    expected = merge(oa, la, ob, lb)
    # accumulators as strided views of a larger tensor, like the packed kernels use
    big_o = torch.zeros(2, 10, 3, 4)
    big_l = torch.zeros(2, 10, 3)
    big_o[:, ::2] = oa
    big_l[:, ::2] = la
    merge_into_(big_o[:, ::2], big_l[:, ::2], ob, lb)
    torch.testing.assert_close(big_o[:, ::2], expected[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(big_l[:, ::2], expected[1], rtol=1e-6, atol=1e-6)
    assert bool((big_o[:, 1::2] == 0).all())  # other rows untouched
    assert not big_o.isnan().any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_merge_large_lse_no_overflow(dtype):
    oa, ob = torch.ones(3, 2, dtype=dtype), -torch.ones(3, 2, dtype=dtype)
    la = torch.tensor([1e4, 1e4, 1e4], dtype=dtype)
    lb = torch.tensor([1e4, 1e4 - 1.0, float("-inf")], dtype=dtype)
    out, lse = merge(oa, la, ob, lb)
    assert out.isfinite().all() and lse.isfinite().all()
    torch.testing.assert_close(out[0], torch.zeros(2, dtype=dtype), rtol=0, atol=1e-6)
    wa = 1 / (1 + math.exp(-1.0))
    torch.testing.assert_close(out[1], torch.full((2,), 2 * wa - 1, dtype=dtype), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[2], oa[2])
    torch.testing.assert_close(
        lse.double(), torch.tensor([1e4 + math.log(2), 1e4 + math.log1p(math.exp(-1)), 1e4], dtype=torch.float64),
        rtol=1e-6, atol=1e-3,
    )
    # large negative (but finite) lse on both sides: no underflow to 0/0
    out, lse = merge(oa, -la, ob, -lb.nan_to_num(neginf=-1e4))
    assert out.isfinite().all() and lse.isfinite().all()


def test_merge_half_inputs_accumulate_in_float32():
    oa, ob = torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(4, 8, dtype=torch.float16)
    la, lb = torch.randn(4), torch.randn(4)
    out, lse = merge(oa, la, ob, lb)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert accumulation_dtype(torch.float16) == torch.float32
    assert accumulation_dtype(torch.bfloat16) == torch.float32
    assert accumulation_dtype(torch.float32) == torch.float32
    assert accumulation_dtype(torch.float64) == torch.float64
