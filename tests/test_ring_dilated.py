"""Ring dilated attention simulated in one process against the dense reference, and its plans.

The numeric oracle is ``reference_attention(..., pattern=p)`` on the whole sequence; the
plan oracles (which rows travel, how much work is done) are recomputed here by brute force
from SEMANTICS.md's definitions on global positions.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import ring_attention as ra
from ring_attention import layout as _layout
from ring_attention import pattern as _pattern
from ring_attention.masks import BlockMask
from tests.inputs import F64, HEADS, LAYOUTS, assert_matches, fwd_bwd, make_qkv
from tests.plan_view import plan_view


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def dilated_cases(draw, ring_sizes=(1, 2, 3, 4), both_layouts=False):
    """A ring case; ``both_layouts``: N valid for contiguous and zigzag (2R | N)."""
    ring_size = draw(st.sampled_from(ring_sizes))
    layout = draw(st.sampled_from(LAYOUTS))
    parts = ring_size * (2 if both_layouts else _layout.chunks_per_rank(layout))
    n = parts * draw(st.sampled_from([1, 2, 3, 4, 6]))
    num_pairs = draw(st.integers(1, 3))
    mode = draw(st.sampled_from(["mixture", "head_groups"]))
    heads = [hh for hh in HEADS if mode == "mixture" or hh[0] >= num_pairs]
    h, hkv = draw(st.sampled_from(heads))
    # Segment lengths: any divisor of N (inside a shard, equal to one, straddling shards,
    # the whole sequence), or longer than N (w' = N). Rates need not divide the segment,
    # and may exceed w' = N when w > N (some heads then keep no row at all).
    segments = draw(st.lists(
        st.one_of(st.sampled_from(_divisors(n)), st.integers(n + 1, 2 * n)), min_size=num_pairs, max_size=num_pairs,
    ))
    rates = [draw(st.integers(1, min(w, 7))) for w in segments]
    return dict(
        ring_size=ring_size, layout=layout, n=n, h=h, hkv=hkv,
        pattern=ra.DilatedPattern(tuple(segments), tuple(rates), mode=mode),
        b=draw(st.integers(1, 2)), d=draw(st.sampled_from([4, 8])), causal=draw(st.booleans()),
        scale=draw(st.one_of(st.none(), st.floats(0.05, 2.0))), checkpoint=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def _run_case(case, dtype=torch.float64):
    q, k, v, g = make_qkv(case["seed"], case["b"], case["n"], case["h"], case["hkv"], case["d"], dtype=dtype)
    p, kw = case["pattern"], dict(causal=case["causal"], scale=case["scale"])
    got = fwd_bwd(
        lambda q, k, v: ra.ring_dilated_attention(
            q, k, v, p, ring_size=case["ring_size"], layout=case["layout"], checkpoint=case["checkpoint"], **kw
        ),
        q, k, v, g,
    )
    want = fwd_bwd(lambda q, k, v: ra.reference_attention(q, k, v, pattern=p, **kw), q, k, v, g)
    return got, want


def _case(ring_size, layout, n, segments, rates, mode="mixture", causal=False, h=4, hkv=2, seed=0, **extra):
    case = dict(
        ring_size=ring_size, layout=layout, n=n, h=h, hkv=hkv, b=2, d=8, causal=causal, scale=None,
        checkpoint=False, seed=seed, pattern=ra.DilatedPattern(segments, rates, mode=mode),
    )
    case.update(extra)
    return case


@settings(max_examples=60)
@given(case=dilated_cases())
# A segment straddling the shards (w=8, shards of 6 or 12), rate 3 not dividing it.
@example(case=_case(2, "contiguous", 24, (8,), (3,), causal=True))
@example(case=_case(4, "zigzag", 24, (8, 24), (3, 2), mode="head_groups", causal=True))
# Rate larger than N with w > N: heads with offsets >= N keep no row and output 0.
@example(case=_case(2, "zigzag", 8, (12,), (10,), h=6, hkv=3))
def test_simulated_ring_dilated_matches_reference(case):
    got, want = _run_case(case)
    assert_matches(got, want, **F64)


@pytest.mark.parametrize("ring_size", [2, 4])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(
    "segments, rates, mode",
    [
        ((3,), (2,), "mixture"),  # inside every shard and zigzag chunk
        ((6,), (4,), "mixture"),  # a chunk of R=4, half a shard of R=2
        ((8,), (3,), "mixture"),  # straddles shard boundaries
        ((8, 24, 48), (1, 3, 5), "mixture"),  # LongNet-like, and longer than N
        ((12, 24), (2, 1), "head_groups"),
    ],
    ids=["w3", "w6", "w8-straddle", "longnet", "head-groups"],
)
def test_n24_patterns_across_shards(ring_size, layout, causal, segments, rates, mode):
    """N=24 with shards of 12 or 6: segments shorter than, equal to, across and longer than shards."""
    got, want = _run_case(_case(ring_size, layout, 24, segments, rates, mode=mode, causal=causal, seed=3))
    assert_matches(got, want, **F64)


@settings(max_examples=20)
@given(case=dilated_cases(ring_sizes=(2, 3, 4), both_layouts=True))
def test_output_does_not_depend_on_ring_size_or_layout(case):
    """float32: the same pattern on 1 rank, R ranks contiguous and R ranks zigzag agree."""
    r, n = case["ring_size"], case["n"]
    q, k, v, g = make_qkv(case["seed"], case["b"], n, case["h"], case["hkv"], case["d"], dtype=torch.float32)
    p, causal = case["pattern"], case["causal"]
    results = {
        (size, lay): fwd_bwd(
            lambda q, k, v, size=size, lay=lay: ra.ring_dilated_attention(
                q, k, v, p, ring_size=size, layout=lay, causal=causal), q, k, v, g)
        for size, lay in ((1, "contiguous"), (r, "contiguous"), (r, "zigzag"))
    }
    base = results[(1, "contiguous")]
    for key, (out, grads) in results.items():
        torch.testing.assert_close(out, base[0], atol=2e-6, rtol=1e-5, msg=lambda m, key=key: f"{key}: {m}")
        for a, b in zip(grads, base[1]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.parametrize(
    "dtype, out_tol, grad_tol",
    [(torch.float16, 4e-3, 2e-2), (torch.bfloat16, 3e-2, 1.5e-1)],
    ids=["float16", "bfloat16"],
)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_low_precision_smoke(dtype, out_tol, grad_tol, layout):
    p = ra.DilatedPattern((16, 32, 64), (1, 2, 4))
    q, k, v, g = make_qkv(9, 2, 64, 4, 2, 16, dtype=dtype)
    out, grads = fwd_bwd(
        lambda q, k, v: ra.ring_dilated_attention(q, k, v, p, ring_size=4, layout=layout, causal=True), q, k, v, g
    )
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_grads = fwd_bwd(
        lambda q, k, v: ra.reference_attention(q, k, v, pattern=p, causal=True), q64, k64, v64, g.double()
    )
    assert out.dtype == dtype and all(gr.dtype == dtype for gr in grads)
    assert torch.isfinite(out).all() and all(torch.isfinite(gr).all() for gr in grads)
    assert (out.double() - ref).abs().max().item() < out_tol
    for name, a, b in zip(("dq", "dk", "dv"), grads, ref_grads):
        err = (a.double() - b).abs().max().item()
        assert err < grad_tol * max(1.0, b.abs().max().item()), f"{name}: max error {err}"


def test_gradcheck_straddling_pattern():
    """Finite differences: R=2, zigzag, causal, GQA, segments straddling the shards."""
    p = ra.DilatedPattern((4, 8), (2, 3), mode="mixture")
    q, k, v, _ = make_qkv(8, 1, 8, 2, 1, 3)
    assert torch.autograd.gradcheck(
        lambda q, k, v: ra.ring_dilated_attention(q, k, v, p, ring_size=2, layout="zigzag", causal=True),
        (q, k, v), eps=1e-6, atol=1e-6,
    )


# --- plans: communication ----------------------------------------------------------------------


def _pair_heads(pattern, h):
    """SEMANTICS.md: every head (mixture) or group k = [floor(k*H/K), floor((k+1)*H/K))."""
    k = pattern.num_pairs
    if pattern.mode == "mixture":
        return [list(range(h))] * k
    return [list(range(i * h // k, (i + 1) * h // k)) for i in range(k)]


def _expected_messages(pattern, n, h, hkv, causal, ring_size, layout):
    """Brute force: {shift: {src: [(local rows, kv heads) per message]}} from global positions.

    For each pair and head offset o (with at least one head), the sender sends, in its
    storage order, its kept rows lying in a segment where the receiver keeps a row, and
    under causal only rows before the last such receiver row.
    """
    group = h // hkv
    positions = [
        [p for a, b in _layout.shard_intervals(n, ring_size, r, layout) for p in range(a, b)]
        for r in range(ring_size)
    ]
    expected = {}
    for shift in range(1, ring_size):
        per_src = {}
        for src in range(ring_size):
            dst = (src + shift) % ring_size
            msgs = []
            for w, rate, heads in zip(pattern.segment_lengths, pattern.dilation_rates, _pair_heads(pattern, h)):
                w = min(w, n)
                for o in range(rate):
                    unit_heads = [hh for hh in heads if hh % rate == o]
                    if not unit_heads:
                        continue
                    last_q = {}
                    for p in positions[dst]:
                        if (p % w) % rate == o:
                            last_q[p // w] = max(last_q.get(p // w, -1), p)
                    rows = [
                        i for i, p in enumerate(positions[src])
                        if (p % w) % rate == o and p // w in last_q and (not causal or p < last_q[p // w])
                    ]
                    if rows:
                        msgs.append((rows, sorted({hh // group for hh in unit_heads})))
            if msgs:
                per_src[src] = msgs
        if per_src:
            expected[shift] = per_src
    return expected


def _as_list(rows, size):
    return rows.values()


def _actual_messages(plan, n_local, hkv):
    """Per shift and sender, ``(rows, kv heads)`` of each unit's message: a message of ``O``
    head offsets stands for ``O`` of them, shifted by ``o`` rows and heads."""
    def per_unit(m):
        rows, heads = _as_list(m.rows, n_local), _as_list(m.kv_heads, hkv)
        return [([r + o for r in rows], [h + o for h in heads]) for o in range(m.offsets)]

    return {
        step.shift: {src: [unit for m in msgs for unit in per_unit(m)] for src, msgs in step.sends.items()}
        for step in plan.steps
    }


@settings(max_examples=60)
@given(case=dilated_cases(ring_sizes=(2, 3, 4)))
def test_messages_carry_exactly_the_kept_rows_the_receiver_needs(case):
    n, r = case["n"], case["ring_size"]
    args = (case["pattern"], n, case["h"], case["hkv"], case["causal"], r, case["layout"])
    plan = plan_view(*args)
    assert _actual_messages(plan, n // r, case["hkv"]) == _expected_messages(*args)
    for step in plan.steps:  # what is sent is received: senders and receivers pair up
        assert sorted(step.blocks) == sorted((s + step.shift) % r for s in step.sends)


@given(
    ring_size=st.sampled_from([2, 3, 4]),
    layout=st.sampled_from(LAYOUTS),
    chunk=st.sampled_from([2, 3, 4, 6]),
    data=st.data(),
    causal=st.booleans(),
)
def test_segments_inside_shards_need_no_communication(ring_size, layout, chunk, data, causal):
    """Every w' divides the chunk a rank holds contiguously: the plan has no step at all."""
    n = ring_size * _layout.chunks_per_rank(layout) * chunk
    segments = data.draw(st.lists(st.sampled_from(_divisors(chunk)), min_size=1, max_size=3))
    rates = [data.draw(st.integers(1, w)) for w in segments]
    pattern = ra.DilatedPattern(tuple(segments), tuple(rates))
    assert plan_view(pattern, n, 4, 2, causal, ring_size, layout).steps == ()
    # One segment spanning two ranks (rate 1: every row kept) does communicate.
    spanning = ra.DilatedPattern((*segments, n), (*rates, 1))
    assert plan_view(spanning, n, 4, 2, causal, ring_size, layout).steps != ()


@pytest.mark.parametrize("rate", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("heads", [1, 4])
def test_spanning_segment_sends_about_w_over_r_rows(rate, heads):
    """N=w=48 on 2 ranks: each (pair, offset) message carries ~24/r rows, not the 24 of a shard."""
    n, shard = 48, 24
    plan = plan_view(ra.DilatedPattern((n,), (rate,)), n, heads, 1, False, 2, "contiguous")
    full = plan_view(None, n, heads, 1, False, 2, "contiguous")
    assert [len(m.rows) for m in full.steps[0].sends[0]] == [shard]
    (step,) = plan.steps
    for src in (0, 1):
        rows = [len(m.rows) for m in step.sends[src]]
        offsets = range(min(rate, heads))  # offsets that some head uses
        held = range(src * shard, (src + 1) * shard)  # global positions of the sender
        assert rows == [sum(1 for p in held if p % rate == o) for o in offsets], rows
        assert all(abs(x - shard / rate) < 1 for x in rows)
        assert sum(rows) <= shard


def _work(plan, h, rank, triangle):
    blocks = list(plan.local[rank]) + [b for s in plan.steps for b in s.blocks.get(rank, ())]
    total = 0
    for blk in blocks:
        nh = blk.offsets * len(range(*blk.heads.indices(h)))  # O units shifted by o heads
        for c in blk.calls:
            per = c.q_len * (c.q_len + 1) // 2 if (triangle and c.mask is BlockMask.CAUSAL) else c.q_len * c.k_len
            total += nh * c.runs * per
    return total


@settings(max_examples=40)
@given(case=dilated_cases())
def test_plan_work_equals_the_weight_count(case):
    """Summed over ranks, the plan computes each nonzero weight of W once (a key covered by two
    mixture pairs twice, as W counts it): no block above the diagonal, no block twice."""
    n, r, h, p = case["n"], case["ring_size"], case["h"], case["pattern"]
    plan = plan_view(p, n, h, case["hkv"], case["causal"], r, case["layout"])
    work = sum(_work(plan, h, rank, True) for rank in range(r))
    assert work == int(_pattern.weights(p, n, h, is_causal=case["causal"]).sum())


# --- bad input -------------------------------------------------------------------------------


def _small(n, h=2, hkv=2):
    q, k, v, _ = make_qkv(0, 1, n, h, hkv, 4, requires_grad=False)
    return q, k, v


def test_segment_not_dividing_n_raises():
    with pytest.raises(ValueError, match=r"N=12.*w=5"):
        ra.ring_dilated_attention(*_small(12), ra.DilatedPattern((5,), (1,)), ring_size=2)


def test_head_groups_with_fewer_heads_than_pairs_raises():
    p = ra.DilatedPattern((4, 8, 16), (1, 2, 4), mode="head_groups")
    with pytest.raises(ValueError, match="H=2"):
        ra.ring_dilated_attention(*_small(16), p, ring_size=2)


@pytest.mark.parametrize(
    "n, ring_size, layout", [(12, 5, "contiguous"), (12, 4, "zigzag"), (8, 3, "zigzag")]
)
def test_sequence_not_divisible_raises(n, ring_size, layout):
    with pytest.raises(ValueError, match=f"N={n}"):
        ra.ring_dilated_attention(*_small(n), ra.DilatedPattern((n,), (1,)), ring_size=ring_size, layout=layout)


@pytest.mark.parametrize("bad", [{"layout": "spiral"}, {"ring_size": 0}, {"ring_size": -1}])
def test_bad_layout_or_ring_size_raises(bad):
    with pytest.raises(ValueError):
        ra.ring_dilated_attention(*_small(8), ra.DilatedPattern((4,), (2,)), **{"ring_size": 2, **bad})


def test_pattern_must_be_a_dilated_pattern():
    with pytest.raises(TypeError, match="DilatedPattern"):
        ra.ring_dilated_attention(*_small(8), ((4,), (2,)), ring_size=2)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_pairs_head_offsets_travel_as_one_message(layout):
    # head_groups (64, 128) / (1, 2) on 4 ranks of 64 rows: pair 1's two head offsets (heads
    # 4, 6 and 5, 7) keep shifted rows on both ranks, so they go as one [B, 2, M, 2, D]
    # message, computed as one block of both offsets (one call, one merge)
    pattern = ra.DilatedPattern((64, 128), (1, 2), "head_groups")
    plan = plan_view(pattern, 256, 8, 8, False, 4, layout)
    messages = [m for step in plan.steps for sent in step.sends.values() for m in sent]
    blocks = [b for step in plan.steps for got in step.blocks.values() for b in got]
    pair_1 = [m.offsets for m in messages if m.kv_heads.values()[0] >= 4]
    assert pair_1 and set(pair_1) == {2}
    assert {m.offsets for m in messages if m.kv_heads.values()[0] < 4} <= {1}  # pair 0: one offset
    assert {b.offsets for b in blocks if b.heads.start >= 4} == {2}
