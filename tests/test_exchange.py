"""ring_attention.exchange: the K/V rows each rank posts at each shift reach the rank that
expects them, as plain indexing of the sender's shard says, and their dK/dV come back into
the sender's rows."""

from __future__ import annotations

import pytest
import torch

import ring_attention as ra
from ring_attention import blocks, exchange, plans
from ring_attention.comm import SimulatedRing
from ring_attention.masks import SequenceMask
from tests.inputs import qkv

CASES = [  # (pattern, N, H, Hkv, causal, ring size, layout)
    (ra.DilatedPattern((64, 128), (1, 2), "head_groups"), 128, 8, 8, False, 2, "contiguous"),  # offsets as one message
    (ra.DilatedPattern((16, 32), (1, 2)), 32, 4, 2, True, 4, "zigzag"),  # rows that are no progression
    (ra.DilatedPattern((32,), (3,)), 32, 3, 1, False, 2, "contiguous"),
    (None, 32, 2, 1, True, 4, "contiguous"),  # direct sends
    (None, 24, 2, 2, False, 3, "zigzag"),  # a relay
]


def _expected(k, m, o):
    """Message ``m``'s rows and kv heads of ``k [B, n, Hkv, D]`` at head offset ``o``, by indexing."""
    return k[:, [r + o for r in m.rows.values()]][:, :, [h + o for h in m.kv_heads.values()]]


@pytest.mark.parametrize("case", CASES)
def test_what_arrives_at_each_shift_is_the_senders_rows(case):
    pattern, n, h, hkv, causal, size, layout = case
    ring = SimulatedRing(size)
    rank_plans = dict(enumerate(plans.ring_plans(pattern, n, h, hkv, SequenceMask(causal), size, layout, ring.ranks)))
    ks = {r: qkv(2, n // size, 1, hkv, 4, seed=r)[1] for r in ring.ranks}
    vs = {r: qkv(2, n // size, 1, hkv, 4, seed=10 + r)[2] for r in ring.ranks}
    relay = rank_plans[0].relay
    received, moved = None, 0
    for shift in range(1, size):
        received = exchange.wait(exchange.post_kv(ring, rank_plans, shift, ks, vs, blocks.index, received))
        for dst in ring.ranks:
            step = rank_plans[dst].step(shift)
            src = (dst - shift) % size
            sender = rank_plans[(dst - 1) % size if relay else src].step(shift)
            got = received.get(dst, [])
            assert len(got) == 2 * len(step.receives) == 2 * len(sender.sends)
            for m, k_got, v_got in zip(sender.sends, got[0::2], got[1::2]):
                # relay: the shard of dst - shift arrives, whoever passed it on
                for t, sent in ((k_got, ks[src]), (v_got, vs[src])):
                    if m.offsets == 1:
                        torch.testing.assert_close(t, _expected(sent, m, 0), rtol=0, atol=0)
                    for o in range(m.offsets if m.offsets > 1 else 0):
                        torch.testing.assert_close(t[:, o], _expected(sent, m, o), rtol=0, atol=0)
                moved += 1
    assert moved or size == 1


@pytest.mark.parametrize("case", [c for c in CASES if c[0] is not None or c[4]])  # direct sends
def test_returned_gradients_add_into_the_rows_that_were_sent(case):
    pattern, n, h, hkv, causal, size, layout = case
    ring = SimulatedRing(size)
    rank_plans = dict(enumerate(plans.ring_plans(pattern, n, h, hkv, SequenceMask(causal), size, layout, ring.ranks)))
    ks = {r: qkv(2, n // size, 1, hkv, 4, seed=r)[1] for r in ring.ranks}
    grads = {r: [None, torch.ones_like(ks[r]), torch.ones_like(ks[r])] for r in ring.ranks}
    expected = {r: [g.clone() for g in grads[r][1:]] for r in ring.ranks}
    for shift in range(1, size):
        received = exchange.wait(exchange.post_kv(ring, rank_plans, shift, ks, ks, blocks.index))
        back = {r: [torch.randn_like(t) for t in tensors] for r, tensors in received.items()}
        for dst, tensors in back.items():  # the oracle: add each one into the sender's rows by hand
            src = (dst - shift) % size
            for m, dk, dv in zip(rank_plans[src].step(shift).sends, tensors[0::2], tensors[1::2]):
                for o in range(m.offsets):
                    rows = [r + o for r in m.rows.values()]
                    for acc, grad in zip(expected[src], (dk, dv)):
                        for j, head in enumerate(m.kv_heads.values()):
                            acc[:, rows, head + o] += (grad[:, o] if m.offsets > 1 else grad)[:, :, j]
        exchange.add_returned(exchange.post_returns(ring, rank_plans, shift, back, ks, ks[0].dtype, hop=-shift),
                              rank_plans, grads, blocks.index)
    for r in ring.ranks:
        for got, want in zip(grads[r][1:], expected[r]):
            torch.testing.assert_close(got, want)
