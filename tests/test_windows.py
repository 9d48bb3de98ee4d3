"""Sliding windows ``window=(left, right)`` on the fast paths (SEMANTICS.md, "Masks on
positions"): dilated, ring and ring-dilated attention with ``group=None``, one device or a
simulated ring, against the float64 reference with the same window, forward and backward.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ring_attention as ra
from ring_attention import layout as _layout
from ring_attention.masks import BlockMask, SequenceMask
from ring_attention.plans import ring_plans
from tests.inputs import LAYOUTS, assert_matches, fwd_bwd, make_qkv, record_sent_bytes
from tests.strategies import divisors

TOL = dict(rtol=1e-10, atol=1e-10)
GRAD_TOL = dict(rtol=1e-9, atol=1e-9)


def _run(fn_name, q, k, v, pattern, **kwargs):
    if fn_name == "dilated":
        return ra.dilated_attention(q, k, v, pattern, **kwargs)
    if pattern is None:
        return ra.ring_attention(q, k, v, **kwargs)
    return ra.ring_dilated_attention(q, k, v, pattern, **kwargs)


def _check(q, k, v, g, pattern, causal, window, **kwargs):
    """Output and gradients of the fast path against the reference, both with ``window``."""
    fn = "dilated" if "ring_size" not in kwargs else "ring"
    got = fwd_bwd(lambda q, k, v: _run(fn, q, k, v, pattern, causal=causal, window=window, **kwargs), q, k, v, g)
    want = fwd_bwd(lambda q, k, v: ra.reference_attention(q, k, v, pattern=pattern, causal=causal, window=window),
                   q, k, v, g)
    assert_matches(got, want, grad_tol=GRAD_TOL, **TOL)
    return got[0]


@st.composite
def small_patterns(draw, n):
    """``None`` (full attention) or a small dilated pattern whose segments divide ``n``."""
    if draw(st.booleans()):
        return None
    pairs = draw(st.integers(1, 2))
    ws = [draw(st.sampled_from(divisors(n))) for _ in range(pairs)]
    rs = [draw(st.integers(1, min(w, 4))) for w in ws]
    return ra.DilatedPattern(tuple(ws), tuple(rs), mode=draw(st.sampled_from(["mixture", "head_groups"])))


@st.composite
def window_cases(draw):
    ring_size = draw(st.sampled_from([1, 2, 4]))
    layout = draw(st.sampled_from([*LAYOUTS, "documents"]))
    parts = ring_size * _layout.chunks_per_rank(layout)
    n = parts * draw(st.integers(1, max(1, 32 // parts)))
    h, hkv = draw(st.sampled_from([(1, 1), (2, 1), (2, 2), (4, 2)]))
    pattern = draw(small_patterns(n))
    if pattern is not None and pattern.mode == "head_groups" and len(pattern.segment_lengths) > h:
        pattern = ra.DilatedPattern(pattern.segment_lengths[:1], pattern.dilation_rates[:1])
    side = st.integers(-1, n)
    return dict(
        ring_size=ring_size, layout=layout, n=n, h=h, hkv=hkv, pattern=pattern,
        causal=draw(st.booleans()), window=(draw(side), draw(side)), seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=60, deadline=None)
@given(case=window_cases())
def test_window_matches_reference_on_a_simulated_ring(case):
    q, k, v, g = make_qkv(case["seed"], 1, case["n"], case["h"], case["hkv"], 4)
    _check(q, k, v, g, case["pattern"], case["causal"], case["window"], ring_size=case["ring_size"],
           layout=case["layout"])


@settings(max_examples=40, deadline=None)
@given(case=window_cases())
def test_window_matches_reference_in_tiles(case):
    """Runs cut into tiles of one row and more (runs.MIN_WINDOW_TILE lowered): every tile
    pair the band reaches computed once, none outside it, on every ring and layout."""
    from ring_attention import executable, runs

    q, k, v, g = make_qkv(case["seed"], 1, case["n"], case["h"], case["hkv"], 4)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runs, "MIN_WINDOW_TILE", 1)
        executable.clear()  # plans of the default tile are cached under the same key
        try:
            _check(q, k, v, g, case["pattern"], case["causal"], case["window"], ring_size=case["ring_size"],
                   layout=case["layout"])
        finally:
            executable.clear()


@settings(max_examples=40, deadline=None)
@given(case=window_cases())
def test_window_matches_reference_in_wide_tiles(case):
    """Tiles as wide as the band (Options.band_tiles=1, what a GPU whose flash runs a band on
    its own window is given): each tile meets a band block or two, every pair once."""
    import dataclasses

    from ring_attention import entry, executable, runs

    q, k, v, g = make_qkv(case["seed"], 1, case["n"], case["h"], case["hkv"], 4)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runs, "MIN_WINDOW_TILE", 1)
        mp.setattr(entry, "resolved", lambda options, q: dataclasses.replace(options, band_tiles=1))
        executable.clear()
        try:
            _check(q, k, v, g, case["pattern"], case["causal"], case["window"], ring_size=case["ring_size"],
                   layout=case["layout"])
            assert all(p.key.options.band_tiles == 1 for p in executable._CACHE.values())
        finally:
            executable.clear()


@settings(max_examples=25, deadline=None)
@given(case=window_cases())
def test_window_matches_reference_in_dilated_attention(case):
    q, k, v, g = make_qkv(case["seed"], 2, case["n"], case["h"], case["hkv"], 4)
    pattern = case["pattern"] or ra.DilatedPattern((case["n"],), (1,))
    _check(q, k, v, g, pattern, case["causal"], case["window"])


@pytest.mark.parametrize("window, causal", [((5, 0), True), ((0, 0), False), ((3, 7), False), ((20, -1), True),
                                            ((-1, 2), False), ((1, 40), True)])
@pytest.mark.parametrize("ring_size, layout", [(1, "contiguous"), (2, "zigzag"), (4, "contiguous")])
def test_window_on_blocks_the_cpu_op_runs(window, causal, ring_size, layout):
    """Blocks of 16 keys and more run on the fused CPU op with the band as an additive mask
    (smaller ones on math): rows at a band's ends have no key in their block."""
    q, k, v, g = make_qkv(7, 2, 128, 4, 2, 8)
    _check(q, k, v, g, None, causal, window, ring_size=ring_size, layout=layout)
    pattern = ra.DilatedPattern((32, 64), (1, 2))
    _check(q, k, v, g, pattern, causal, window, ring_size=ring_size, layout=layout)


@pytest.mark.parametrize("window", [(0, 9), (9, 0), (3, 3)])
def test_head_offsets_batch_only_where_their_positions_shift_too(window):
    """The documents layout's chunks of one row: a rate-3 pattern's head offsets keep local
    rows shifted by one, but global positions shifted by 7 or 1 (across chunks), so their
    bands differ and the offsets must not run as one batch (Hypothesis found this)."""
    q, k, v, g = make_qkv(0, 1, 32, 2, 2, 4)
    _check(q, k, v, g, ra.DilatedPattern((32,), (3,)), False, window, ring_size=4, layout="documents")


def test_rows_without_a_key_in_the_window_are_exactly_zero():
    """Window (0, -1) with causal=True keeps only ``j == i``; a rate-2 pattern (8, 2) then
    keeps the row only for heads of its offset: every other (row, head) has no key."""
    q, k, v, g = make_qkv(3, 1, 32, 2, 2, 4)
    pattern = ra.DilatedPattern((8,), (2,))
    out = _check(q, k, v, g, pattern, True, (0, -1), ring_size=2)
    rows = torch.arange(32)
    for h in range(2):
        empty = rows % 2 != h
        assert (out[0, empty, h] == 0).all()
        assert (out[0, ~empty, h] != 0).all()
    # right=0 without causal on the first rows of a long window: nothing empty, nothing NaN
    out = _check(q, k, v, g, None, False, (40, 0), ring_size=4, layout="zigzag")
    assert torch.isfinite(out).all()


def _sent_bytes(monkeypatch, **kwargs):
    sent = record_sent_bytes(monkeypatch)
    q, k, v, g = make_qkv(0, 1, 64, 2, 2, 8, dtype=torch.float32)
    ref = ra.reference_attention(*(t.double() for t in (q, k, v)), causal=kwargs.get("causal", False),
                                 window=kwargs.get("window"))
    out = ra.ring_attention(q, k, v, ring_size=4, **kwargs)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    out.backward(g)
    monkeypatch.undo()
    return sent[0]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_narrow_window_sends_fewer_bytes(monkeypatch, layout):
    """Keys no query's band reaches are never sent: with ``window=(4, 4)`` on 4 ranks of 16
    rows, a rank needs only its neighbours' keys, and of those only the 4 its band reaches,
    once: the backward reuses what the forward received."""
    full = _sent_bytes(monkeypatch, layout=layout)
    narrow = _sent_bytes(monkeypatch, layout=layout, window=(4, 4))
    assert 0 < narrow < full
    causal = _sent_bytes(monkeypatch, layout=layout, causal=True)
    assert _sent_bytes(monkeypatch, layout=layout, causal=True, window=(4, 0)) < causal
    if layout == "contiguous":  # only the rank before's last 4 keys (of 16): K and V out, dK and dV back
        reached = 4 * 2 * 8 * 4
        assert _sent_bytes(monkeypatch, layout=layout, causal=True, window=(4, 0)) == 3 * 2 * 2 * reached


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("window", [(0, 0), (3, 5), (12, -1), (-1, 0)])
@pytest.mark.parametrize("causal", [False, True])
def test_a_ring_plan_computes_exactly_the_cells_in_the_band(layout, window, causal):
    """Every (query, key, head) cell of the band is computed once, nothing outside it (a
    block outside the band is neither computed nor sent)."""
    n, h, r = 32, 2, 4
    pattern = ra.DilatedPattern((8, 16), (1, 2))
    mask = SequenceMask(causal=causal, window=window)
    plans = ring_plans(pattern, n, h, h, mask, r, layout, range(r))
    cells = sum(plan.attended_pairs() for plan in plans)
    from ring_attention import pattern as _pattern

    w = _pattern.weights(pattern, n, h, is_causal=causal, window=window)
    assert cells == int(w.sum())


def _kernel_cells(plans_):
    """Score cells the kernels compute: whole blocks, but the lower triangle of a causal one."""
    cells = 0
    for plan in plans_:
        for blk in list(plan.local) + [b for s in plan.steps.values() for b in s.blocks]:
            for c in blk.calls:
                per_run = c.q_len * (c.q_len + 1) // 2 if c.mask is BlockMask.CAUSAL else c.q_len * c.k_len
                cells += per_run * c.runs * blk.offsets * len(range(blk.heads.start, blk.heads.stop, blk.heads.step))
    return cells


@pytest.mark.parametrize("layout, bound", [("contiguous", 1.05), ("zigzag", 1.05)])
def test_a_mistral_window_computes_near_its_band(layout, bound):
    """Window (N/8, 0), causal, ring of 4: whole shards cut by the band would compute 3.7x
    (contiguous) and 1.5x (zigzag) its pairs; in tiles of a sixteenth of the band, blocks
    outside it are skipped, and a received tile is cut to the keys the band reaches
    (measured: 1.03x in both)."""
    from ring_attention import pattern as _pattern

    n = 8192
    mask = SequenceMask(causal=True, window=(n // 8, 0))
    cells = _kernel_cells(ring_plans(None, n, 1, 1, mask, 4, layout, range(4)))
    band = _pattern.computed_pairs(None, n, 1, is_causal=True, window=(n // 8, 0))
    assert band < cells <= bound * band


@pytest.mark.parametrize("layout, bound", [("contiguous", 0.2), ("zigzag", 0.23)])
def test_a_mistral_window_sends_at_most_a_fifth_of_the_full_rings_bytes(monkeypatch, layout, bound):
    """The busiest rank's bytes, window (N/8, 0) against full causal attention, ring of 4:
    only the keys the band reaches travel, once (the backward reuses the forward's), then
    their dK/dV back (measured: 0.167x contiguous, 0.222x zigzag)."""
    from perf.counters import ring_traffic

    n = 2048
    q, k, v, g = make_qkv(0, 1, n, 1, 1, 4, dtype=torch.float32)

    def busiest(**window):
        with ring_traffic() as sent:
            out = ra.ring_attention(q, k, v, ring_size=4, layout=layout, causal=True, **window)
            torch.autograd.grad(out, (q, k, v), g)
        return max(sent.values())

    assert busiest(window=(n // 8, 0)) <= bound * busiest()


@pytest.mark.parametrize("window, error", [((-2, 0), ValueError), ((1,), TypeError), ("ab", TypeError),
                                           ((1.5, 0), TypeError), (3, TypeError)])
def test_bad_windows_raise_naming_window(window, error):
    q, k, v, _ = make_qkv(0, 1, 8, 2, 2, 4)
    for call in (
        lambda: ra.dilated_attention(q, k, v, ra.DilatedPattern((8,), (1,)), window=window),
        lambda: ra.ring_attention(q, k, v, ring_size=2, window=window),
        lambda: ra.ring_dilated_attention(q, k, v, ra.DilatedPattern((4,), (2,)), ring_size=2, window=window),
    ):
        with pytest.raises(error, match="window"):
            call()


def test_no_window_is_none_or_minus_one_pair():
    q, k, v, _ = make_qkv(0, 1, 16, 2, 2, 4, requires_grad=False)
    plain = ra.ring_attention(q, k, v, ring_size=2, causal=True)
    assert torch.equal(ra.ring_attention(q, k, v, ring_size=2, causal=True, window=(-1, -1)), plain)
    assert torch.equal(ra.ring_attention(q, k, v, ring_size=2, causal=True, window=None), plain)


@pytest.mark.parametrize("layout", ["zigzag", "documents"])
def test_a_window_compiles_to_one_graph(layout):
    """torch.compile without a group: the window reaches the custom ops (one graph, no
    break), forward and backward as the reference's."""
    from torch._dynamo.testing import CompileCounter

    q, k, v, g = make_qkv(0, 1, 64, 2, 2, 4)
    counter = CompileCounter()
    pattern = ra.DilatedPattern((16, 32), (1, 2))
    compiled = torch.compile(
        lambda q, k, v: ra.ring_dilated_attention(q, k, v, pattern, ring_size=2, layout=layout, causal=True,
                                                  window=(9, 0)),
        backend=counter, fullgraph=True,
    )
    compiled(q, k, v)
    out = compiled(q, k, v)
    assert counter.frame_count == 1
    ref = ra.reference_attention(q, k, v, pattern=pattern, causal=True, window=(9, 0))
    torch.testing.assert_close(out, ref, **TOL)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, **GRAD_TOL)


@pytest.mark.parametrize("k_len", [8, 24])  # math, and the fused CPU op (16 keys and more)
@pytest.mark.parametrize("band", [(2, 5), (-30, -20), (-3, 0), (10, 40)])
def test_a_band_block_on_the_kernels(k_len, band):
    """One block with a band, forward and backward, against a dense masked softmax: rows
    with no key in the band give out 0 and LSE -inf, and their gradients are 0, not NaN,
    also when their final LSE is -inf (a row that no block gives a key)."""
    from ring_attention import kernels, masks

    q, k, v, _ = make_qkv(5, 2, 24, 3, 3, 8)
    q = q.detach()[:, :20].transpose(1, 2).requires_grad_()
    k, v = (t.detach()[:, :k_len].transpose(1, 2).requires_grad_() for t in (k, v))
    keep = masks.band_keeps(20, k_len, band, q.device)
    s = (q @ k.transpose(-1, -2) * 0.5).masked_fill(~keep, float("-inf"))
    lse_ref = torch.logsumexp(s, -1)
    out_ref = torch.softmax(s, -1).nan_to_num(0.0) @ v
    out, lse = kernels.attention_forward(q, k, v, causal=False, scale=0.5, band=band)
    empty = ~keep.any(-1)
    assert (lse[..., empty] == float("-inf")).all() and (out[..., empty, :] == 0).all()
    torch.testing.assert_close(out, out_ref, **TOL)
    torch.testing.assert_close(lse[..., ~empty], lse_ref[..., ~empty], **TOL)
    dout = torch.randn_like(out)
    grads = kernels.attention_backward(dout, q, k, v, out, lse, causal=False, scale=0.5, band=band)
    want = torch.autograd.grad(out_ref, (q, k, v), dout)
    for a, b in zip(grads, want):
        torch.testing.assert_close(a, b, **GRAD_TOL)


@pytest.mark.parametrize("causal, window", [(False, (5, 9)), (True, (20, 0))])
def test_a_window_in_half_precision_row_tiles(monkeypatch, causal, window):
    """One-rank half precision runs in row tiles (forced small here): a band's runs are
    never cut (its offsets are the block's own), so the result is the reference's."""
    from ring_attention.entry import attend
    from ring_attention.options import Options
    from tests.inputs import qkv, record_row_tiles

    used = record_row_tiles(monkeypatch)
    pattern = ra.DilatedPattern((16, 32, 64), (1, 2, 4))
    q, k, v, g = qkv(2, 256, 4, 2, 16, seed=3, dtype=torch.float16, grad_out=True)
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attend(*ins, pattern, causal=causal, window=window, options=Options(min_tile_bytes=1, min_tiled_bytes=0))
    got = (out, *torch.autograd.grad(out, ins, g))
    assert any(used), "the plan ran whole: nothing tested the tiles"
    r64 = [t.double().requires_grad_() for t in (q, k, v)]
    ref = ra.reference_attention(*r64, pattern=pattern, causal=causal, window=window)
    want = (ref, *torch.autograd.grad(ref, r64, g.double()))
    for label, a, e in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a.double(), e, rtol=2e-2, atol=4e-3, msg=lambda m, x=label: f"{x}: {m}")


@pytest.mark.parametrize("ring_size, layout", [(1, "contiguous"), (2, "zigzag"), (4, "contiguous")])
@pytest.mark.parametrize("causal, window", [(True, (2, 0)), (False, (3, 3)), (False, (0, 9))])
@pytest.mark.parametrize("pattern", [None, ra.DilatedPattern((16, 32), (1, 2))])
def test_non_finite_inputs_reach_the_outputs_the_reference_says(ring_size, layout, causal, window, pattern):
    """A NaN value, an inf key and a NaN query row make exactly the reference's outputs
    non-finite: a key or value outside a row's band never reaches it (no 0 * NaN, no
    inf - inf through the band's additive mask)."""
    q, k, v, _ = make_qkv(11, 1, 64, 2, 2, 8, requires_grad=False)
    v[0, 40, 0, 1] = float("nan")
    k[0, 20, 1, 0] = float("inf")
    q[0, 10, 1, 0] = float("nan")
    out = _run("ring", q, k, v, pattern, ring_size=ring_size, layout=layout, causal=causal, window=window)
    ref = ra.reference_attention(q, k, v, pattern=pattern, causal=causal, window=window)
    assert ref.isnan().any()
    torch.testing.assert_close(out, ref, **TOL, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_a_band_on_cuda_runs_on_flash_with_its_window_or_on_math(dtype):
    """On (fake) CUDA a band's block runs on flash's own sliding window (``_flash_attention_forward``
    and its backward with ``window_size_left/right``) in half precision, every call within what
    the kernel takes; float32 (the efficient kernel, which takes no band) runs on math."""
    from ring_attention import kernels
    from tests.fake_cuda import fake_cuda

    with fake_cuda() as fc:
        q, k, v = (fc.empty(2, 3, 64, 16, dtype=dtype) for _ in range(3))
        out, lse = kernels.attention_forward(q, k, v, causal=False, scale=0.25, band=(-3, 5))
        grads = kernels.attention_backward(torch.ones_like(out), q, k, v, out, lse, causal=False, scale=0.25,
                                           band=(-3, 5))
    assert out.shape == q.shape and out.device.type == "cuda" and all(g.shape == q.shape for g in grads)
    if dtype == torch.float32:  # math: the checker's "unfused attention path", the one thing it flags
        assert fc.checker.violations and all("unfused attention path" in v.reason for v in fc.checker.violations)
        assert not fc.checker.fused_calls
    else:
        fc.assert_clean()
        assert fc.checker.fused_calls == {
            "aten._flash_attention_forward.default": 1, "aten._flash_attention_backward.default": 1}
