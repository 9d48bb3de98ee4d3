"""ring_attention.schedule: what the executor derives from a rank's plan (writes or merges,
adoption, gradient adds, launches), checked against brute-force counts over the plan's
cells and against the dense reference."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
import torch

import ring_attention as ra
from ring_attention import autograd, blocks, executable, plans, schedule
from ring_attention.comm import SimulatedRing
from ring_attention.entry import FULL, attend
from ring_attention.executable import PlanKey
from ring_attention.masks import SequenceMask
from ring_attention.options import Options
from ring_attention.plans import rank_plan
from tests.inputs import PLAN_CASES, PLAN_PATTERNS, check_against_reference, qkv, recording


@pytest.mark.parametrize("gather_limit", [0, 2**40])
@pytest.mark.parametrize("batch, causal", [(1, False), (2, True)])
def test_head_offsets_batched_or_one_by_one_match_the_reference(gather_limit, batch, causal):
    """A pair's head offsets run as one launch over a strided view, or (past the gather
    limit) one by one: the same result either way, forward and backward."""
    pattern = ra.DilatedPattern((8, 16), (2, 4))  # segments of several runs: offsets need a gather
    torch.manual_seed(7)
    q, k, v = (torch.randn(batch, 32, 4, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    g = torch.randn(batch, 32, 4, 8, dtype=torch.float64)
    check_against_reference(q, k, v, (q, k, v), pattern, causal, g, Options(max_gather_bytes=gather_limit))


@pytest.mark.parametrize("mode", ["mixture", "head_groups"])
@pytest.mark.parametrize("batch, causal", [(1, False), (2, True)])
def test_calls_split_into_launches_of_fewer_runs_match_the_reference(monkeypatch, mode, batch, causal):
    """A call over more than 1/Options.max_call_share of the shard's cells runs as several launches
    of fewer runs: whole calls (a share of 1) and one run per launch (a huge share) give
    the reference's result, forward and backward, on one device and on a ring."""
    launches = recording(monkeypatch, "attention_forward")
    pattern = ra.DilatedPattern((16, 32), (1, 2), mode)
    torch.manual_seed(5)
    q, k, v = (torch.randn(batch, 64, 4, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    g = torch.randn(batch, 64, 4, 8, dtype=torch.float64)
    counts = []
    for share in (1, 10**9):
        options = Options(max_call_share=share, min_split_bytes=0)
        check_against_reference(q, k, v, (q, k, v), pattern, causal, g, options)
        out = attend(q, k, v, pattern, causal=causal, ring_size=2, options=options)
        ref = ra.reference_attention(q, k, v, pattern=pattern, causal=causal)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
        with torch.no_grad():
            launches.clear()
            attend(q, k, v, pattern, causal=causal, options=options)
            counts.append(len(launches))
    assert counts[1] > counts[0]


def _reordered(plan: blocks.RankPlan) -> blocks.RankPlan:
    """The same blocks and calls, run in reverse order."""
    def flip(blks):
        return tuple(dataclasses.replace(b, calls=b.calls[::-1]) for b in blks[::-1])

    steps = {s: dataclasses.replace(step, blocks=flip(step.blocks)) for s, step in plan.steps.items()}
    return dataclasses.replace(plan, local=flip(plan.local), steps=steps)


@pytest.mark.parametrize(
    "pattern, causal, ring_size, layout",
    [
        (ra.DilatedPattern((8, 16, 32), (1, 2, 4)), False, 1, "contiguous"),  # mixture: pairs overlap
        (ra.DilatedPattern((8, 16, 32), (1, 2, 4)), True, 2, "zigzag"),
        (ra.DilatedPattern((16, 32), (2, 3), mode="head_groups"), False, 2, "contiguous"),
        (None, True, 4, "zigzag"),
    ],
)
def test_write_or_merge_is_decided_by_the_executor_for_any_order(pattern, causal, ring_size, layout):
    n, h, hkv = 32, 4, 2
    q, k, v = qkv(2, n, h, hkv, 8, seed=3)
    expected = ra.reference_attention(q, k, v, pattern=pattern, causal=causal)
    ring = SimulatedRing(ring_size)
    for order in (lambda p: p, _reordered):
        rank_plans = tuple(order(p) for p in plans.ring_plans(pattern, n, h, hkv, causal, ring_size, layout, ring.ranks))
        key = PlanKey(pattern, n, h, hkv, SequenceMask(causal), ring_size, layout, ring.ranks, 2, 8, q.dtype)
        out = autograd.run_on_ring(executable.build(key, rank_plans), ring, 8**-0.5, q, k, v)
        torch.testing.assert_close(out, expected)


def _gradient_adds(plan) -> int:
    """The most gradients any cell of dQ, dK or dV gets, counted cell by cell."""
    adds = Counter()
    for blk in plan.local:
        q_rows, k_rows, kv = blk.q_rows.values(), blk.k_rows.values(), blk.kv_index.values()
        heads = range(blk.heads.start, blk.heads.stop, blk.heads.step)
        for c in blk.calls:
            qs = q_rows[c.q_start : c.q_start + c.runs * c.q_len]
            ks = k_rows[c.k_start : c.k_start + c.runs * c.k_len]
            for o in range(blk.offsets):
                for h, g in zip(heads, kv):
                    adds.update(("q", r + o, h + o) for r in qs)
                    adds.update(("k", r + o, g + o) for r in ks)
    return max(adds.values())


@pytest.mark.parametrize("name, n, h, hkv, causal", PLAN_CASES)
def test_gradient_adds_bound_every_cell(name, n, h, hkv, causal):
    plan = rank_plan(PLAN_PATTERNS[name], n, h, hkv, causal, 1, "contiguous", 0)
    bound, exact = schedule.analyse(plan).gradient_adds, _gradient_adds(plan)
    assert bound >= exact
    if name == "mixture" and h == hkv:  # two pairs, one head per kv head: two per cell
        assert bound == exact == 2


RING_CASES = [  # (pattern, N, H, Hkv, causal, ring size, layout)
    (ra.DilatedPattern((8, 16, 32), (1, 2, 4)), 32, 4, 2, False, 1, "contiguous"),  # mixture: pairs share heads
    (ra.DilatedPattern((8, 16, 32), (1, 2, 4)), 32, 4, 2, True, 2, "zigzag"),
    (ra.DilatedPattern((16, 32), (2, 3), mode="head_groups"), 32, 4, 2, False, 2, "contiguous"),
    (ra.DilatedPattern((8, 4), (2, 1)), 16, 2, 1, False, 1, "contiguous"),  # a first pair leaves cells empty
    (ra.DilatedPattern((64, 128), (1, 2)), 128, 4, 4, True, 1, "contiguous"),
    (ra.DilatedPattern((16, 32), (1, 2), mode="head_groups"), 32, 4, 4, False, 1, "contiguous"),  # all rows, 2 heads
    (ra.DilatedPattern((4,), (4,)), 4, 4, 1, False, 1, "contiguous"),  # calls of one row
    (None, 32, 2, 2, False, 1, "contiguous"),  # one call covers the shard
    (None, 32, 2, 1, True, 4, "zigzag"),
]


def _call_cells(plan):
    """``(call, block, its (row, head) cells of the query shard)`` in execution order, by brute force."""
    for blk in schedule.blocks_in_order(plan):
        heads = range(blk.heads.start, blk.heads.stop, blk.heads.step)
        for c in blk.calls:
            rows = blk.q_rows.values()[c.q_start : c.q_start + c.runs * c.q_len]
            yield c, blk, {(r + o, h + o) for o in range(blk.offsets) for r in rows for h in heads}


def _plans(pattern, n, h, hkv, causal, ring_size, layout):
    return plans.ring_plans(pattern, n, h, hkv, SequenceMask(causal), ring_size, layout, tuple(range(ring_size)))


@pytest.mark.parametrize("case", RING_CASES)
def test_a_call_writes_only_cells_no_call_before_it_touched(case):
    for plan in _plans(*case):
        sched, touched, before_merge, merged = schedule.analyse(plan), set(), 0, False
        for c, _, cells in _call_cells(plan):
            if sched.writes[c]:
                assert not cells & touched, "a call writes over a cell an earlier call computed"
            merged = merged or not sched.writes[c]
            before_merge += 0 if merged else len(cells)
            touched |= cells
        assert sched.merges == merged
        assert sched.cells_before_merge == before_merge
        n = case[1] // case[5]
        assert sched.covers(schedule.Shard(1, n, case[2], 8, 8)) == (before_merge == n * case[2])


@pytest.mark.parametrize("case", RING_CASES)
def test_the_adopted_call_alone_computes_every_cell_in_order(case):
    n, h = case[1] // case[5], case[2]
    for plan in _plans(*case):
        sched = schedule.analyse(plan)
        first_call, first_blk, cells = next(_call_cells(plan))
        in_order = first_blk.q_rows.values()[: n] == list(range(n)) and first_blk.offsets == 1
        alone = in_order and cells == {(r, hd) for r in range(n) for hd in range(h)}
        assert (sched.adopted is first_call) == alone
        if sched.adopted_kv:  # its keys and values: every row and kv head of the own shard
            assert first_blk.source is None and first_blk.k_rows.values() == list(range(n))
            assert first_blk.kv_index.values() == list(range(h))


@pytest.mark.parametrize("case", RING_CASES)
def test_gradient_adds_bound_every_cell_on_a_ring(case):
    for plan in _plans(*case):
        adds = Counter()
        for blk in schedule.blocks_in_order(plan):
            step = next((s for s, st in plan.steps.items() if blk in st.blocks), 0)
            q_rows, k_rows, kv = blk.q_rows.values(), blk.k_rows.values(), blk.kv_index.values()
            heads = range(blk.heads.start, blk.heads.stop, blk.heads.step)
            for c in blk.calls:
                for o in range(blk.offsets):
                    for hd, g in zip(heads, kv):
                        adds.update(("q", r + o, hd + o) for r in q_rows[c.q_start : c.q_start + c.runs * c.q_len])
                        keys = k_rows[c.k_start : c.k_start + c.runs * c.k_len]
                        adds.update((step, blk.source, r + o, g + o) for r in keys)
        assert schedule.analyse(plan).gradient_adds >= max(adds.values(), default=0)


@pytest.mark.parametrize("options", [
    Options(), Options(max_call_share=10**9, min_split_bytes=0), Options(max_gather_bytes=0),
    Options(max_call_share=8, min_split_bytes=0, max_gather_bytes=0),
])
@pytest.mark.parametrize("batch", [1, 2])
def test_launches_cover_each_run_of_a_call_once_per_head_offset(options, batch):
    pattern = ra.DilatedPattern((8, 20, 40), (2, 1, 4))  # calls of 5 runs; head offsets batched in blocks
    shard = schedule.Shard(batch, 40, 8, 16, 8)
    plan = plans.rank_plan(pattern, 40, 8, 8, SequenceMask(False), 1, "contiguous", 0)
    sched = schedule.analyse(plan)
    for blk in schedule.blocks_in_order(plan):
        for c in blk.calls:
            adopted = c is sched.adopted
            pieces = schedule.launches(blk, c, shard, options, adopted, 3, 2)
            covered = Counter((piece.q_start + i * piece.q_len, piece.k_start + i * piece.k_len, o)
                              for piece, g in pieces for i in range(piece.runs) for o in range(g.start, g.stop))
            expected = {(c.q_start + i * c.q_len, c.k_start + i * c.k_len, o)
                        for i in range(c.runs) for o in range(blk.offsets)}
            assert set(covered) == expected and set(covered.values()) == {1}
            for piece, g in pieces:
                assert (piece.q_len, piece.k_len, piece.mask) == (c.q_len, c.k_len, c.mask)
                rel = piece.q_start - c.q_start
                assert piece.q_rows.values() == c.q_rows.values()[rel : rel + piece.runs * piece.q_len]
                per_run = (g.stop - g.start) * c.q_len * len(range(*blk.heads.indices(8)))
                if not adopted and options.min_split_bytes == 0:  # a share of the shard's cells, or one run
                    assert piece.runs * per_run <= max(per_run, shard.cells // options.max_call_share)


@pytest.mark.parametrize("q_len, chunk_rows", [(10, 3), (10, 5), (10, 9), (7, 1), (64, 16), (65, 16)])
def test_causal_chunks_cut_a_causal_call_into_rows_against_the_keys_up_to_each(q_len, chunk_rows):
    """Row chunks partition the call's rows in order, each at most chunk_rows (and within one
    of each other) unless that takes more than MAX_CALL_CHUNKS, against keys from the call's
    first to the chunk's last row."""
    c = blocks.Call(5, 5, 1, q_len, q_len, ra.masks.BlockMask.CAUSAL, blocks.Rows.of(range(100, 100 + 2 * q_len, 2)))
    chunks = schedule.causal_chunks(c, chunk_rows)
    assert [r for piece in chunks for r in piece.q_rows.values()] == c.q_rows.values()
    assert sum(piece.q_len for piece in chunks) == q_len
    assert len(chunks) == min(-(-q_len // chunk_rows), schedule.MAX_CALL_CHUNKS)
    assert max(p.q_len for p in chunks) - min(p.q_len for p in chunks) <= 1
    for piece in chunks:
        assert (piece.k_start, piece.runs, piece.mask) == (5, 1, c.mask)
        assert piece.k_len == piece.q_start - c.q_start + piece.q_len  # keys up to the chunk's last row


def test_only_a_long_causal_call_of_one_run_not_adopted_runs_in_chunks():
    causal, full = ra.masks.BlockMask.CAUSAL, ra.masks.BlockMask.FULL
    rows = blocks.Rows.of(range(64))
    one = blocks.Call(0, 0, 1, 64, 64, causal, rows)
    assert schedule.chunked(one, 16) and not schedule.chunked(one, 64) and not schedule.chunked(one, None)
    assert not schedule.chunked(blocks.Call(0, 0, 4, 16, 16, causal, rows), 8)  # split by runs instead
    assert not schedule.chunked(blocks.Call(0, 0, 1, 64, 64, full, rows), 16)
    plan = plans.rank_plan(None, 64, 2, 2, SequenceMask(True), 1, "contiguous", 0)
    blk = plan.local[0]
    shard = schedule.Shard(1, 64, 2, 8, 8)
    assert len(schedule.launches(blk, blk.calls[0], shard, Options(), False, 3, 2, chunk_rows=16)) == 4
    assert len(schedule.launches(blk, blk.calls[0], shard, Options(), True, 3, 2, chunk_rows=16)) == 1  # adopted
    assert len(schedule.launches(blk, blk.calls[0], shard, Options(), False, 3, 2)) == 1  # the backward's


@pytest.mark.parametrize("pattern, documents, ring_size, layout, chunks", [
    # documents under a quarter of the shard: each causal call quarantines its own keys
    (None, (0, 9, 29, 30, 52, 73, 96), 1, "contiguous", True),
    (None, (0, 9, 19, 20, 30, 41, 50, 60, 70, 80, 90, 96), 2, "zigzag", True),
    (ra.DilatedPattern((32,), (2,)), (0, 12, 32, 46, 64, 80, 96), 1, "contiguous", True),
    # whole: an adopted call (its results become the accumulators: one device, and in float64
    # a ring's local block), and a rank that splits its sources (several causal calls over a
    # quarter of one or more)
    (None, None, 1, "contiguous", False),
    (None, None, 4, "contiguous", False),
    (ra.DilatedPattern((8, 64), (1, 1)), (0, 32, 96), 1, "contiguous", False),
])
def test_a_causal_blocks_forward_in_row_chunks_matches_the_reference(monkeypatch, pattern, documents, ring_size,
                                                                     layout, chunks):
    """Options.causal_chunks forced on the CPU (where chunks run on an additive mask): the
    reference's output, NaN (and inf, in a block no merge meets) where it has them, and
    gradients; more launches than whole blocks take where the chunks ran."""
    launches = recording(monkeypatch, "attention_forward")
    torch.manual_seed(3)
    q, k, v = (torch.randn(1, 96, 2, 8, dtype=torch.float64) for _ in range(3))
    g = torch.randn(1, 96, 2, 8, dtype=torch.float64)
    bad = v.clone()
    bad[0, 20, 0, 1], bad[0, 60, 1, 2] = float("nan"), float("nan")
    if pattern is None and ring_size == 1:  # an inf's sum: a merge's lerp makes it NaN (merge.py)
        bad[0, 61, 1, 2] = float("inf")
    counts = []
    for causal_chunks in (1, 16):
        options = Options(causal_chunks=causal_chunks, min_split_bytes=0)
        with torch.no_grad():
            launches.clear()
            out = attend(q, k, bad, FULL if pattern is None else pattern, causal=True, ring_size=ring_size,
                         layout=layout, options=options, cu_seqlens=documents)
            counts.append(len(launches))
        ref = ra.reference_attention(q, k, bad, pattern=pattern, causal=True, cu_seqlens=documents)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10, equal_nan=True)
        assert torch.equal(out.isposinf(), ref.isposinf())
        leaves_ = [t.clone().requires_grad_() for t in (q, k, v)]
        out = attend(*leaves_, FULL if pattern is None else pattern, causal=True, ring_size=ring_size, layout=layout,
                     options=options, cu_seqlens=documents)
        ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = ra.reference_attention(*ref_leaves, pattern=pattern, causal=True, cu_seqlens=documents)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
        for a, e in zip(torch.autograd.grad((out * g).sum(), leaves_), torch.autograd.grad((ref * g).sum(), ref_leaves)):
            torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-10)
    assert (counts[1] > counts[0]) == chunks, counts


def test_chunk_rows_are_a_share_of_the_shard_but_not_below_the_split_bytes():
    shard = schedule.Shard(1, 1024, 4, 16, 2)  # a row: 128 bytes
    assert schedule.chunk_rows(shard, Options(causal_chunks=1)) is None
    assert schedule.chunk_rows(shard, Options(causal_chunks=16, min_split_bytes=0)) == 64
    assert schedule.chunk_rows(shard, Options(causal_chunks=16, min_split_bytes=128 * 100)) == 100
    assert schedule.chunk_rows(shard, Options(causal_chunks=3, min_split_bytes=0)) == 342
