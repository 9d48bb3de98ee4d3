"""Numerics where the rest of the suite does not look: long key blocks, wide heads, big inputs.

torch's CPU fused kernel walks the keys in blocks of 512 and rescales its running output
whenever a later block holds a larger score, so sequences in the hundreds to low thousands
exercise code that the small cases elsewhere (N <= ~64) never reach. The inputs here have
head dims up to 256, magnitudes up to 1e2 (scores up to ~1e5) for q and k and up to 1e4
for v, and often a dominant key placed anywhere, including late key blocks.

Every result is compared with a float64 oracle on the same (rounded) inputs, and the
tolerance is relative to what torch's own SDPA achieves in the same dtype on the same
inputs: ``error <= K * SDPA's error + a tiny epsilon``, never a fixed number per dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import ring_attention as ra
from ring_attention import kernels
from ring_attention import pattern as _pattern
from ring_attention.merge import merge
from tests.inputs import qkv

K = 4.0  # a result may be this many times less accurate than SDPA on the same inputs
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Few examples: each one is a long sequence in float64.
LONG = settings(max_examples=3, deadline=None)


def _err(got, want, rows=None):
    diff = (got.detach().double() - want.detach()).abs()
    return float(diff[rows].max() if rows is not None else diff.max())


def _assert_within_sdpa(name, got, sdpa, want, rows=None):
    """``got`` no worse than ``K`` times SDPA's error against the float64 ``want``."""
    err, yardstick = _err(got, want, rows), _err(sdpa, want, rows)
    eps = 1e-7 * float(want.detach().abs().max()) + 1e-30  # tiny: only for an exact SDPA
    assert got.dtype == sdpa.dtype
    assert err <= K * yardstick + eps, f"{name}: error {err:.3g} > {K} x SDPA's {yardstick:.3g} (+{eps:.2g})"


def _grads(out, inputs, g):
    return torch.autograd.grad(out, inputs, g)


@st.composite
def magnitudes(draw):
    return dict(
        qk=draw(st.sampled_from([1.0, 10.0, 100.0])),
        v=draw(st.sampled_from([1.0, 1e2, 1e4])),
    )


# --- the kernel over key blocks longer than its 512-key split, merged by LSE ------------------


@st.composite
def kernel_cases(draw):
    causal = draw(st.booleans())
    d = draw(st.sampled_from([64, 128, 256]))
    lq = draw(st.sampled_from([40, 300, 800]))  # the kernel's query split: 32 / 64 / 256
    past = draw(st.integers(600, 1400))  # keys before the query rows: 2-3 splits of 512
    second = lq if causal else draw(st.integers(600, 1400))
    assume(lq * (past + second) * d <= 1.5e8)  # keep the float64 oracle fast
    total = past + second
    return dict(
        causal=causal, d=d, lq=lq, past=past, second=second, h=draw(st.sampled_from([1, 2])),
        dtype=draw(st.sampled_from(DTYPES)), seed=draw(st.integers(0, 2**16)),
        dominant=draw(st.one_of(st.none(), st.integers(0, total - 1))), mag=draw(magnitudes()),
    )


@LONG
@given(case=kernel_cases())
def test_kernel_blocks_merged_by_lse_match_float64_within_sdpa_error(case):
    """Keys in two blocks (a full one, then a full or a causal diagonal one), each longer
    than the fused kernel's 512-key split: forward per block, LSE merge, and the backward
    of each block with the merged output and LSE, as the ring does it."""
    h, d, lq, past, second, dtype = (case[x] for x in ("h", "d", "lq", "past", "second", "dtype"))
    n = past + second
    scale = 1 / math.sqrt(d)
    q, k, v, g = (t.transpose(1, 2) for t in qkv(
        1, n, h, h, d, seed=case["seed"], dtype=dtype, grad_out=True, magnitude=case["mag"]["qk"],
        dominant_key=case["dominant"],
    ))  # [1, H, n, D]
    v = (v.double() * case["mag"]["v"]).to(dtype)
    q, g = q[:, :, n - lq :], g[:, :, n - lq :]  # the query rows are the last lq positions
    mask = torch.ones(lq, n, dtype=torch.bool)
    if case["causal"]:
        mask[:, past:] = torch.ones(lq, lq, dtype=torch.bool).tril()

    # float64 oracle on the same rounded inputs
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    s = (q64 @ k64.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    ref = torch.softmax(s, dim=-1) @ v64
    ref_lse = torch.logsumexp(s, dim=-1)
    ref_grads = _grads(ref, (q64, k64, v64), g.double())
    # the exact result must be representable: a gradient beyond float16's range is inf for SDPA too
    assume(all(bool(t.to(dtype).isfinite().all()) for t in (ref, *ref_grads)))

    # the yardstick: SDPA in the same dtype on the whole key range
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    sdpa = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask if case["causal"] else None, scale=scale)
    sdpa_grads = _grads(sdpa, (qs, ks, vs), g)

    # the library's way: a kernel call per block, merged in float32
    blocks = [(slice(0, past), False), (slice(past, n), case["causal"])]
    parts = [kernels.attention_forward(q, k[:, :, b], v[:, :, b], causal=c, scale=scale) for b, c in blocks]
    out32, lse = merge(*parts[0], *parts[1])
    out = out32.to(dtype)
    grads = [kernels.attention_backward(g, q, k[:, :, b], v[:, :, b], out, lse, causal=c, scale=scale) for b, c in blocks]
    dq = (grads[0][0].float() + grads[1][0].float()).to(dtype)
    dk = torch.cat([grads[0][1], grads[1][1]], dim=2)
    dv = torch.cat([grads[0][2], grads[1][2]], dim=2)

    for name, t in (("out", out), ("lse", lse), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert t.isfinite().all(), f"{name} is not finite"
    _assert_within_sdpa("out", out, sdpa, ref)
    for name, a, b, e in zip(("dq", "dk", "dv"), (dq, dk, dv), sdpa_grads, ref_grads):
        _assert_within_sdpa(name, a, b, e)
    # LSE has no SDPA counterpart: float32 rounding of the largest score is the yardstick
    lse_err = _err(lse, ref_lse)
    assert lse_err <= 64 * torch.finfo(torch.float32).eps * (1 + float(s.detach().abs().amax())), lse_err


# --- the public functions on long sequences -------------------------------------------------


@st.composite
def long_cases(draw):
    kind = draw(st.sampled_from(["ring", "dilated", "ring_dilated"]))
    ring_size = 1 if kind == "dilated" else draw(st.sampled_from([2, 3]))
    layout = draw(st.sampled_from(["contiguous", "zigzag"]))
    n = 12 * draw(st.integers(50, 170))  # 600 .. 2040, divisible by 2R for R in {2, 3}
    d = draw(st.sampled_from([16, 32, 64, 128]))
    assume(n * n * d <= 5e7)  # keep the float64 reference fast (D = 256: the kernel test above)
    if kind == "ring":
        pattern = None
    else:
        # Weights 0 or 1 only (head_groups, or a single pair), so SDPA takes the same mask.
        segment = draw(st.sampled_from([n, n // 2, n // 3]))
        rate = draw(st.sampled_from([1, 2, 3]))
        if draw(st.booleans()):
            pattern = ra.DilatedPattern((segment,), (rate,))
        else:
            pattern = ra.DilatedPattern((n, segment), (1, rate), mode="head_groups")
    return dict(
        kind=kind, ring_size=ring_size, layout=layout, n=n, d=d, pattern=pattern,
        h=2, hkv=draw(st.sampled_from([1, 2])), causal=draw(st.booleans()),
        dtype=draw(st.sampled_from(DTYPES)), seed=draw(st.integers(0, 2**16)),
        dominant=draw(st.one_of(st.none(), st.integers(0, n - 1))), mag=draw(magnitudes()),
    )


def _run(case, q, k, v):
    kw = dict(causal=case["causal"])
    if case["kind"] == "ring":
        return ra.ring_attention(q, k, v, ring_size=case["ring_size"], layout=case["layout"], **kw)
    if case["kind"] == "dilated":
        return ra.dilated_attention(q, k, v, case["pattern"], **kw)
    return ra.ring_dilated_attention(
        q, k, v, case["pattern"], ring_size=case["ring_size"], layout=case["layout"], **kw
    )


@LONG
@given(case=long_cases())
def test_long_sequences_match_the_reference_within_sdpa_error(case):
    """Ring, dilated and ring dilated attention at N = 600..2040 against the float64
    reference; the yardstick is SDPA with the same weights as a mask."""
    n, h, hkv, d, dtype = (case[x] for x in ("n", "h", "hkv", "d", "dtype"))
    q, k, v, g = qkv(
        1, n, h, hkv, d, seed=case["seed"], dtype=dtype, grad_out=True, magnitude=case["mag"]["qk"],
        dominant_key=case["dominant"],
    )
    v = (v.double() * case["mag"]["v"]).to(dtype)
    keep = _pattern.weights(case["pattern"], n, h, is_causal=case["causal"]) > 0  # [H, N, N], 0/1
    has_keys = keep.any(-1).T[None, :, :, None]  # [1, N, H, 1]
    g = g.masked_fill(~has_keys, 0.0)  # rows without keys pass no gradient anyway

    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref = ra.reference_attention(q64, k64, v64, pattern=case["pattern"], causal=case["causal"])
    ref_grads = _grads(ref, (q64, k64, v64), g.double())
    # the exact result must be representable: a gradient beyond float16's range is inf for SDPA too
    assume(all(bool(t.to(dtype).isfinite().all()) for t in (ref, *ref_grads)))

    # SDPA with the weights as an additive mask; rows without keys see every key (their
    # upstream gradient is 0, and their output is left out of the comparison).
    bias = torch.where(keep | ~keep.any(-1, keepdim=True), 0.0, float("-inf")).to(dtype)
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    sdpa = F.scaled_dot_product_attention(
        *(t.transpose(1, 2) for t in ins), attn_mask=bias[None], enable_gqa=h != hkv
    ).transpose(1, 2)
    sdpa_grads = _grads(sdpa, ins, g)

    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    out = _run(case, *ins)
    grads = _grads(out, ins, g)

    for name, t in zip(("out", "dq", "dk", "dv"), (out, *grads)):
        assert t.dtype == dtype, f"{name} is {t.dtype}, not {dtype}"
        assert t.isfinite().all(), f"{name} is not finite"
    assert bool((out.masked_select(~has_keys) == 0).all()), "rows without keys must be exactly 0"
    rows = has_keys.expand_as(out)
    _assert_within_sdpa("out", out, sdpa, ref, rows)
    for name, a, b, e in zip(("dq", "dk", "dv"), grads, sdpa_grads, ref_grads):
        _assert_within_sdpa(name, a, b, e)
