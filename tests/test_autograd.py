"""ring_attention.autograd: PackedAttention and the eager ring entry, against the reference."""

from __future__ import annotations

import pytest
import torch

import ring_attention as ra


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
