"""The one-process ring (group=None, ring_size=R) against the reference, in both layouts."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ring_attention as ra


@st.composite
def ring_cases(draw):
    ring_size = draw(st.integers(1, 4))
    lay = draw(st.sampled_from(["contiguous", "zigzag"]))
    chunks = ring_size * (2 if lay == "zigzag" else 1)
    n = chunks * draw(st.integers(1, 6))
    h, hkv = draw(st.sampled_from([(1, 1), (2, 1), (4, 2), (4, 4), (6, 3)]))
    pattern = None
    if draw(st.booleans()):
        divisors = [w for w in range(1, n + 1) if n % w == 0] + [2 * n]
        k = draw(st.integers(1, min(3, h)))
        ws = [draw(st.sampled_from(divisors)) for _ in range(k)]
        rs = [draw(st.integers(1, min(w, n, 5))) for w in ws]
        pattern = ra.DilatedPattern(ws, rs, draw(st.sampled_from(["mixture", "head_groups"])))
    return dict(
        ring_size=ring_size, layout=lay, shape=(draw(st.integers(1, 2)), n, h, hkv, draw(st.sampled_from([4, 8]))),
        pattern=pattern, causal=draw(st.booleans()), seed=draw(st.integers(0, 2**16)),
    )


def _run(case, q, k, v):
    kw = dict(ring_size=case["ring_size"], layout=case["layout"], causal=case["causal"])
    if case["pattern"] is None:
        return ra.ring_attention(q, k, v, **kw)
    return ra.ring_dilated_attention(q, k, v, case["pattern"], **kw)


def _inputs(shape, seed, dtype=torch.float64):
    b, n, h, hkv, d = shape
    gen = torch.Generator().manual_seed(seed)
    make = lambda heads: torch.randn(b, n, heads, d, generator=gen, dtype=dtype, requires_grad=True)  # noqa: E731
    return make(h), make(hkv), make(hkv), torch.randn(b, n, h, d, generator=gen, dtype=dtype)


@given(ring_cases())
def test_simulated_ring_matches_reference(case):
    q, k, v, g = _inputs(case["shape"], case["seed"])
    out = _run(case, q, k, v)
    ref = ra.reference_attention(q, k, v, pattern=case["pattern"], causal=case["causal"])
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


@pytest.mark.parametrize("pattern", [None, ra.DilatedPattern((8, 32), (2, 4), "mixture")])
@pytest.mark.parametrize("causal", [False, True])
def test_result_does_not_depend_on_ring_size_or_layout(pattern, causal):
    q, k, v, _ = _inputs((1, 64, 4, 2, 8), 0, torch.float32)
    outs = [
        _run(dict(ring_size=r, layout=lay, causal=causal, pattern=pattern), q, k, v)
        for r in (1, 2, 4) for lay in ("contiguous", "zigzag")
    ]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], atol=2e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_ring(dtype):
    q, k, v, _ = _inputs((1, 64, 4, 2, 16), 0, dtype)
    p = ra.DilatedPattern((16, 64), (1, 2))
    for pattern in (None, p):
        out = _run(dict(ring_size=4, layout="zigzag", causal=True, pattern=pattern), q, k, v)
        ref = ra.reference_attention(*(x.double() for x in (q, k, v)), pattern=pattern, causal=True)
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(ring_size=3), "divisible by 3"),
        (dict(ring_size=4, layout="zigzag"), r"divisible by 8 \(2R\)"),
        (dict(ring_size=2, layout="diagonal"), "unknown layout"),
        (dict(ring_size=0), "ring_size"),
        (dict(ring_size=-1), "ring_size"),
        (dict(ring_size="2"), "ring_size"),
    ],
)
def test_bad_ring_arguments(kwargs, match):
    q = torch.randn(1, 20, 2, 4)
    with pytest.raises(ValueError, match=match):
        ra.ring_attention(q, q, q, **kwargs)
    with pytest.raises(ValueError, match=match):
        ra.ring_dilated_attention(q, q, q, ra.DilatedPattern((4,), (1,)), **kwargs)
