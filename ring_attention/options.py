"""How the executor trades launches for memory: the limits an executable plan is built with.

The defaults suit both a CPU and a GPU. Tests and benchmarks pass other values to
:func:`ring_attention.entry.attend` (``options=``) to force a path, instead of overwriting
module globals; the options are part of the plan's key, so plans built with other limits
never serve a call with these.
"""

from __future__ import annotations

import dataclasses

# Options.band_tiles where the kernel computes a masked block whole (the CPU op, math) and
# where it skips a band's masked blocks itself (flash's window).
NARROW_BAND_TILES = 16
WIDE_BAND_TILES = 1
# Options.causal_chunks where flash runs a causal block's row chunk (causal aligned
# bottom-right, its own) and where the kernel aligns causal top-left (the CPU op).
FLASH_CAUSAL_CHUNKS = 16
WHOLE_CAUSAL = 1


@dataclasses.dataclass(frozen=True)
class Options:
    """Limits on launches, their sizes, and row tiles (all byte counts are of one call's tensors).

    :param max_gather_bytes: bytes of q, k and v a call that batches a block's head offsets
        may gather into copies; beyond it the offsets run one by one on strided views. A copy
        of 4 MiB costs a GPU about what a launch costs its host (~5 us at 3 TB/s, read and
        write).
    :param max_call_share: a launch computes at most ``1/max_call_share`` of the shard's
        (row, head) cells, unless it is the adopted call (whose results are the accumulators)
        or its output is under ``min_split_bytes``: its results, and in backward its
        gradients, are alive beside the accumulators, so this bounds the memory above them
        where memory matters more than launches.
    :param min_split_bytes: see ``max_call_share``.
    :param row_tiles: a one-rank half-precision shard whose float32 accumulators would take
        ``min_tiled_bytes`` or more runs in up to this many tiles of rows
        (:mod:`ring_attention.tiles`), each tile's at least ``min_tile_bytes``: in forward
        where its rows merge several results, in backward where a gradient cell sums more
        than :data:`~ring_attention.schedule.EXACT_HALF_ADDS`. Each tile repeats the plan's
        launches, so smaller shards, host-bound on a GPU, run whole: there launches cost more
        than the memory. ``1`` turns tiling off.
    :param min_tile_bytes: see ``row_tiles``.
    :param min_tiled_bytes: see ``row_tiles``.
    :param band_tiles: a sliding window's runs are cut into tiles of ``1/band_tiles`` of its
        band's width (:func:`~ring_attention.runs.window_tile`). A kernel that computes a
        masked block whole (the CPU op, math) wants narrow tiles, so that what it computes
        stays near the band's pairs (:data:`NARROW_BAND_TILES`: within a few percent); one that
        skips a band's masked blocks itself (flash's window on CUDA) wants wide ones, so that a
        row's band takes one call instead of seventeen (:data:`WIDE_BAND_TILES`; a tile's key
        runs then join into one block, :func:`~ring_attention.runs.joined_keys`). ``0``: chosen
        by the backend the call runs on (:func:`~ring_attention.executable.resolved`).
    :param causal_chunks: where a rank's causal calls quarantine their own keys (packed
        documents, a window's diagonal tiles: :func:`~ring_attention.schedule.chunk_rows`), a
        causal block of one run longer than ``1/causal_chunks`` of the shard's rows (and than
        ``min_split_bytes`` of output) runs its forward in row chunks of at most that many
        rows, each against the keys up to its last row (a causal mask aligned bottom-right;
        the backward runs the block whole, from the rows' final output and LSE). A long
        document then holds a chunk's output beside the shard's, not its own: on a GPU that is
        most of the memory above flash's (:data:`FLASH_CAUSAL_CHUNKS`). The CPU op aligns
        causal top-left and would run a chunk on an additive mask: there blocks stay whole
        (:data:`WHOLE_CAUSAL`), as on CUDA's efficient kernel, which would run it on math.
        Forced there (tests do on the CPU), chunks are exact, only slower. ``0``: chosen by
        the backend, as ``band_tiles``.
    """

    max_gather_bytes: int = 4 * 2**20
    max_call_share: int = 4
    min_split_bytes: int = 2**20
    row_tiles: int = 16
    min_tile_bytes: int = 2**20
    min_tiled_bytes: int = 64 * 2**20
    band_tiles: int = 0
    causal_chunks: int = 0


DEFAULT = Options()
