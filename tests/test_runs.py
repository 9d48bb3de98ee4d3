"""ring_attention.runs: the rows a rank keeps, as SEMANTICS.md selects them, and a window's tiles."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

import ring_attention as ra
from ring_attention import layout as L
from ring_attention import plans, runs
from ring_attention.masks import SequenceMask


@given(st.sampled_from([1, 2, 4]), st.sampled_from(list(ra.Layout)), st.integers(1, 4), st.integers(1, 3),
       st.sets(st.integers(1, 63), max_size=3))
def test_every_rank_keeps_the_rows_of_its_shard_that_the_pattern_selects(ring_size, layout, rate, pairs, cuts):
    """Per unit, the union over ranks of their kept positions is SEMANTICS.md's
    ``((p - c_seg) mod w') mod r == o`` over the segments (restarting at every document),
    each position once, each rank's within its shard, in increasing packed order."""
    n = 64
    documents = (0, *sorted(cuts), n) if cuts else None
    # segments that divide N, or with documents that cover each one whole (min(w, L_d) = L_d)
    lengths = (8, 16, 32) if documents is None else (64, 128, 256)
    pattern = ra.DilatedPattern(lengths[:pairs], (rate,) * pairs)
    spec = plans._spec(pattern, n, 4, 4, SequenceMask(documents=documents), ring_size, L.check_layout(layout), 16)
    for u, unit in enumerate(spec.units):
        bounds, r = spec.bounds[unit.pair], spec.rates[unit.pair]
        offset = unit.heads.start % r
        want = [p for s, e in zip(bounds, bounds[1:]) for p in range(s, e) if (p - s) % r == offset]
        got = []
        for rank in range(ring_size):
            shard = [p for a, b in L.shard_intervals(n, ring_size, rank, layout, documents) for p in range(a, b)]
            kept = runs.kept(spec, rank, u)
            positions = [shard[i] for i in kept.rows.values()]
            assert positions == sorted(positions)
            assert sum(run.length for run in kept.runs) == len(positions)
            got += positions
        assert sorted(got) == want


def test_a_window_of_finite_width_cuts_runs_into_tiles():
    assert runs.window_tile(SequenceMask(causal=True), 1) is None
    assert runs.window_tile(SequenceMask(window=(-1, 5)), 1) is None  # unbounded on the left
    assert runs.window_tile(SequenceMask(causal=True, window=(4095, 0)), 1) == 256  # a sixteenth of 4096
    assert runs.window_tile(SequenceMask(causal=True, window=(4095, 0)), 4) == 64  # kept rows of rate 4
    assert runs.window_tile(SequenceMask(causal=True, window=(6000, 0)), 1) == 256  # 376, rounded down
    assert runs.window_tile(SequenceMask(window=(10, 10)), 1) == runs.MIN_WINDOW_TILE
    mask = SequenceMask(causal=True, window=(4095, 0))
    spec = plans._spec(None, 8192, 1, 1, mask, 2, L.Layout.CONTIGUOUS, 16)
    lengths = [run.length for run in runs.kept(spec, 1, 0).runs]
    assert lengths == [256] * 16  # the shard of 4096 rows in tiles of 4096 / 16


@given(st.integers(1, 3), st.integers(0, 40), st.integers(1, 12), st.lists(st.tuples(st.integers(0, 60), st.integers(1, 12)),
       min_size=1, max_size=3), st.integers(-1, 9), st.integers(-1, 9), st.booleans())
def test_a_key_run_is_cut_to_exactly_the_keys_its_queries_reach(rate, k_first, k_len, queries, left, right, causal):
    """``reached`` keeps every key of the run that the band of some query seeing it holds, and
    drops the keys outside the hull of those bands (rows ``rate`` apart, packed index alike)."""
    if (left, right) == (-1, -1):
        left = 3
    mask = SequenceMask(causal=causal, window=(left, right))
    k = runs.Run(0, k_first, 100, k_len)
    qs = [runs.Run(0, first, 0, length) for first, length in queries]
    keys = [k.first + rate * t for t in range(k.length)]
    pos = lambda run: [run.first + rate * t for t in range(run.length)]  # noqa: E731
    def reaches(q):
        return {j for i in pos(q) for j in keys
                if (left < 0 or j >= i - left) and (right < 0 or j <= i + right) and (not causal or j <= i)}

    seen_by = [q for q in qs if reaches(q)]  # as the planner passes them: the queries that see k
    reach = set().union(*map(reaches, seen_by))
    if not reach:
        return
    cut = runs.reached(k, seen_by, mask, rate)
    kept = pos(cut)
    assert reach <= set(kept) and set(kept) <= set(keys)
    assert cut.start - k.start == (cut.first - k.first) // rate
    assert min(kept) == min(reach) or (left < 0 and min(kept) == k.first)
    assert max(kept) == max(reach) or ((right < 0 and not causal) and max(kept) == keys[-1])


def test_a_windows_tiles_batch_their_edge_blocks_into_one_call_per_mask():
    """Tiles of a power of two meet the band's edges at the same offsets: the diagonal blocks of
    every tile run as one call, the band's edge blocks as one more (the masked blocks are grouped
    by mask before batching; only neighbours batch)."""
    from ring_attention.masks import Band, BlockMask

    n = 8192
    mask = SequenceMask(causal=True, window=(n // 8 - 1, 0))
    local = plans.ring_plans(None, n, 1, 1, mask, 4, L.Layout.CONTIGUOUS, range(4))[1].local
    calls = [c for blk in local for c in blk.calls]
    tiles = n // 4 // runs.window_tile(mask, 1)
    diagonal = [c for c in calls if c.mask is BlockMask.CAUSAL]
    edges = [c for c in calls if isinstance(c.mask, Band)]
    assert len(diagonal) == 1 and diagonal[0].runs == tiles
    assert len(edges) == 1 and edges[0].runs == tiles // 2  # the tiles a band's edge cuts on this rank


def test_in_wide_tiles_a_query_tile_meets_its_band_in_one_call():
    """Tiles as wide as the band (flash's window): a query tile's key runs that follow each
    other join into one block (runs.joined_keys), so each tile's rows are written by one call
    and nothing merges; narrow tiles (the CPU op) keep them apart, where the joined block's
    masked half would be computed."""
    from ring_attention import schedule

    mask = SequenceMask(causal=True, window=(255, 0))
    wide = plans.rank_plan(None, 2048, 1, 1, mask, 1, "contiguous", 0, band_tiles=1)
    calls = [c for blk in wide.local for c in blk.calls]
    assert sorted(c.q_start for c in calls for _ in range(c.runs)) == list(range(0, 2048, 256))
    assert [(c.q_len, c.k_len) for c in calls] == [(256, 256)] + [(256, 512)] * 7
    assert not schedule.analyse(wide).merges
    narrow = plans.rank_plan(None, 2048, 1, 1, mask, 1, "contiguous", 0, band_tiles=16)
    assert schedule.analyse(narrow).merges
