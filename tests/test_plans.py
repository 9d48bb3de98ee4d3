"""ring_attention.plans: plans as plain data (no tensors), cached per shape and rank, and a
rank's plan built from the ranks it shares segments with only."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import ring_attention as ra
from ring_attention import blocks, plans
from ring_attention.layout import Layout
from ring_attention.masks import SequenceMask
from tests.inputs import walk

LONGNET = ra.DilatedPattern((256, 512, 1024), (1, 2, 4))


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
        for obj in walk(plan):
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
    from ring_attention import runs

    real = runs.kept.__wrapped__

    def spy(spec, rank, unit):
        looked_at.add(rank)
        return real(spec, rank, unit)

    monkeypatch.setattr(runs, "kept", spy)
    plan = plans._rank_plan.__wrapped__(LONGNET, 16 * 4096, 8, 8, SequenceMask(), 16, Layout.CONTIGUOUS, 3, 16)
    assert looked_at == {3} and plan.steps == {}
    # A segment spanning 4 shards: rank 5 talks to ranks 4, 6 and 7, nobody else.
    looked_at.clear()
    spanning = ra.DilatedPattern((4 * 4096,), (2,))
    plan = plans._rank_plan.__wrapped__(spanning, 16 * 4096, 8, 8, SequenceMask(), 16, Layout.CONTIGUOUS, 5, 16)
    assert looked_at == {4, 5, 6, 7}
    assert sorted(plan.steps) == [1, 2, 14, 15]
