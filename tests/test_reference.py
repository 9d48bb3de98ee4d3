"""The dense reference against an independent naive weighted-softmax loop."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ring_attention as ra
from tests.inputs import qkv
from tests.strategies import cases, naive_attention, naive_weights


def _qkv(b=2, n=8, h=4, hkv=2, d=4, **kwargs):
    return qkv(b, n, h, hkv, d, **kwargs)


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
    g = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(case.seed))
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


# --- non-finite inputs: a zero weight contributes exactly nothing, forward and backward -----

NON_FINITE = (float("nan"), float("inf"), float("-inf"))


@st.composite
def poisoned_cases(draw, max_seq_len=12):
    """A float64 case, and 1-3 non-finite entries (or whole rows) planted in q, k or v."""
    case = draw(cases(dtypes=(torch.float64,), max_seq_len=max_seq_len, heads=(1, 2, 4)))
    spots = draw(st.lists(
        st.tuples(
            st.sampled_from((0, 1, 2)),  # q, k or v
            st.integers(0, case.batch - 1),
            st.integers(0, case.seq_len - 1),
            st.integers(0, 7),  # head, modulo the tensor's head count
            st.one_of(st.none(), st.integers(0, case.head_dim - 1)),  # None: the whole row
            st.sampled_from(NON_FINITE),
        ),
        min_size=1, max_size=3,
    ))
    return case, spots


def _poison(tensors, spots):
    out = [t.detach().clone() for t in tensors]
    for which, b, i, h, d, value in spots:
        t = out[which]
        t[b, i, h % t.shape[2], slice(None) if d is None else d] = value
    return out


def _reached(w, q, k, v):
    """``[B, N, H, D]``: which output entries a non-finite input can reach, by SEMANTICS.md.

    Entry ``(b, i, h, d)`` depends on ``q[b, i, h]`` and on ``k[b, j, kv]``, ``v[b, j, kv, d]``
    for the keys with ``W[h, i, j] > 0`` only; a row without such keys is 0 whatever the inputs.
    """
    bsz, n, h, d = q.shape
    group = h // k.shape[2]
    kept = (w > 0).double()  # [H, N, N]
    bad_q = ~q.isfinite().all(-1)  # [B, N, H]
    bad_k = (~k.isfinite().all(-1)).repeat_interleave(group, dim=2).double()  # [B, N, H]
    bad_v = (~v.isfinite()).repeat_interleave(group, dim=2).double()  # [B, N, H, D]
    has_keys = (w.sum(-1) > 0).T  # [N, H]
    row = (bad_q | (torch.einsum("hij,bjh->bih", kept, bad_k) > 0)) & has_keys
    col = torch.einsum("hij,bjhd->bihd", kept, bad_v) > 0
    return row[..., None] | col


@given(poisoned_cases(max_seq_len=10))
def test_reference_with_non_finite_inputs_matches_naive_and_leaves_other_rows_alone(poisoned):
    case, spots = poisoned
    clean = case.qkv()
    q, k, v = _poison(clean, spots)
    w = naive_weights(case.pattern, case.seq_len, case.heads, case.causal)
    kw = dict(pattern=case.pattern, causal=case.causal)
    out = ra.reference_attention(q, k, v, **kw)
    # the naive loop gathers each row's weighted keys: dropped keys never enter
    torch.testing.assert_close(out, naive_attention(q, k, v, w), rtol=1e-10, atol=1e-10, equal_nan=True)
    # every entry no planted value can reach is what the clean inputs give (rows without keys: 0)
    reached = _reached(w, q, k, v)
    assert reached.any() or not out.isnan().any()
    torch.testing.assert_close(out[~reached], ra.reference_attention(*clean, **kw)[~reached], rtol=0, atol=0)


@given(poisoned_cases(max_seq_len=8))
def test_reference_gradients_with_non_finite_inputs_match_naive(poisoned):
    case, spots = poisoned
    q, k, v = (t.requires_grad_() for t in _poison(case.qkv(), spots))
    w = naive_weights(case.pattern, case.seq_len, case.heads, case.causal)
    g = qkv(case.batch, case.seq_len, case.heads, case.kv_heads, case.head_dim, seed=case.seed, grad_out=True)[3]
    out = ra.reference_attention(q, k, v, pattern=case.pattern, causal=case.causal)
    grads = torch.autograd.grad(out, (q, k, v), g)
    expected = torch.autograd.grad(naive_attention(q, k, v, w), (q, k, v), g)
    for name, a, e in zip("qkv", grads, expected):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-10, equal_nan=True, msg=lambda m, n=name: f"d{n}: {m}")


DILATED = ra.DilatedPattern((4, 8), (2, 4), mode="mixture")


@pytest.mark.parametrize("pattern, causal", [(None, True), (DILATED, False), (DILATED, True)])
@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("value", NON_FINITE, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_one_non_finite_row_shows_exactly_where_its_weight_is_non_zero(pattern, causal, which, value, dtype):
    """One row of q, k or v set to NaN / inf: the rows that give it weight are non-finite, all
    others equal the clean result (the issue: one NaN row of v made every output row NaN)."""
    clean = _qkv(b=1, n=8, h=4, hkv=2, d=4, dtype=dtype)
    j, head = 5, 1  # position 5 of head 1 (query head 1, or kv head 1 = query heads 2 and 3)
    poisoned = [t.clone() for t in clean]
    poisoned["qkv".index(which)][0, j, head] = value
    kw = dict(pattern=pattern, causal=causal)
    out = ra.reference_attention(*poisoned, **kw)
    w = naive_weights(pattern, 8, 4, causal)
    if which == "q":
        hit = torch.zeros(8, 4, dtype=torch.bool)
        hit[j, head] = bool(w[head, j].any())
    else:  # rows of query heads 2 and 3 that give key j a non-zero weight
        hit = (w[:, :, j] > 0).T & (torch.arange(4) // 2 == head)
    assert hit.any() and not hit.all()
    assert not out[0][hit].isfinite().any(), "a row that weights the bad value must show it"
    torch.testing.assert_close(out[0][~hit], ra.reference_attention(*clean, **kw)[0][~hit], rtol=0, atol=0)


@pytest.mark.parametrize("value", NON_FINITE, ids=["nan", "inf", "-inf"])
def test_non_finite_upstream_gradient_of_a_row_without_keys_passes_nothing(value):
    """Rows no pair keeps output 0 and pass no gradient: a NaN upstream gradient there (the
    issue: it leaked into dv through p = 0) changes no gradient."""
    p = ra.DilatedPattern((4,), (2,))  # head 0 keeps even rows, head 1 odd rows
    q, k, v = _qkv(b=2, n=8, h=2, hkv=1, d=4, requires_grad=True)
    g = qkv(2, 8, 2, 1, 4, seed=1, grad_out=True)[3]
    empty = torch.zeros_like(g, dtype=torch.bool)
    empty[:, 1::2, 0] = True
    empty[:, 0::2, 1] = True
    out = ra.reference_attention(q, k, v, pattern=p, causal=True)
    clean = torch.autograd.grad(out, (q, k, v), g.masked_fill(empty, 0.0), retain_graph=True)
    poisoned = torch.autograd.grad(out, (q, k, v), g.masked_fill(empty, value))
    for name, a, b in zip("qkv", poisoned, clean):
        assert a.isfinite().all(), f"d{name} picked up the upstream {value} of an empty row"
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_non_finite_upstream_gradient_reaches_exactly_the_keys_its_row_attends():
    q, k, v = _qkv(b=1, n=8, h=1, hkv=1, d=4, requires_grad=True)
    g = torch.zeros(1, 8, 1, 4, dtype=torch.float64)
    g[0, 3, 0, 1] = float("nan")  # causal row 3 attends keys 0..3
    dq, dk, dv = torch.autograd.grad(ra.reference_attention(q, k, v, causal=True), (q, k, v), g)
    rows = torch.arange(8)
    assert dq[0, 3].isnan().all() and not dq[0, rows != 3].isnan().any()
    assert dk[0, :4].isnan().all() and not dk[0, 4:].isnan().any()
    assert dv[0, :4, 0, 1].isnan().all() and not dv[0, 4:].isnan().any()
    assert not dv[0, :, :, [0, 2, 3]].isnan().any()


@given(cases(dtypes=(torch.float64,), max_seq_len=24), st.data())
def test_query_rows_are_the_full_references_rows(case, data):
    """``query_rows=`` computes those rows of the full result, any order, repeats allowed, and
    their gradients are the full reference's with the upstream gradient on those rows only."""
    n = case.seq_len
    rows = torch.tensor(data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=2 * n)))
    q, k, v = case.qkv(requires_grad=True)
    kwargs = dict(pattern=case.pattern, causal=case.causal)
    full = ra.reference_attention(q, k, v, **kwargs)
    some = ra.reference_attention(q, k, v, query_rows=rows, **kwargs)
    assert some.shape == (q.shape[0], len(rows), *q.shape[2:]) and some.dtype == q.dtype
    torch.testing.assert_close(some, full[:, rows], rtol=0, atol=1e-12)
    g = torch.randn(some.shape, dtype=some.dtype)
    grads = torch.autograd.grad((some * g).sum(), (q, k, v))
    expected = torch.autograd.grad((full[:, rows] * g).sum(), (q, k, v))
    for a, e in zip(grads, expected):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-12)


def test_query_rows_accepts_sequences_and_nothing():
    q, k, v = _qkv()
    full = ra.reference_attention(q, k, v, causal=True)
    torch.testing.assert_close(ra.reference_attention(q, k, v, causal=True, query_rows=[7, 0]), full[:, [7, 0]])
    assert ra.reference_attention(q, k, v, query_rows=[]).shape == (2, 0, 4, 4)


@pytest.mark.parametrize("rows, error", [
    ([8], ValueError), ([-1], ValueError), ([[0, 1]], ValueError), ([0.5], TypeError), ([True], TypeError),
])
def test_query_rows_refuses_what_is_not_a_list_of_positions(rows, error):
    q, k, v = _qkv()
    with pytest.raises(error, match="query_rows"):
        ra.reference_attention(q, k, v, query_rows=rows)


def _band(n: int, left: int, right: int) -> torch.Tensor:
    """``[N, N]`` int: 1 where ``i - left <= j <= i + right`` (a side of -1 unbounded), by a loop."""
    band = torch.zeros(n, n, dtype=torch.int64)
    for i in range(n):
        for j in range(n):
            band[i, j] = int((left < 0 or j >= i - left) and (right < 0 or j <= i + right))
    return band


@given(cases(dtypes=(torch.float64,), max_seq_len=16, max_batch=1), st.integers(-1, 5), st.integers(-1, 5))
def test_a_window_restricts_the_patterns_weights_to_the_band(case, left, right):
    """SEMANTICS.md: W is the pattern's (and causal's) weights times the band, forward and backward."""
    q, k, v = (t.requires_grad_() for t in case.qkv())
    w = naive_weights(case.pattern, case.seq_len, case.heads, case.causal) * _band(case.seq_len, left, right)
    out = ra.reference_attention(q, k, v, pattern=case.pattern, causal=case.causal, window=(left, right))
    expected = naive_attention(q, k, v, w)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    for a, e in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(expected, (q, k, v), g)):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-10)


def test_transformers_sliding_window_is_a_causal_window_of_w_minus_one():
    """transformers keeps keys j > i - W (and j <= i): window=(W - 1, 0) with causal."""
    q, k, v = _qkv(n=12)
    size = 4
    kept = torch.tensor([[int(i - size < j <= i) for j in range(12)] for i in range(12)])
    expected = naive_attention(q, k, v, kept.expand(4, 12, 12))
    got = ra.reference_attention(q, k, v, causal=True, window=(size - 1, 0))
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    unbounded = ra.reference_attention(q, k, v, causal=True, window=(-1, -1))
    torch.testing.assert_close(unbounded, ra.reference_attention(q, k, v, causal=True), rtol=0, atol=0)


@pytest.mark.parametrize("window, error", [
    ((2,), TypeError), ("(1, 1)", TypeError), ((1.0, 1), TypeError), ((-2, 0), ValueError), ((0, -5), ValueError),
])
def test_a_bad_window_is_refused_naming_it(window, error):
    q, k, v = _qkv()
    with pytest.raises(error, match="window"):
        ra.reference_attention(q, k, v, window=window)
