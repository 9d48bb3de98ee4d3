"""ring_attention.options: the executor's limits, data of the plan's key, each honoured."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import ring_attention as ra
from ring_attention import executable
from ring_attention.entry import attend
from ring_attention.options import DEFAULT, Options
from tests.inputs import qkv


def test_options_are_frozen_hashable_and_the_defaults_are_the_documented_ones():
    assert DEFAULT == Options() and hash(DEFAULT) == hash(Options())
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULT.row_tiles = 1  # type: ignore[misc]
    assert (DEFAULT.max_gather_bytes, DEFAULT.max_call_share, DEFAULT.row_tiles) == (4 * 2**20, 4, 16)


def _plans_of(options: Options, dtype: torch.dtype = torch.float16, n: int = 256):
    """The executable plans a call with ``options`` builds (a mixture over half precision)."""
    executable.clear()
    q, k, v = qkv(1, n, 4, 2, 16, dtype=dtype)
    out = attend(q, k, v, ra.DilatedPattern((32, 64), (1, 2)), options=options)
    built = list(executable._CACHE.values())
    executable.clear()
    return out, built


def test_each_call_builds_its_plan_with_the_options_it_passes():
    """What the backend decides filled in (a CPU op: narrow window tiles), the rest as passed."""
    _, (plan,) = _plans_of(Options(max_call_share=8, min_split_bytes=0))
    assert plan.key.options == Options(max_call_share=8, min_split_bytes=0, band_tiles=16, causal_chunks=1)


def test_row_tiles_follow_the_options():
    """Tiles where the float32 accumulators reach min_tiled_bytes, each tile at least
    min_tile_bytes, at most row_tiles of them; row_tiles=1 runs whole. Same result."""
    forced = Options(min_tile_bytes=1, min_tiled_bytes=0, row_tiles=4)
    tiled_out, (plan,) = _plans_of(forced)
    (rank,) = plan.ranks.values()
    assert rank.forward_tiles is not None and 2 <= len(rank.forward_tiles) <= 4
    whole_out, (plan,) = _plans_of(dataclasses.replace(forced, row_tiles=1))
    (rank,) = plan.ranks.values()
    assert rank.forward_tiles is None and rank.backward_tiles is None
    _, (plan,) = _plans_of(Options())  # 256 rows: far below the default 64 MiB
    assert all(r.forward_tiles is None for r in plan.ranks.values())
    torch.testing.assert_close(tiled_out, whole_out, rtol=2e-3, atol=2e-3)


def test_window_tiles_and_causal_chunks_are_chosen_by_the_backend():
    """Wide window tiles (1) and causal row chunks (16) where flash runs a band on its own
    window and aligns a chunk's causal mask bottom-right: CUDA half precision on sm80+;
    narrow tiles (16) and whole causal blocks (1) where a kernel computes masked blocks whole
    and aligns causal top-left: the CPU op, math, CUDA float32 (efficient takes no band);
    what a caller sets, kept."""
    from ring_attention.executable import resolved
    from tests.fake_cuda import fake_cuda

    def chosen(options, q):
        got = resolved(options, q)
        return got.band_tiles, got.causal_chunks

    assert chosen(Options(), torch.zeros(1, 8, 2, 16)) == (16, 1)
    assert chosen(Options(band_tiles=4), torch.zeros(1, 8, 2, 16)) == (4, 1)
    assert chosen(Options(causal_chunks=3), torch.zeros(1, 8, 2, 16)) == (16, 3)
    with fake_cuda(backward=False) as fc:
        half, single = (fc.qkv(batch=1, seq_len=8, heads=2, kv_heads=2, head_dim=16, dtype=t)[0]
                        for t in (torch.float16, torch.float32))
        assert chosen(Options(), half) == (1, 16)
        assert chosen(Options(causal_chunks=2), half) == (1, 2)
        assert chosen(Options(), single) == (16, 1)
    with fake_cuda(backward=False, capability=(7, 5)) as fc:  # no flash before sm80
        half = fc.qkv(batch=1, seq_len=8, heads=2, kv_heads=2, head_dim=16, dtype=torch.float16)[0]
        assert chosen(Options(), half) == (16, 1)
