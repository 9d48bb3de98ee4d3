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
    spec = plans._spec(pattern, n, 4, 4, SequenceMask(documents=documents), ring_size, L.check_layout(layout))
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
    assert runs.window_tile(SequenceMask(causal=True, window=(4095, 0)), 1) == 1024  # a quarter of 4096
    assert runs.window_tile(SequenceMask(causal=True, window=(4095, 0)), 4) == 256  # kept rows of rate 4
    assert runs.window_tile(SequenceMask(window=(10, 10)), 1) == runs.MIN_WINDOW_TILE
    mask = SequenceMask(causal=True, window=(1023, 0))
    spec = plans._spec(None, 8192, 1, 1, mask, 2, L.Layout.CONTIGUOUS)
    lengths = [run.length for run in runs.kept(spec, 1, 0).runs]
    assert lengths == [256] * 16  # the shard of 4096 rows in tiles of 1024 / 4
