"""ring_attention.views: strided views of a shard (packed rows, runs, view recipes,
scatter-adds), checked against plain torch indexing and explicit loops."""

from __future__ import annotations

import torch

import ring_attention as ra
from tests.inputs import qkv


def test_inputs_at_any_storage_offset_reuse_the_view_recipes():
    # a query that is a slice of a longer buffer at a new offset every call: the same
    # recipes serve (they are relative to the tensor's offset), and give the right rows
    from ring_attention import executable

    pattern = ra.DilatedPattern((8, 16), (1, 2))
    buffer, k, v = qkv(1, 40, 4, 4, 8, dtype=torch.float32)[0], *qkv(1, 32, 4, 4, 8, seed=1, dtype=torch.float32)[1:]
    counts = []
    for start in range(4):
        q = buffer[:, start : start + 32]
        torch.testing.assert_close(ra.dilated_attention(q, k, v, pattern), ra.reference_attention(q, k, v, pattern=pattern))
        counts.append(sum(len(rank.recipes) for plan in executable._CACHE.values() for rank in plan.ranks.values()))
    assert counts[1:] == counts[:1] * 3
