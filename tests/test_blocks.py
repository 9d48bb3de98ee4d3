"""ring_attention.blocks: row sets (Rows, merge_ranges) and their index tensors, against
plain Python lists."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from ring_attention import blocks


def test_cpu_index_tensors_are_cached_and_never_cross_fake_modes():
    rows, cache = blocks.Rows.of([0, 3, 4, 9]), {}
    assert blocks.index(blocks.Rows.of(range(2, 10, 2)), torch.zeros(1), cache) == slice(2, 10, 2)
    real = blocks.index(rows, torch.zeros(1), cache)
    assert real.tolist() == [0, 3, 4, 9] and not isinstance(real, FakeTensor)
    assert blocks.index(rows, torch.zeros(1), cache) is real
    assert blocks.index(rows, torch.zeros(1)) is not real  # no cache given: none kept
    with FakeTensorMode() as mode_a:
        fake_a = blocks.index(rows, torch.empty(1), cache)
        assert isinstance(fake_a, FakeTensor) and fake_a.fake_mode is mode_a
        assert blocks.index(rows, torch.empty(1), cache) is fake_a
    with FakeTensorMode() as mode_b:
        fake_b = blocks.index(rows, torch.empty(1), cache)  # a fake CPU tensor is not the real one
        assert fake_b is not fake_a and fake_b.fake_mode is mode_b
    assert blocks.index(rows, torch.zeros(1), cache) is real


def test_cuda_index_tensors_are_built_at_every_call_never_cached():
    """A cached CUDA tensor made while a CUDA graph is captured lives in the graph's pool."""
    rows, cache = blocks.Rows.of([0, 0, 1, 1]), {}
    with FakeTensorMode():
        like = torch.empty(1, device="cuda")
        first = blocks.index(rows, like, cache)
        assert isinstance(first, FakeTensor) and first.device == like.device
        assert blocks.index(rows, like, cache) is not first
    assert not cache


def _grids():
    """Row sets as plans make them: ``start + i * outer + j * inner``, inner 0 for kv heads."""
    return st.builds(
        lambda start, n, outer, length, inner: [start + i * outer + j * inner for i in range(n) for j in range(length)],
        st.integers(0, 9), st.integers(1, 5), st.integers(0, 7), st.integers(1, 5), st.integers(0, 3),
    )


@settings(max_examples=300, deadline=None)
@given(st.one_of(_grids(), st.lists(st.integers(0, 20), min_size=1, max_size=12)))
def test_device_index_builds_the_rows(values):
    rows = blocks.Rows.of(values)
    assert blocks.device_index(rows, torch.device("cpu")).tolist() == values


@pytest.mark.parametrize("values", [[], [5], [1, 2, 3], [0, 2, 4, 5, 6, 7, 9], [7, 3, 3, 1]])
def test_rows_keep_order_and_slice_when_they_can(values):
    rows = blocks.Rows.of(values)
    assert rows.values() == values and len(rows) == len(values)
    as_slice = rows.as_slice()
    if as_slice is not None:
        assert list(range(100))[as_slice] == values
    for start in range(len(values) + 1):
        for stop in range(start, len(values) + 1):
            assert rows.sub(start, stop).values() == values[start:stop]


_RANGES = st.lists(  # progressions of 0 to 5 values, increasing or decreasing
    st.builds(lambda start, count, step: range(start, start + count * step, step),
              st.integers(15, 30), st.integers(0, 5), st.integers(-3, 5).filter(bool)),  # values >= 3
    max_size=6,
)


@settings(max_examples=100, deadline=None)
@given(_RANGES)
def test_merge_ranges_keeps_the_values_in_as_few_progressions_as_it_can(ranges):
    merged = blocks.merge_ranges(ranges)
    assert [i for r in merged for i in r] == [i for r in ranges for i in r]
    assert all(len(r) for r in merged)
    for a, b in zip(merged, merged[1:]):  # no two neighbours continue one increasing progression
        step = b[0] - a[-1]
        assert not (step > 0 and (len(a) == 1 or a.step == step) and (len(b) == 1 or b.step == step))


@settings(max_examples=100, deadline=None)
@given(_RANGES, st.data())
def test_rows_of_ranges_sub_and_as_slice_agree_with_lists(ranges, data):
    values = [i for r in ranges for i in r]
    rows = blocks.Rows(blocks.merge_ranges(ranges))
    assert rows.values() == values and len(rows) == len(values)
    start = data.draw(st.integers(0, len(values)))
    stop = data.draw(st.integers(start, len(values)))
    assert rows.sub(start, stop).values() == values[start:stop]
    as_slice = rows.as_slice()
    increasing = len(values) > 0 and len({b - a for a, b in zip(values, values[1:])}) <= 1 and values == sorted(set(values))
    if not increasing:
        assert as_slice is None
    else:  # from ints, an increasing progression is one slice
        assert blocks.Rows.of(values).as_slice() is not None
    x = torch.arange(100)
    if as_slice is not None:
        assert x[as_slice].tolist() == values
    if values:
        assert x[blocks.index(rows, x)].tolist() == values  # a slice or an index tensor: the same rows
