"""Executable plans: the ranks' plans with everything the executor needs, built once per key.

The planner (:mod:`ring_attention.plans`) says which packed rows meet which; this module
adds what running them takes, so the executors (:mod:`ring_attention.forward`,
:mod:`ring_attention.backward`) only run it:

- the schedule of each rank (:mod:`ring_attention.schedule`): which calls write and which
  merge, what is adopted as accumulators, how many gradients meet in a cell;
- each call's launches for the shard's shape and the :class:`~ring_attention.options.Options`;
- the row tiles of a half-precision shard that runs tiled, each an executable rank of its own;
- the view recipes and the mask of cells without keys, made by the first call that needs
  them (they depend on the inputs' strides and device) and kept with the plan.

Plans are cached under a :class:`PlanKey`, a hashable description of a call: the pattern,
the sequence, heads, batch, head dim and dtype, the ring and the options. The cache holds
:data:`MAX_PLANS` executable plans, least recently used first out; :func:`clear` empties
it with every cache the planner keeps. What a plan holds across calls is Python data and,
for the masks, CPU tensors: never a tensor on an accelerator, which a CUDA graph's memory
pool could overwrite between calls.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Hashable

import torch

from . import blocks, kernels, plans, schedule
from . import layout as _layout
from .blocks import Call, DeviceKey, Index, IndexCache, RankPlan, Rows, device_key
from .layout import Layout
from .masks import SequenceMask
from .merge import MERGE_LAUNCHES, accumulation_dtype
from .options import DEFAULT, FLASH_CAUSAL_CHUNKS, NARROW_BAND_TILES, WHOLE_CAUSAL, WIDE_BAND_TILES, Options
from .pattern import DilatedPattern
from .schedule import Schedule, Shard
from .tiles import row_tiles
from .views import Recipe

# Executable plans kept: a model's layers share one per shape, so a few per training job.
MAX_PLANS = 256


@dataclasses.dataclass(frozen=True)
class PlanKey:
    """What fixes an executable plan: a hashable description of a call.

    :param pattern: the dilated pattern; ``None`` is full attention.
    :param seq_len: ``N``, the whole sequence's length.
    :param heads: query heads ``H``.
    :param kv_heads: key/value heads ``Hkv``.
    :param mask: which keys each query may see (besides the pattern), as data the planner
        classifies blocks by.
    :param ring_size: ``R``.
    :param layout: how the ranks hold the sequence.
    :param ranks: the ranks this process runs.
    :param batch: ``B``.
    :param head_dim: ``D``.
    :param dtype: the inputs' dtype.
    :param options: the executor's limits.
    """

    pattern: DilatedPattern | None
    seq_len: int
    heads: int
    kv_heads: int
    mask: SequenceMask
    ring_size: int
    layout: Layout
    ranks: tuple[int, ...]
    batch: int
    head_dim: int
    dtype: torch.dtype
    options: Options = DEFAULT

    @property
    def shard(self) -> Shard:
        return Shard(self.batch, self.seq_len // self.ring_size, self.heads, self.head_dim, self.dtype.itemsize)


@dataclasses.dataclass(eq=False)
class RankExecution:
    """One rank's plan, ready to run: its schedule, launches and tiles.

    ``adopts_forward``/``adopts_backward``: the schedule's adopted call's results (gradients)
    become the accumulators. ``gradients_in_half``: gradients accumulate in q's dtype
    (:func:`~ring_attention.schedule.exact_in_half`). ``forward_launches[lse][call]``: the
    launches of a call when an LSE accumulator exists (``lse``) or not;
    ``backward_launches[call]``: in backward. ``forward_tiles``/``backward_tiles``: ``(start,
    stop, rank)`` of each row tile, or ``None`` (the shard runs whole). ``splits_values``:
    causal calls read their values from one split of each source, else each quarantines
    its own (:func:`~ring_attention.schedule.splits_values`).
    """

    plan: RankPlan
    shard: Shard
    schedule: Schedule
    adopts_forward: bool
    adopts_backward: bool
    gradients_in_half: bool
    forward_launches: dict[bool, dict[Call, tuple[tuple[Call, slice], ...]]]
    backward_launches: dict[Call, tuple[tuple[Call, slice], ...]]
    splits_values: bool
    forward_tiles: tuple[tuple[int, int, RankExecution], ...] | None = None
    backward_tiles: tuple[tuple[int, int, RankExecution], ...] | None = None
    recipes: dict[Hashable, Recipe] = dataclasses.field(default_factory=dict)  # see views.view
    #: CPU index tensors of the plan's row sets, shared by its ranks and tiles (blocks.index)
    indices: IndexCache = dataclasses.field(default_factory=dict)
    _empty_cells: dict[DeviceKey, torch.Tensor] = dataclasses.field(default_factory=dict)

    def index(self, rows: Rows, like: torch.Tensor) -> Index:
        """``rows`` as a slice or an index tensor on ``like``'s device (:func:`~ring_attention.
        blocks.index`), CPU tensors kept in the plan."""
        return blocks.index(rows, like, self.indices)

    def cells_without_keys(self, q: torch.Tensor) -> torch.Tensor:
        """``[n, H]`` bool on ``q``'s device: the cells of the shard no call computes.

        Built once per target device (and fake-tensor mode) as a CPU tensor, pinned where CUDA
        is the target so that the copy does not wait for the stream, and copied over at every
        call (one launch, no host synchronisation). While a CUDA graph is being captured it is
        built on the device instead: a copy from pageable host memory cannot be captured.
        """
        n, h = q.shape[1], q.shape[2]
        if q.device.type != "cpu" and schedule.capturing_cuda_graph():
            return schedule.build_cells_without_keys(self.plan, n, h, q.device)
        key = device_key(q)
        cells = self._empty_cells.get(key)
        if cells is None:
            cells = schedule.build_cells_without_keys(self.plan, n, h, torch.device("cpu"))
            if q.is_cuda and torch.cuda.is_available():
                cells = cells.pin_memory()
            self._empty_cells[key] = cells
        return cells if q.device.type == "cpu" else cells.to(q.device, non_blocking=True)


@dataclasses.dataclass(eq=False)
class ExecutablePlan:
    """The executable ranks of a ring that one process runs, by rank.

    :param key: what the plan was built for.
    :param ranks: each run rank's :class:`RankExecution`.
    """

    key: PlanKey
    ranks: dict[int, RankExecution]
    #: the forward's received K/V is kept for the backward instead of received again
    #: (:func:`keeps_received`)
    keeps_received: bool = False

    def shard(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The whole sequence ``x`` (natural order) -> every rank's shard, in the key's layout
        (the documents layout deals its chunks by the key's documents)."""
        return _layout.shard(x, self.key.ring_size, self.key.layout, cu_seqlens=self.key.mask.documents)

    def unshard(self, shards: list[torch.Tensor]) -> torch.Tensor:
        """Every rank's shard -> the whole sequence in natural order (inverse of :meth:`shard`)."""
        return _layout.unshard(shards, self.key.layout, cu_seqlens=self.key.mask.documents)


def executable_plan(key: PlanKey) -> ExecutablePlan:
    """The cached executable plan of ``key``, built on first use.

    :param key: the call's description.
    :returns: the plan, shared by every call with an equal key (at most :data:`MAX_PLANS` kept).
    """
    hit = _CACHE.get(key)
    if hit is not None:
        _CACHE.move_to_end(key)
        return hit
    rank_plans = plans.ring_plans(key.pattern, key.seq_len, key.heads, key.kv_heads, key.mask, key.ring_size,
                                  key.layout, key.ranks, key.options.band_tiles or NARROW_BAND_TILES)
    built = _CACHE[key] = build(key, rank_plans)
    if len(_CACHE) > MAX_PLANS:
        _CACHE.popitem(last=False)
    return built


def build(key: PlanKey, rank_plans: tuple[RankPlan, ...]) -> ExecutablePlan:
    """An executable plan of ``rank_plans`` (one per rank of ``key.ranks``), uncached."""
    dtype, shard = key.dtype, key.shard
    tiled = key.ring_size == 1 and accumulation_dtype(dtype) != dtype
    indices: IndexCache = {}  # one for the plan: its ranks' and tiles' row sets overlap
    ranks = {}
    for r, plan in zip(key.ranks, rank_plans):
        ranks[r] = _rank(plan, shard, dtype, key.kv_heads == key.heads, key.options, tiled=tiled, indices=indices)
    relay = any(plan.relay for plan in rank_plans)
    return ExecutablePlan(key, ranks, keeps_received=not relay and not tiled and keeps_received(key))


def resolved(options: Options, q: torch.Tensor) -> Options:
    """``options`` with what the backend of ``q``'s blocks decides filled in: a window's tiles
    (:attr:`~ring_attention.options.Options.band_tiles`) wide where flash runs a band on its
    own window, narrow where the kernel computes a masked block whole; a causal block's
    forward (:attr:`~ring_attention.options.Options.causal_chunks`) in row chunks where flash
    aligns their causal mask bottom-right itself, whole elsewhere."""
    if options.band_tiles and options.causal_chunks:
        return options
    flash = kernels.backend(q) == "flash"
    return dataclasses.replace(
        options,
        band_tiles=options.band_tiles or (WIDE_BAND_TILES if flash else NARROW_BAND_TILES),
        causal_chunks=options.causal_chunks or (FLASH_CAUSAL_CHUNKS if flash else WHOLE_CAUSAL),
    )


def keeps_received(key: PlanKey) -> bool:
    """Whether a ring's backward reuses the K/V its forward received: under a sliding window
    whose band reaches at most a shard's length, what a rank receives is at most about one
    more K/V shard, and keeping it saves a third of the ring's bytes (K/V out in forward, out
    again in backward, dK/dV back). Wider bands, and full attention, receive up to ``R - 1``
    shards: those are received again. Decided from the key alone, so every rank agrees."""
    left, right = key.mask.reach
    return key.ring_size > 1 and 0 <= left and 0 <= right and left + right <= key.seq_len // key.ring_size


def clear() -> None:
    """Empty the cache of executable plans and every cache of the planner behind it."""
    _CACHE.clear()
    plans.clear()
    _layout.clear()


_CACHE: collections.OrderedDict[PlanKey, ExecutablePlan] = collections.OrderedDict()


def _rank(plan: RankPlan, shard: Shard, dtype: torch.dtype, kv_like_q: bool, options: Options, *,
          tiled: bool, indices: IndexCache, splits: bool | None = None) -> RankExecution:
    """``splits``: whether the plan splits its value sources (:func:`schedule.splits_values`);
    a row tile's is its shard's, which all its tiles share (one split of the K/V they read)."""
    sched = schedule.analyse(plan)
    acc = accumulation_dtype(dtype)
    out_dtype = acc if sched.merges else dtype
    adopts_forward = sched.covers(shard) and sched.adopted is not None and out_dtype == dtype
    in_half = schedule.exact_in_half(plan, sched)
    adopts_backward = sched.adopted_kv and kv_like_q and (in_half or acc == dtype)
    splits = schedule.splits_values(plan, shard.rows) if splits is None else splits
    chunk_rows = None if splits else schedule.chunk_rows(shard, options)
    forward: dict[bool, dict[Call, tuple[tuple[Call, slice], ...]]] = {False: {}, True: {}}
    backward: dict[Call, tuple[tuple[Call, slice], ...]] = {}
    for blk in schedule.blocks_in_order(plan):
        for c in blk.calls:
            adopted = c is sched.adopted
            for lse in (False, True):  # launches per result: a merge, or a copy of out (and of lse)
                per_result = 1 + lse if sched.writes[c] else MERGE_LAUNCHES
                forward[lse][c] = schedule.launches(blk, c, shard, options, adopted and adopts_forward, 3, per_result,
                                                    chunk_rows=chunk_rows)
            # Gathered copies: dout, q, k, v and out; putting a result: three adds.
            backward[c] = schedule.launches(blk, c, shard, options, adopted and adopts_backward, 5, 3)
    rank = RankExecution(plan, shard, sched, adopts_forward, adopts_backward, in_half, forward, backward, splits,
                         indices=indices)
    if tiled:
        if sched.merges:
            rank.forward_tiles = _tiles(plan, shard, dtype, kv_like_q, options, closed=False, indices=indices)
        if not in_half:
            rank.backward_tiles = _tiles(plan, shard, dtype, kv_like_q, options, closed=True, indices=indices)
    return rank


def _tiles(plan: RankPlan, shard: Shard, dtype: torch.dtype, kv_like_q: bool, options: Options, *,
           closed: bool, indices: IndexCache) -> tuple[tuple[int, int, RankExecution], ...] | None:
    """The row tiles of a half-precision shard, each executable, or ``None`` (run it whole):
    none below ``options.min_tiled_bytes`` of float32 ``[B, n, H, D]``, else as many as
    leave each tile's over ``options.min_tile_bytes``, at most ``options.row_tiles``."""
    float32_bytes = shard.batch * shard.cells * shard.head_dim * accumulation_dtype(dtype).itemsize
    if float32_bytes < options.min_tiled_bytes:
        return None
    count = min(options.row_tiles, float32_bytes // options.min_tile_bytes)
    tiles = row_tiles(plan, shard.rows, count, closed=closed)
    if tiles is None:
        return None
    # The tiles share one split of the shard's values (the forward's): split if any tile's
    # calls would, and none chunks its causal calls then (a chunk reads its own copy).
    splits = any(schedule.splits_values(t.plan, shard.rows) for t in tiles)
    return tuple(
        (t.start, t.stop, _rank(t.plan, dataclasses.replace(shard, rows=t.stop - t.start), dtype, kv_like_q, options,
                                tiled=False, indices=indices, splits=splits))
        for t in tiles
    )
