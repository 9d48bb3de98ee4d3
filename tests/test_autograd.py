"""ring_attention.autograd: PackedAttention and the eager ring entry, against the reference."""

from __future__ import annotations

import pytest
import torch

import ring_attention as ra
from ring_attention import layout as _layout
from ring_attention.autograd import PackedAttention
from ring_attention.comm import SimulatedRing
from ring_attention.executable import PlanKey, executable_plan
from ring_attention.layout import Layout
from ring_attention.masks import SequenceMask
from tests.inputs import F64, make_qkv


@pytest.mark.parametrize(
    "fn",
    [
        lambda q, k, v: ra.dilated_attention(q, k, v, ra.DilatedPattern((4,), (2,))),
        lambda q, k, v: ra.ring_attention(q, k, v, ring_size=2, causal=True),
    ],
)
def test_double_backward_is_refused_clearly(fn):
    q, k, v = (torch.randn(1, 8, 2, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    (dq,) = torch.autograd.grad(fn(q, k, v).sum(), q)  # single backward works
    assert dq.shape == q.shape
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(fn(q, k, v).sum(), q, create_graph=True)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("used", [(0, 1), (1,)])
def test_packed_attention_on_a_ring_of_two_has_the_references_gradients(layout, used):
    """The ranks' shards in, their output shards out; an output shard the loss does not use
    gets no upstream gradient (a zero one)."""
    pattern, n = ra.DilatedPattern((8, 16), (1, 2)), 16
    q, k, v, g = make_qkv(3, 2, n, 4, 2, 8)
    ring = SimulatedRing(2)
    key = PlanKey(pattern, n, 4, 2, SequenceMask(causal=True), 2, Layout(layout), ring.ranks, 2, 8, q.dtype)
    shards = [_layout.shard(t, 2, layout) for t in (q, k, v)]
    outs = PackedAttention.apply(executable_plan(key), ring, 8**-0.5, True, *shards[0], *shards[1], *shards[2])
    gs = _layout.shard(g, 2, layout)
    loss = sum((outs[r] * gs[r]).sum() for r in used)
    got = torch.autograd.grad(loss, (q, k, v))
    ref = ra.reference_attention(q, k, v, pattern=pattern, causal=True)
    torch.testing.assert_close(_layout.unshard(list(outs), layout), ref, **F64)
    g_used = _layout.unshard([gs[r] if r in used else torch.zeros_like(gs[r]) for r in range(2)], layout)
    want = torch.autograd.grad(ref, (q, k, v), g_used)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **F64)
