"""ring_attention.masks: a block's classification agrees with the mask's predicate on every cell."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ring_attention.masks import BlockMask, SequenceMask


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


@given(run_pairs(), st.booleans())
def test_a_blocks_mask_is_the_predicate_on_its_cells(pair, causal):
    q, k, diagonal = pair
    mask = SequenceMask(causal=causal)
    kept = mask.keeps(q, k)
    block = mask.block(int(q[0]), int(k[0]), diagonal=diagonal)
    if block is None:
        assert not kept.any()
    elif block is BlockMask.FULL:
        assert kept.all()
    else:  # CAUSAL: the block-local lower triangle of a square block
        assert diagonal and kept.equal(torch.ones_like(kept).tril())


def test_full_keeps_all_and_a_bool_is_causal_or_full():
    pos = torch.arange(5)
    assert SequenceMask().keeps_all and SequenceMask().keeps(pos, pos).all()
    assert not SequenceMask(causal=True).keeps_all
    assert SequenceMask.of(True) == SequenceMask(causal=True) and SequenceMask.of(False) == SequenceMask()
    mask = SequenceMask(causal=True)
    assert SequenceMask.of(mask) is mask


def test_the_planner_refuses_a_window_it_cannot_plan_yet():
    """keeps() honours a window (the oracle's); block() must not classify as if there were none."""
    mask = SequenceMask(causal=True, window=(2, 0))
    assert not mask.keeps_all
    with pytest.raises(NotImplementedError, match="window"):
        mask.block(4, 0, diagonal=False)
