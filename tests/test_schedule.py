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
from ring_attention.entry import attend
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
        out = autograd.run_on_ring(executable.build(key, rank_plans), ring, 8**-0.5, layout, q, k, v)
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
