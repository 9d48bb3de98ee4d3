"""Row tiles: a tiled plan computes what the whole plan computes, and the tiled executor
(half precision, one rank) matches the float64 reference, forward and gradients."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

import ring_attention as ra
from ring_attention import pattern as _pattern
from ring_attention import tiles
from ring_attention.entry import attend
from ring_attention.masks import BlockMask
from ring_attention.options import Options
from ring_attention.plans import rank_plan
from tests.inputs import PLAN_CASES, PLAN_PATTERNS, qkv, record_row_tiles


def _cells(plan, q_base: int = 0, k_base: int = 0) -> Counter:
    """``(query row, head, key row, kv head)`` computed by the plan, counted, rows shifted
    by the bases (a tile's rows are rebased to its start)."""
    seen = Counter()
    for blk in plan.local:
        q_rows, k_rows, kv = blk.q_rows.values(), blk.k_rows.values(), blk.kv_index.values()
        heads = range(blk.heads.start, blk.heads.stop, blk.heads.step)
        for c in blk.calls:
            for i in range(c.runs):
                qs = q_rows[c.q_start + i * c.q_len : c.q_start + (i + 1) * c.q_len]
                ks = k_rows[c.k_start + i * c.k_len : c.k_start + (i + 1) * c.k_len]
                for o in range(blk.offsets):
                    for h, g in zip(heads, kv):
                        for a, qr in enumerate(qs):
                            for kr in ks[: a + 1] if c.mask is BlockMask.CAUSAL else ks:
                                seen[(qr + o + q_base, h + o, kr + o + k_base, g + o)] += 1
    return seen


@pytest.mark.parametrize("closed", [False, True])
@pytest.mark.parametrize("count", [3, 8])
@pytest.mark.parametrize("name, n, h, hkv, causal", PLAN_CASES)
def test_tiles_compute_every_pair_of_the_plan_once(name, n, h, hkv, causal, count, closed):
    plan = rank_plan(PLAN_PATTERNS[name], n, h, hkv, causal, 1, "contiguous", 0)
    found = tiles.row_tiles(plan, n, count, closed=closed)
    if found is None:  # only where a run spans the shard: a causal one, or any one for closed tiles
        assert name != "longnet" and (closed or causal), "no cut found where segments are short"
        return
    assert [t.start for t in found][0] == 0 and found[-1].stop == n
    assert all(a.stop == b.start and a.start < a.stop for a, b in zip(found, found[1:]))
    assert len(found) <= count
    union = Counter()
    for t in found:
        cells = _cells(t.plan, q_base=t.start, k_base=t.start if closed else 0)
        assert all(t.start <= qr < t.stop for qr, *_ in cells), "a tile computes rows of another"
        if closed:
            assert all(t.start <= kr < t.stop for _, _, kr, _ in cells), "a closed tile reads keys of another"
        for blk in t.plan.local:
            assert all(c.q_len == c.k_len for c in blk.calls if c.mask is BlockMask.CAUSAL), "a causal block was cut"
        union += cells
    assert union == _cells(plan)


def _reference(q, k, v, g, pattern, causal):
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref = ra.reference_attention(q64, k64, v64, pattern=pattern, causal=causal)
    return (ref, *torch.autograd.grad(ref, (q64, k64, v64), g.double()))


TOL = {torch.float16: dict(rtol=2e-2, atol=4e-3), torch.bfloat16: dict(rtol=5e-2, atol=3e-2)}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", ["mixture", "longnet", "sparse"])  # head groups merge nothing
def test_tiled_half_precision_matches_the_reference(monkeypatch, name, causal, dtype):
    """Tiles forced at a small size; rows without keys are exactly 0, and NaN in a query row
    and a value row shows in the output where the reference has it."""
    used = record_row_tiles(monkeypatch)  # the plan is built here, with its tiles
    pattern, n = PLAN_PATTERNS[name], 256
    q, k, v, g = qkv(2, n, 4, 2, 16, seed=3, dtype=dtype, grad_out=True)
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attend(*ins, pattern, causal=causal, options=Options(min_tile_bytes=1, min_tiled_bytes=0))
    got = (out, *torch.autograd.grad(out, ins, g))
    assert any(used), "the plan ran whole: nothing tested the tiles"
    for label, a, e in zip(("out", "dq", "dk", "dv"), got, _reference(q, k, v, g, pattern, causal)):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), e, **TOL[dtype], msg=lambda m, x=label: f"{x}: {m}")
    has_keys = _pattern.weights(pattern, n, 4, is_causal=causal).gt(0).any(-1).T  # [N, H]
    assert bool((out[:, ~has_keys] == 0).all())

    q[1, 70, 1] = float("nan")
    v[0, 150, 0, 3] = float("nan")
    with torch.no_grad():
        out = ra.dilated_attention(q, k, v, pattern, causal=causal)
    torch.testing.assert_close(out.double(), _reference(q, k, v, g, pattern, causal)[0], **TOL[dtype], equal_nan=True)


def test_row_tiles_share_one_split_and_then_run_their_causal_calls_whole():
    """A half-precision shard's row tiles read one split of its values (the forward's): where
    any tile's causal calls would split, every tile's read that split, and none runs a causal
    call in row chunks (Options.causal_chunks), whose chunks read their own zeroed keys. The
    reference's result, its NaN where a value is NaN."""
    from ring_attention import executable

    pattern = ra.DilatedPattern((32, 192), (2, 1))
    documents = (0, 64, 160, 192)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 192, 2, 8, dtype=torch.float16) for _ in range(3))
    v[0, 5, 0, 1] = float("nan")
    executable.clear()
    options = Options(causal_chunks=16, min_split_bytes=0, min_tile_bytes=1, min_tiled_bytes=0)
    with torch.no_grad():
        out = attend(q, k, v, pattern, causal=True, options=options, cu_seqlens=documents)
    (plan,) = executable._CACHE.values()
    (rank,) = plan.ranks.values()
    assert rank.forward_tiles is not None and len({t.splits_values for *_, t in rank.forward_tiles}) == 1
    ref = ra.reference_attention(*(t.double() for t in (q, k, v)), pattern=pattern, causal=True, cu_seqlens=documents)
    assert ref.isnan().any()
    torch.testing.assert_close(out.double(), ref, rtol=2e-3, atol=2e-3, equal_nan=True)
