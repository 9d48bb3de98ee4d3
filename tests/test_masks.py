"""ring_attention.masks: a block's classification agrees with the mask's predicate on every cell."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from ring_attention.masks import Band, BlockMask, SequenceMask, band_keeps, band_rows
from ring_attention.pattern import weights


@st.composite
def run_pairs(draw):
    """Two runs of one segment (increasing positions of one rate), identical or disjoint."""
    rate = draw(st.integers(1, 4))
    q_first, k_first = draw(st.integers(0, 40)), draw(st.integers(0, 40))
    q_len = draw(st.integers(1, 6))
    diagonal = draw(st.booleans())
    if diagonal:
        k_first, k_len = q_first, q_len
    else:
        k_len = draw(st.integers(1, 6))
        q_end, k_end = q_first + rate * q_len, k_first + rate * k_len
        if q_first < k_end and k_first < q_end:  # overlapping: move the keys past the queries
            k_first = q_end
    q = torch.arange(q_first, q_first + rate * q_len, rate)
    k = torch.arange(k_first, k_first + rate * k_len, rate)
    return q, k, diagonal


WINDOWS = st.one_of(st.none(), st.tuples(st.integers(-1, 12), st.integers(-1, 12)))


def _classify(mask, q, k, rate, diagonal):
    return mask.block(int(q[0]), int(q[-1]), int(k[0]), int(k[-1]), rate, diagonal=diagonal)


@given(run_pairs(), st.booleans(), WINDOWS, st.sets(st.integers(1, 79), max_size=4))
def test_a_blocks_mask_is_the_predicate_on_its_cells(pair, causal, window, starts):
    """Cell by cell: None keeps no cell, FULL every cell, CAUSAL the lower triangle of a
    square block, a Band exactly the packed cells ``lo <= b - a <= hi``; with documents
    starting anywhere but inside a run (the planner cuts segments at every start)."""
    q, k, diagonal = pair
    rate = int(q[1] - q[0]) if len(q) > 1 else int(k[1] - k[0]) if len(k) > 1 else 1
    starts = sorted(c for c in starts if not any(run[0] < c <= run[-1] for run in (q, k)))
    documents = (0, *starts, 80) if starts else None
    mask = SequenceMask(causal=causal, window=window if window != (-1, -1) else None, documents=documents)
    kept = mask.keeps(q, k)
    block = _classify(mask, q, k, rate, diagonal)
    if block is None:
        assert not kept.any()
    elif block is BlockMask.FULL:
        assert kept.all()
    elif block is BlockMask.CAUSAL:  # the block-local lower triangle of a square block
        assert len(q) == len(k) and kept.equal(torch.ones_like(kept).tril())
        assert diagonal or mask.window is not None
    else:
        assert isinstance(block, Band) and mask.window is not None
        assert kept.equal(band_keeps(len(q), len(k), (block.lo, block.hi), q.device))
        assert kept.any() and not kept.all()  # a band is neither empty nor full
        assert -(len(q) - 1) <= block.lo <= block.hi <= len(k) - 1  # clamped: equal blocks, equal bands


@given(st.sets(st.integers(1, 23), max_size=5), st.booleans(), WINDOWS)
def test_the_predicate_with_documents_is_the_contracts_weights(starts, causal, window):
    """``keeps`` with documents against ``W`` built literally per document (pattern.weights)."""
    documents = (0, *sorted(starts), 24) if starts else None
    window = window if window != (-1, -1) else None
    pos = torch.arange(24)
    kept = SequenceMask(causal=causal, window=window, documents=documents).keeps(pos, pos)
    w = weights(None, 24, 1, is_causal=causal, window=window, documents=documents)
    assert kept.equal(w[0] > 0)


def test_full_keeps_all_and_a_bool_is_causal_or_full():
    pos = torch.arange(5)
    assert SequenceMask().keeps_all and SequenceMask().keeps(pos, pos).all()
    assert not SequenceMask(causal=True).keeps_all
    assert SequenceMask.of(True) == SequenceMask(causal=True) and SequenceMask.of(False) == SequenceMask()
    mask = SequenceMask(causal=True)
    assert SequenceMask.of(mask) is mask


def test_a_window_cuts_a_block_into_a_band_on_packed_indices():
    """Rate 2: queries 10, 12, 14, 16 against keys 0, 2, 4, 6 under window (9, -1): query
    ``i`` sees ``j >= i - 9``, and ``j - i = -10 + 2 (b - a)``: packed ``b - a >= 1``."""
    mask = SequenceMask(window=(9, -1))
    q, k = torch.arange(10, 18, 2), torch.arange(0, 8, 2)
    block = _classify(mask, q, k, 2, False)
    assert block == Band(1, 3)
    assert mask.keeps(q, k).equal(band_keeps(4, 4, (1, 3), q.device))
    assert _classify(SequenceMask(window=(3, -1)), q, k, 2, False) is None  # every key too far
    assert _classify(SequenceMask(window=(16, -1)), q, k, 2, False) is BlockMask.FULL


def test_band_rows_are_the_rows_with_a_key_in_the_band():
    """Against the band as a dense block, every band of blocks up to 7 x 7."""
    for q_len in range(1, 8):
        for k_len in range(1, 8):
            for lo in range(-q_len - 2, k_len + 2):
                for hi in range(lo, k_len + 3):
                    has = band_keeps(q_len, k_len, (lo, hi), torch.device("cpu")).any(-1)
                    first, stop = band_rows(q_len, k_len, (lo, hi))
                    assert 0 <= first <= q_len and 0 <= stop <= q_len
                    assert has.tolist() == [first <= i < stop for i in range(q_len)], (q_len, k_len, lo, hi)
