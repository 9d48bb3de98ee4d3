"""Plans as plain data: no tensors, cached per shape and rank, index tensors per device and
fake mode, and an executor whose write-or-merge choice holds for any block order."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

import ring_attention as ra
from ring_attention import autograd, blocks, executable, plans
from ring_attention.comm import SimulatedRing
from ring_attention.executable import PlanKey
from ring_attention.masks import SequenceMask
from tests.inputs import qkv

LONGNET = ra.DilatedPattern((256, 512, 1024), (1, 2, 4))


def _walk(obj, seen=None):
    """Every object reachable from a plan through dataclass fields, tuples and dicts."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    yield obj
    if dataclasses.is_dataclass(obj):
        children = [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    elif isinstance(obj, (tuple, list)):
        children = list(obj)
    elif isinstance(obj, dict):
        children = [*obj.keys(), *obj.values()]
    else:
        children = []
    for child in children:
        yield from _walk(child, seen)


@pytest.mark.parametrize(
    "pattern, n, causal, ring_size, layout",
    [
        (None, 4096, True, 4, "zigzag"),
        (LONGNET, 4096, True, 4, "zigzag"),
        (ra.DilatedPattern((96, 192), (1, 3)), 4608, False, 2, "contiguous"),
    ],
)
def test_plans_hold_no_tensor_and_no_device(pattern, n, causal, ring_size, layout):
    found = set()
    for r in range(ring_size):
        plan = plans.rank_plan(pattern, n, 8, 2, causal, ring_size, layout, r)
        for obj in _walk(plan):
            assert not isinstance(obj, (torch.Tensor, torch.device)), f"rank {r} plan holds {type(obj)}"
            found.add(type(obj))
    assert blocks.Call in found and blocks.Rows in found  # the walk reached the leaves


def test_plans_are_built_once_per_shape_and_rank_even_under_a_fake_mode():
    args = (LONGNET, 8192, 8, 2, True, 4, "zigzag")
    plan = plans.rank_plan(*args, 1)
    with FakeTensorMode():  # nothing in a build touches tensors: the cache serves every mode
        assert plans.rank_plan(*args, 1) is plan
    assert plans.ring_plans(*args, (1, 2))[0] is plan


def test_a_rank_plan_looks_only_at_the_ranks_it_shares_segments_with(monkeypatch):
    # LongNet's segments (<= 1024) lie inside 4096-row shards: rank 3 of 16 needs nobody.
    looked_at = set()
    real = plans._kept.__wrapped__

    def spy(spec, rank, unit):
        looked_at.add(rank)
        return real(spec, rank, unit)

    monkeypatch.setattr(plans, "_kept", spy)
    plan = plans.rank_plan.__wrapped__(LONGNET, 16 * 4096, 8, 8, False, 16, "contiguous", 3)
    assert looked_at == {3} and plan.steps == {}
    # A segment spanning 4 shards: rank 5 talks to ranks 4, 6 and 7, nobody else.
    looked_at.clear()
    spanning = ra.DilatedPattern((4 * 4096,), (2,))
    plan = plans.rank_plan.__wrapped__(spanning, 16 * 4096, 8, 8, False, 16, "contiguous", 5)
    assert looked_at == {4, 5, 6, 7}
    assert sorted(plan.steps) == [1, 2, 14, 15]


def test_cpu_index_tensors_are_cached_and_never_cross_fake_modes():
    rows = blocks.Rows.of([0, 3, 4, 9])
    assert blocks.index(blocks.Rows.of(range(2, 10, 2)), torch.zeros(1)) == slice(2, 10, 2)
    real = blocks.index(rows, torch.zeros(1))
    assert real.tolist() == [0, 3, 4, 9] and not isinstance(real, FakeTensor)
    assert blocks.index(rows, torch.zeros(1)) is real
    with FakeTensorMode() as mode_a:
        fake_a = blocks.index(rows, torch.empty(1))
        assert isinstance(fake_a, FakeTensor) and fake_a.fake_mode is mode_a
        assert blocks.index(rows, torch.empty(1)) is fake_a
    with FakeTensorMode() as mode_b:
        fake_b = blocks.index(rows, torch.empty(1))  # a fake CPU tensor is not the real one
        assert fake_b is not fake_a and fake_b.fake_mode is mode_b
    assert blocks.index(rows, torch.zeros(1)) is real


def test_cuda_index_tensors_are_built_at_every_call_never_cached():
    """A cached CUDA tensor made while a CUDA graph is captured lives in the graph's pool."""
    rows = blocks.Rows.of([0, 0, 1, 1])
    with FakeTensorMode():
        like = torch.empty(1, device="cuda")
        first = blocks.index(rows, like)
        assert isinstance(first, FakeTensor) and first.device == like.device
        assert blocks.index(rows, like) is not first
    assert rows not in blocks._INDEX_CACHE


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
