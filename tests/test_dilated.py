"""dilated_attention against the dense reference: properties over shapes and patterns."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ring_attention as ra
from ring_attention import pattern as P
from tests.inputs import check_against_reference, leaves, qkv
from tests.strategies import cases

FULL_PRECISION = dict(dtypes=(torch.float32, torch.float64))
HALF = dict(dtypes=(torch.float16, torch.bfloat16))


def _tol(dtype):
    return {
        torch.float64: dict(rtol=1e-9, atol=1e-10),
        torch.float32: dict(rtol=1e-4, atol=2e-5),
    }[dtype]


def _empty_rows(case):
    """``[N, H]`` bool: rows that no pair selects for a head (W row all zero)."""
    w = P.weights(case.pattern, case.seq_len, case.heads, is_causal=case.causal)
    return (w.sum(-1) == 0).T


@given(cases(**FULL_PRECISION), st.sampled_from([None, 0.5]))
def test_dilated_matches_reference_forward_and_grads(case, scale):
    q, k, v = case.qkv(requires_grad=True)
    out = ra.dilated_attention(q, k, v, case.pattern, causal=case.causal, scale=scale)
    assert out.shape == q.shape and out.dtype == case.dtype

    ref_in = leaves((q, k, v), torch.float64)
    ref = ra.reference_attention(*ref_in, pattern=case.pattern, causal=case.causal, scale=scale)
    torch.testing.assert_close(out.double(), ref, **_tol(case.dtype))

    empty = _empty_rows(case)
    assert bool((out[:, empty] == 0).all()), "rows no pair selects must be exactly 0"

    g = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(case.seed))
    grads = torch.autograd.grad((out * g.to(case.dtype)).sum(), (q, k, v))
    expected = torch.autograd.grad((ref * g).sum(), ref_in)
    for name, a, e in zip("qkv", grads, expected):
        assert a.dtype == case.dtype, name
        assert a.isfinite().all(), name
        tol = _tol(case.dtype) if case.dtype == torch.float64 else dict(rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(a.double(), e, **tol, msg=lambda m, name=name: f"d{name}: {m}")
    assert bool((grads[0][:, empty] == 0).all()), "unselected rows must pass no gradient to q"


def _half_close(got, expected, what):
    err = (got.float() - expected.float()).abs().max().item()
    bound = 2e-2 + 2e-2 * expected.float().abs().max().item()
    assert err <= bound, f"{what}: max abs error {err} > {bound}"


@given(cases(**HALF, max_seq_len=48))
def test_dilated_half_precision_matches_reference(case):
    q, k, v = case.qkv(requires_grad=True)
    out = ra.dilated_attention(q, k, v, case.pattern, causal=case.causal)
    assert out.dtype == case.dtype
    ref_in = leaves((q, k, v), torch.float32)  # the same half values, in float32
    ref = ra.reference_attention(*ref_in, pattern=case.pattern, causal=case.causal)
    _half_close(out, ref, "out")
    assert bool((out[:, _empty_rows(case)] == 0).all())

    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(case.seed))  # a failure replays
    grads = torch.autograd.grad((out * g.to(case.dtype)).sum(), (q, k, v))
    expected = torch.autograd.grad((ref * g).sum(), ref_in)
    for name, a, e in zip("qkv", grads, expected):
        assert a.dtype == case.dtype and a.isfinite().all()
        _half_close(a, e, f"d{name}")


GRADCHECK_CASES = [
    # (pattern, H, Hkv, N, causal)
    (ra.DilatedPattern((4, 8), (1, 2), mode="mixture"), 2, 1, 8, False),
    (ra.DilatedPattern((4, 8), (1, 2), mode="mixture"), 4, 2, 8, True),
    (ra.DilatedPattern((3, 6), (2, 4), mode="mixture"), 2, 2, 6, True),
    (ra.DilatedPattern((4, 8), (1, 3), mode="head_groups"), 4, 2, 8, False),
    (ra.DilatedPattern((2, 8, 100), (1, 2, 5), mode="head_groups"), 3, 1, 8, True),
]


@pytest.mark.parametrize("pattern, h, hkv, n, causal", GRADCHECK_CASES)
def test_dilated_gradcheck(pattern, h, hkv, n, causal):
    torch.manual_seed(0)
    q = torch.randn(1, n, h, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, n, hkv, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, n, hkv, 4, dtype=torch.float64, requires_grad=True)
    fn = lambda q, k, v: ra.dilated_attention(q, k, v, pattern, causal=causal)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("n, h, hkv", [(16, 2, 1), (24, 4, 4), (7, 3, 1)])
@pytest.mark.parametrize("causal", [False, True])
def test_single_full_segment_equals_dense(n, h, hkv, causal):
    torch.manual_seed(1)
    q = torch.randn(2, n, h, 8, dtype=torch.float64)
    k, v = torch.randn(2, n, hkv, 8, dtype=torch.float64), torch.randn(2, n, hkv, 8, dtype=torch.float64)
    for w in (n, 4 * n):  # w > N is clamped to N
        for mode in ("mixture", "head_groups"):
            out = ra.dilated_attention(q, k, v, ra.DilatedPattern((w,), (1,), mode=mode), causal=causal)
            torch.testing.assert_close(out, ra.dense_attention(q, k, v, causal=causal), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "pattern, h, causal",
    [
        (ra.DilatedPattern((8,), (2,)), 2, False),  # every head drops half its rows
        (ra.DilatedPattern((4, 8), (1, 4), mode="head_groups"), 4, True),  # heads 2, 3 drop rows
        (ra.DilatedPattern((6,), (4,)), 3, True),  # r does not divide w
        (ra.DilatedPattern((100,), (5,)), 2, False),  # w > N, r does not divide N
    ],
)
def test_unselected_rows_are_zero_and_pass_no_gradient(pattern, h, causal):
    n = 12 if 6 in pattern.segment_lengths else 8
    torch.manual_seed(2)
    q = torch.randn(2, n, h, 4, requires_grad=True)
    k = torch.randn(2, n, 1, 4, requires_grad=True)
    v = torch.randn(2, n, 1, 4, requires_grad=True)
    w = P.weights(pattern, n, h, is_causal=causal)
    empty = (w.sum(-1) == 0).T
    assert bool(empty.any()) and not bool(empty.all())  # the case is meaningful
    out = ra.dilated_attention(q, k, v, pattern, causal=causal)
    assert bool((out[:, empty] == 0).all())
    assert bool((out[:, ~empty] != 0).all())
    (out * torch.randn_like(out)).sum().backward()
    assert bool((q.grad[:, empty] == 0).all())
    assert not q.grad.isnan().any() and not k.grad.isnan().any() and not v.grad.isnan().any()
    # keys no head keeps receive no gradient either
    unused_keys = (w.sum(dim=(0, 1)) == 0)
    assert bool((k.grad[:, unused_keys] == 0).all()) and bool((v.grad[:, unused_keys] == 0).all())


@pytest.mark.parametrize(
    "dtype, magnitude",
    [(torch.float16, 300.0), (torch.bfloat16, 300.0), (torch.bfloat16, 1000.0)],
)
@pytest.mark.parametrize("causal", [False, True])
def test_huge_logits_half_precision(dtype, magnitude, causal):
    """q.k reach ~1e5..1e7 (beyond fp16's 65504): no NaN/inf, and still the reference's answer."""
    pattern = ra.DilatedPattern((8, 16), (1, 2), mode="mixture")
    n, h, d = 16, 2, 8
    gen = torch.Generator().manual_seed(3)
    q = (torch.rand(1, n, h, d, generator=gen) * 2 - 1) * magnitude
    k = (torch.rand(1, n, 1, d, generator=gen) * 2 - 1) * magnitude
    v = torch.randn(1, n, 1, d, generator=gen)
    q, k, v = (t.to(dtype).requires_grad_() for t in (q, k, v))
    scores = torch.einsum("bihd,bjhd->bhij", q.double(), k.double()) * d**-0.5
    assert scores.abs().max() > 6.5e4  # beyond the float16 range
    out = ra.dilated_attention(q, k, v, pattern, causal=causal)
    assert out.isfinite().all()
    ref_in = leaves((q, k, v), torch.float64)
    ref = ra.reference_attention(*ref_in, pattern=pattern, causal=causal)
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)
    g = torch.randn(out.shape, generator=gen)
    grads = torch.autograd.grad((out * g.to(dtype)).sum(), (q, k, v))
    expected = torch.autograd.grad((ref * g.double()).sum(), ref_in)
    for a, e in zip(grads, expected):
        assert a.isfinite().all()
        _half_close(a, e, "grad")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mode", ["mixture", "head_groups"])
def test_checkpoint_same_outputs_and_grads(causal, mode):
    pattern = ra.DilatedPattern((4, 8, 16), (1, 2, 3), mode=mode)
    torch.manual_seed(4)
    base = [torch.randn(2, 16, h, 8) for h in (6, 3, 3)]
    g = torch.randn(2, 16, 6, 8)
    results = []
    for ckpt in (False, True):
        q, k, v = (t.clone().requires_grad_() for t in base)
        out = ra.dilated_attention(q, k, v, pattern, causal=causal, checkpoint=ckpt)
        (out * g).sum().backward()
        results.append((out.detach(), q.grad, k.grad, v.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # checkpoint under no_grad is plain inference
    with torch.no_grad():
        out = ra.dilated_attention(*base, pattern, causal=causal, checkpoint=True)
    torch.testing.assert_close(out, results[0][0], rtol=0, atol=0)


def test_modes_differ_and_mixture_double_counts():
    # sanity: the two modes are different functions, and each matches its own reference
    torch.manual_seed(5)
    q, k, v = (torch.randn(1, 8, 2, 4, dtype=torch.float64) for _ in range(3))
    mix = ra.DilatedPattern((4, 8), (1, 2), mode="mixture")
    grp = ra.DilatedPattern((4, 8), (1, 2), mode="head_groups")
    a = ra.dilated_attention(q, k, v, mix)
    b = ra.dilated_attention(q, k, v, grp)
    assert not torch.allclose(a, b)
    torch.testing.assert_close(a, ra.reference_attention(q, k, v, pattern=mix))
    torch.testing.assert_close(b, ra.reference_attention(q, k, v, pattern=grp))


def test_no_quadratic_memory():
    """N=16384 with segments of 64: an N x N float32 score matrix would be 1 GiB."""
    n = 16384
    pattern = ra.DilatedPattern((64,), (1,))
    q, k, v = (torch.randn(1, n, 1, 8, requires_grad=True) for _ in range(3))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        out = ra.dilated_attention(q, k, v, pattern, causal=True)
        out.sum().backward()
    biggest = max((e.cpu_memory_usage for e in prof.events()), default=0)
    assert 0 < biggest < 64 * 2**20, f"an op allocated {biggest} bytes"
    # spot-check a few rows against the reference on their own segment
    seg = slice(640, 704)
    ref = ra.reference_attention(q[:, seg], k[:, seg], v[:, seg], causal=True)
    torch.testing.assert_close(out[:, seg], ref, rtol=1e-5, atol=1e-5)


def _strided_last_dim(t):
    """A copy of ``t`` whose last dim has stride 2 (not unit-stride), same values."""
    buf = torch.zeros(*t.shape, 2, dtype=t.dtype)
    view = buf[..., 0]
    view.copy_(t.detach())
    return view.requires_grad_(t.requires_grad)


@pytest.mark.parametrize("mode", ["mixture", "head_groups"])
@pytest.mark.parametrize("causal", [False, True])
def test_non_contiguous_inputs_and_gradients(mode, causal):
    """[B, N, H, D] views of [B, H, N, D] tensors; upstream gradients expanded or transposed."""
    pattern = ra.DilatedPattern((4, 12, 100), (1, 3, 5), mode=mode)
    torch.manual_seed(6)
    qb = torch.randn(2, 6, 12, 8, dtype=torch.float64)
    kb = torch.randn(2, 2, 12, 8, dtype=torch.float64)
    vb = torch.randn(2, 2, 12, 8, dtype=torch.float64)
    q, k, v = (t.transpose(1, 2).requires_grad_() for t in (qb, kb, vb))
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    # a transposed upstream gradient
    g = torch.randn(2, 6, 12, 8, dtype=torch.float64).transpose(1, 2)
    check_against_reference(q, k, v, (q, k, v), pattern, causal, g)
    # an expanded (stride 0) upstream gradient, as out.sum() gives
    g = torch.ones(1, 1, 1, 1, dtype=torch.float64).expand(q.shape)
    check_against_reference(q, k, v, (q, k, v), pattern, causal, g)
    # an upstream gradient whose last dim is not unit-stride
    g = _strided_last_dim(torch.randn(q.shape, dtype=torch.float64))
    check_against_reference(q, k, v, (q, k, v), pattern, causal, g)


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_inputs_with_non_unit_stride_head_dim(which):
    pattern = ra.DilatedPattern((4, 8), (1, 2))
    torch.manual_seed(8)
    t = {"q": torch.randn(1, 8, 2, 4, dtype=torch.float64)}
    t["k"], t["v"] = torch.randn(1, 8, 1, 4, dtype=torch.float64), torch.randn(1, 8, 1, 4, dtype=torch.float64)
    t[which] = _strided_last_dim(t[which])
    assert t[which].stride(-1) == 2
    q, k, v = (t[x].requires_grad_() for x in "qkv")
    g = torch.randn(q.shape, dtype=torch.float64)
    check_against_reference(q, k, v, (q, k, v), pattern, False, g)


def test_gradient_only_for_some_inputs():
    pattern = ra.DilatedPattern((4, 8), (1, 2))
    torch.manual_seed(7)
    q = torch.randn(1, 8, 2, 4, dtype=torch.float64)
    k = torch.randn(1, 8, 1, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 8, 1, 4, dtype=torch.float64)
    out = ra.dilated_attention(q, k, v, pattern, causal=True)
    (dk,) = torch.autograd.grad(out.pow(2).sum(), (k,))
    kr = k.detach().requires_grad_()
    (expected,) = torch.autograd.grad(ra.reference_attention(q, kr, v, pattern=pattern, causal=True).pow(2).sum(), (kr,))
    torch.testing.assert_close(dk, expected, rtol=1e-9, atol=1e-10)
    with torch.no_grad():
        assert not ra.dilated_attention(q, k, v, pattern).requires_grad


_DILATED_FNS = [
    ("dilated", lambda q, k, v, p, c: ra.dilated_attention(q, k, v, p, causal=c)),
    ("ring_dilated-2", lambda q, k, v, p, c: ra.ring_dilated_attention(q, k, v, p, ring_size=2, causal=c)),
    # zigzag chunks of 4 rows: a dilated unit's rows are no progression (scattered results)
    ("ring_dilated-2-zigzag", lambda q, k, v, p, c: ra.ring_dilated_attention(
        q, k, v, p, ring_size=2, causal=c, layout="zigzag")),
]
# Where non-finite query rows get marked: a first pair covering every cell, later ones merging
# into it (mixture 4/1 then 8/2); pairs on disjoint heads that never merge and leave rows
# without keys (head_groups); a first pair leaving cells a later pair merges into (8/2 first);
# rows that are no progression.
_NON_FINITE_PATTERNS = {
    "mixture": ra.DilatedPattern((4, 8), (1, 2)),
    "head_groups": ra.DilatedPattern((4, 8), (1, 2), "head_groups"),
    "dilated-first": ra.DilatedPattern((8, 4), (2, 1)),
    # rate 3 in segments of 4 keeps rows 0, 3, 4, 7, ...: no progression (results scattered)
    "uneven-rate": ra.DilatedPattern((4, 16), (3, 1), "head_groups"),
}
_NON_FINITE_CASES = [
    pytest.param(fn, pattern, id=f"{name}-{pname}")
    for name, fn in _DILATED_FNS for pname, pattern in _NON_FINITE_PATTERNS.items()
] + [
    pytest.param(lambda q, k, v, p, c: ra.ring_attention(q, k, v, ring_size=4, causal=c), None, id="ring-4"),
    # one call of 16 keys on the CPU op, whose outputs become the accumulators
    pytest.param(lambda q, k, v, p, c: ra.ring_attention(q, k, v, ring_size=1, causal=c), None, id="ring-1"),
    pytest.param(lambda q, k, v, p, c: ra.dense_attention(q, k, v, causal=c), None, id="dense"),
]


@pytest.mark.parametrize("fn, pattern", _NON_FINITE_CASES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["q", "k", "v", "q-with-negative-keys"])
def test_non_finite_input_shows_where_the_reference_says(fn, pattern, causal, bad, where):
    # Short segments and shards: every block has fewer keys than the CPU op handles right
    # (it returns a finite 0 for a row whose every score is NaN); and under a causal mask a
    # NaN value row must not reach the rows before it (kernels multiply it by a zero
    # probability). "q-with-negative-keys": an inf query entry against keys all negative
    # there, so every score of the row is -inf and a kernel takes it for a row without keys.
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 16, 2, 8, generator=gen) for _ in range(3))  # float32: float64 is not affected
    if where == "q-with-negative-keys":
        k[..., 1, 3], k[..., 0, 0] = -k[..., 1, 3].abs() - 0.1, -k[..., 0, 0].abs() - 0.1
    t = {"q": q, "k": k, "v": v}[where[0]]
    # rows 11 (head 0) and 13 (head 1): kept by no pair that runs before another one merges
    # there (the dilated-first pattern), and scattered in the zigzag layout (no progression)
    for row, head, dim in ((5, 1, 3), (11, 0, 0), (13, 1, 3)):
        t[0, row, head, dim] = bad
    ref = ra.reference_attention(q, k, v, pattern=pattern, causal=causal)
    out = fn(q, k, v, pattern, causal)
    assert not ref.isfinite().all()  # the comparison is not vacuous
    assert torch.equal(out.isfinite(), ref.isfinite())
    finite = ref.isfinite()
    torch.testing.assert_close(out[finite], ref[finite])


@pytest.mark.parametrize("ring_size", [None, 1, 2])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_query_in_a_cell_without_keys_stays_zero(ring_size, bad):
    # head_groups: head 1 (rate 2, offset 1) keeps the odd rows only, so its even rows have
    # no keys and are 0 whatever their query holds; segments of 32 keys run on the fused
    # CPU op, whose results for a non-finite query row the executor marks afterwards
    pattern = ra.DilatedPattern((32, 64), (1, 2), "head_groups")
    q, k, v = qkv(1, 64, 2, 2, 8, dtype=torch.float32)
    q[0, 4, 1, 0] = q[0, 5, 1, 0] = bad  # row 4 of head 1 has no keys, row 5 has
    ref = ra.reference_attention(q, k, v, pattern=pattern)
    if ring_size is None:
        out = ra.dilated_attention(q, k, v, pattern)
    else:
        out = ra.ring_dilated_attention(q, k, v, pattern, ring_size=ring_size)
    assert ref[0, 4, 1].eq(0).all() and ref[0, 5, 1].isnan().all()
    assert torch.equal(out.isfinite(), ref.isfinite())
    finite = ref.isfinite()
    torch.testing.assert_close(out[finite], ref[finite])


@pytest.mark.parametrize("n", [4, 15, 16, 40])
def test_dense_causal_row_seeing_only_a_nan_key_is_nan(n):
    # below 16 keys torch's CPU op returns 0 for a row whose every score is NaN
    q, k, v = (torch.randn(1, n, 2, 8) for _ in range(3))
    k[0, 0, 1, 2] = float("nan")
    out, ref = ra.dense_attention(q, k, v, causal=True), ra.reference_attention(q, k, v, causal=True)
    assert not ref[0, 0, 1].isfinite().any()
    assert torch.equal(out.isfinite(), ref.isfinite())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ring_size", [None, 1, 2, 4])
def test_a_query_row_scoring_minus_inf_everywhere_is_nan_on_the_fused_cpu_op(ring_size, dtype):
    # 32 keys per segment of pair 1: the fused CPU op, which returns a finite (0, 0) for a
    # row whose every score is -inf. Pair 0 skips row 1 of head 0, so pair 1's result
    # reaches that cell by a merge, not a write.
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 32, 2, 8, generator=gen).to(dtype) for _ in range(3))
    k[..., 0] = -k[..., 0].abs() - 0.1
    q[0, 1, 0, 0] = float("inf")
    p = ra.DilatedPattern((16, 32), (2, 1))
    if ring_size is None:
        out = ra.dilated_attention(q, k, v, p)
    else:
        out = ra.ring_dilated_attention(q, k, v, p, ring_size=ring_size)
    ref = ra.reference_attention(q.double(), k.double(), v.double(), pattern=p)
    assert not ref[0, 1, 0].isfinite().any()
    assert torch.equal(out.isfinite(), ref.isfinite())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["mixture", "head_groups"])
def test_the_output_is_laid_out_rows_major_like_the_inputs(mode, dtype):
    """``[B, N, H, D]`` contiguous, as the kernels lay out their results: merging them in
    costs no transposing copy, and a model's ``out.flatten(2)`` before its output
    projection is a view."""
    q, k, v = (torch.randn(2, 64, 4, 8, dtype=dtype) for _ in range(3))
    out = ra.dilated_attention(q, k, v, ra.DilatedPattern((16, 32), (2, 1), mode))
    assert out.is_contiguous()
