"""ring_attention.backward: the backward executor's gradients, against the dense reference."""

from __future__ import annotations

import pytest
import torch

import ring_attention as ra
from tests.inputs import qkv


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_returned_key_gradients_add_up_in_float32(monkeypatch, dtype, layout):
    """dK/dV coming back from other ranks add into float32 accumulators, also on a rank whose
    own work is a single kernel call (rank 0 of a causal contiguous ring): adding them to
    that call's half-precision gradients would round every addition."""
    from ring_attention import backward

    added_into = []

    def spy(returning, plans, grads):
        if returning is not None:
            added_into.extend(grads[r][1].dtype for r in plans)
        return real(returning, plans, grads)

    real = backward.add_returned
    monkeypatch.setattr(backward, "add_returned", spy)
    q, k, v, g = qkv(1, 64, 2, 2, 8, dtype=dtype, requires_grad=True, grad_out=True)
    ra.ring_attention(q, k, v, ring_size=4, causal=True, layout=layout).backward(g)
    assert added_into and set(added_into) == {torch.float32}
