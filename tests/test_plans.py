"""What the ring plans send and compute: skipped causal blocks, balance, and dilated traffic."""

import pytest

from ring_attention import DilatedPattern
from ring_attention.packed import index_length
from ring_attention.plans import dilated_plan


def _work(blocks):
    """Scores computed by a rank's blocks (causal diagonal blocks count their triangle)."""
    total = 0
    for blk in blocks:
        heads = len(range(*blk.heads.indices(1 << 20)))
        for c in blk.calls:
            per = c.q_len * (c.q_len + 1) // 2 if c.causal else c.q_len * c.k_len
            total += heads * c.runs * per
    return total


def _rows_sent(plan, shard_len):
    return sum(index_length(m.rows, shard_len) for s in plan.steps for msgs in s.sends.values() for m in msgs)


@pytest.mark.parametrize("ring_size", [2, 4])
def test_contiguous_causal_ring_skips_blocks_above_the_diagonal(ring_size):
    plan = dilated_plan(None, 64, 2, 2, True, ring_size, "contiguous")
    for step in plan.steps:
        for dst in step.blocks:
            assert (dst - step.shift) % ring_size < dst  # only earlier shards are ever received
    assert all(0 not in step.blocks for step in plan.steps)  # rank 0 receives nothing
    # Total work equals the causal triangle: nothing above the diagonal was computed.
    work = sum(_work(plan.local[r]) for r in range(ring_size))
    work += sum(_work(b) for s in plan.steps for b in s.blocks.values())
    assert work == 2 * 64 * 65 // 2


@pytest.mark.parametrize("ring_size", [2, 4])
def test_zigzag_balances_causal_work(ring_size):
    n = 16 * ring_size
    plan = dilated_plan(None, n, 2, 2, True, ring_size, "zigzag")
    per_rank = [_work(plan.local[r]) for r in range(ring_size)]
    for step in plan.steps:
        for dst, blocks in step.blocks.items():
            per_rank[dst] += _work(blocks)
    assert len(set(per_rank)) == 1, per_rank
    assert sum(per_rank) == 2 * n * (n + 1) // 2


def test_segments_inside_shards_need_no_communication():
    plan = dilated_plan(DilatedPattern((4, 8), (1, 2)), 64, 4, 4, False, 4, "contiguous")
    assert plan.steps == ()


@pytest.mark.parametrize("rate", [1, 2, 4])
def test_spanning_segment_sends_only_its_kept_rows(rate):
    n, ring_size = 64, 4
    plan = dilated_plan(DilatedPattern((n,), (rate,), "head_groups"), n, rate, rate, False, ring_size, "contiguous")
    # Every rank sends every other rank its kept rows: n/R/rate rows per offset, rate offsets.
    assert _rows_sent(plan, n // ring_size) == ring_size * (ring_size - 1) * n // ring_size
    # Per (pair, offset) head, that is w/r rows of the segment, not w.
    per_offset = {
        index_length(m.rows, n // ring_size) for s in plan.steps for msgs in s.sends.values() for m in msgs
    }
    assert per_offset == {n // ring_size // rate}


def test_gqa_sends_only_the_kv_heads():
    plan = dilated_plan(None, 32, 8, 2, False, 2, "contiguous")
    for step in plan.steps:
        for msgs in step.sends.values():
            for m in msgs:
                assert index_length(m.kv_heads, 2) == 2
