"""ring_attention.backward: the backward executor's gradients, against the dense reference."""

from __future__ import annotations

import pytest
import torch

import ring_attention as ra
from ring_attention import pattern as P
from ring_attention.entry import FULL, attend
from tests.inputs import F64, make_qkv, qkv


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_returned_key_gradients_add_up_in_float32(monkeypatch, dtype, layout):
    """dK/dV coming back from other ranks add into float32 accumulators, also on a rank whose
    own work is a single kernel call (rank 0 of a causal contiguous ring): adding them to
    that call's half-precision gradients would round every addition."""
    from ring_attention import backward

    added_into = []

    def spy(returning, plans, grads, index):
        if returning is not None:
            added_into.extend(grads[r][1].dtype for r in plans)
        return real(returning, plans, grads, index)

    real = backward.add_returned
    monkeypatch.setattr(backward, "add_returned", spy)
    q, k, v, g = qkv(1, 64, 2, 2, 8, dtype=dtype, requires_grad=True, grad_out=True)
    ra.ring_attention(q, k, v, ring_size=4, causal=True, layout=layout).backward(g)
    assert added_into and set(added_into) == {torch.float32}


BACKWARD_CASES = [  # (pattern, H, Hkv, causal, ring size, layout)
    (ra.DilatedPattern((16, 64), (1, 2)), 4, 4, False, 1, "contiguous"),  # first call's gradients adopted
    (ra.DilatedPattern((16, 64), (2, 3), "head_groups"), 4, 1, True, 2, "zigzag"),  # scattered rows
    (ra.DilatedPattern((32, 64), (2, 2)), 2, 2, False, 4, "contiguous"),  # dK/dV back from every rank
    (None, 2, 1, False, 4, "zigzag"),  # a relay: dK/dV travel one hop per shift
]


@pytest.mark.parametrize("pattern, h, hkv, causal, ring_size, layout", BACKWARD_CASES)
def test_gradients_of_every_rank_are_the_references(pattern, h, hkv, causal, ring_size, layout):
    q, k, v, g = make_qkv(6, 2, 64, h, hkv, 8)
    out = attend(q, k, v, pattern if pattern is not None else FULL, causal=causal, ring_size=ring_size,
                 layout=layout)
    got = torch.autograd.grad(out, (q, k, v), g)
    ref = ra.reference_attention(q, k, v, pattern=pattern, causal=causal)
    for a, b in zip(got, torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, **F64)
    if pattern is not None:  # query rows without keys get no gradient
        w = P.weights(pattern, 64, h, is_causal=causal)
        assert bool((got[0][:, (w.sum(-1) == 0).T] == 0).all())
