"""What the executor derives from a rank's plan before running it.

The executor decides whether a kernel result is written or merged: a call writes only
if no call it ran before touched the same cells (same unit and overlapping packed rows,
or another pair on a shared head). Accumulators start at ``(0, -inf)``, which a merge
leaves exact, so this is an optimization that no execution order can make wrong. They
are left uninitialized only where the calls before the first merge write every cell
(writes never overlap, so counting their cells is enough), and the first call's outputs
*are* the accumulators where it alone covers the shard (full attention on one rank, a
ring's local block, a mixture's pair of segments shorter than the shard at rate 1).

A block of ``O`` head offsets runs as one batch where that is a view, or where gathering
it into copies saves launches and copies little (:data:`MAX_GATHER_BYTES`). The output
accumulates in float32 only where some call merges, and the LSE is written only where a
merge or a backward reads it.

Memory above the accumulators stays small: the first call's results (and gradients)
*are* the accumulators where that call covers the shard, no other launch computes more
than 1/:data:`MAX_CALL_SHARE` of the shard's cells (a call's runs are split), and one
launch's results are alive at a time. The accumulators themselves are float32 only where
half precision would not be exact (:data:`EXACT_HALF_ADDS`), and a one-rank half-precision
shard that needs them runs in row tiles (:mod:`ring_attention.tiles`), one tile's float32
accumulators alive at a time.
"""

from __future__ import annotations

import dataclasses
import itertools
import weakref

import torch

from .blocks import Block, Call, RankPlan, device_key
from .comm import Ring
from .merge import accumulation_dtype
from .tiles import Tile, row_tiles

# Bytes of q, k and v a call that batches a block's head offsets may gather into copies;
# beyond it the offsets run one by one on strided views (see _offset_groups). A copy of
# 4 MiB costs a GPU about what a launch costs its host (~5 us at 3 TB/s, read and write).
MAX_GATHER_BYTES = 4 * 2**20
# A launch computes at most 1/MAX_CALL_SHARE of the shard's (row, head) cells, unless it
# is the adopted call or its output is under MIN_SPLIT_BYTES: its results, and in backward
# its gradients, are alive beside the accumulators, so this bounds the memory above them
# where memory matters more than launches (see pieces).
MAX_CALL_SHARE = 4
MIN_SPLIT_BYTES = 2**20
# A one-rank half-precision shard whose float32 accumulators would take MIN_TILED_BYTES or
# more runs in up to ROW_TILES tiles of rows (see tiles.py), each tile's at least
# MIN_TILE_BYTES: in forward where its rows merge several results, in backward where a
# gradient cell sums more than two. Each tile repeats the plan's launches, so smaller
# shards, host-bound on a GPU, run whole: there launches cost more than the memory.
ROW_TILES = 16
MIN_TILE_BYTES = 2**20
MIN_TILED_BYTES = 64 * 2**20
# Two half-precision gradients summed in half precision round once, as their float32 sum
# does when converted: up to this many gradients per cell, half-precision accumulators are
# exact (and a third of the float32 ones' bytes).
EXACT_HALF_ADDS = 2


def blocks_in_order(plan: RankPlan):
    """The rank's blocks in execution order: local first, then by shift."""
    return itertools.chain(plan.local, *(step.blocks for step in plan.steps.values()))


@dataclasses.dataclass(frozen=True)
class Schedule:
    """What the executor derives from a plan once: which calls write, what needs a merge.

    ``writes[call]``: the call is the first to touch its cells, so its result is copied
    in, not merged. ``merges``: some call merges (the output needs a float32 accumulator).
    ``cells_before_merge``: the (row, head) cells written before the first merge. Writes
    never overlap, so when that is every cell of the shard, each cell holds a kernel's
    result before any merge reads it: the accumulators need no initial ``(0, -inf)``.
    ``adopted``: the first call, when it alone writes every row and head in order: its
    kernel outputs *are* the accumulators (where their layout allows, see
    :func:`views.adopted_rows`). ``adopted_kv``: it covers every key and value row and head
    of the shard as well, so its dK/dV can be the gradient accumulators.
    ``gradient_adds``: at most how many kernel gradients any cell of dQ, dK or dV receives
    from this rank's blocks (an upper bound: a call counts over the span of its rows).
    """

    writes: dict
    merges: bool
    cells_before_merge: int
    adopted: Call | None
    adopted_kv: bool
    gradient_adds: int

    def covers(self, q: torch.Tensor) -> bool:
        """Whether every cell of the shard ``q [B, n, H, D]`` is written before any merge."""
        return self.cells_before_merge == q.shape[1] * q.shape[2]


def _adoptable(plan: RankPlan) -> tuple[Call | None, bool]:
    """``(adopted, adopted_kv)``: the first call, if it alone computes every row and head of
    the query shard in order (one run or several back to back), and whether it does so for
    the key and value rows too (then its dK/dV can be the gradient accumulators)."""
    first = next(blocks_in_order(plan), None)
    num_heads = max((u.heads[-1] + 1 for u in plan.units), default=0)
    if first is None or first.offsets != 1 or first.heads != slice(0, num_heads, 1):
        return None, False
    c = first.calls[0]
    n, n_k = len(first.q_rows), len(first.k_rows)
    if c.q_start != 0 or c.runs * c.q_len != n or first.q_rows.as_slice() != slice(0, n, 1):
        return None, False
    kv_heads = first.kv_index.as_slice() == slice(0, num_heads, 1)
    kv_rows = c.k_start == 0 and c.runs * c.k_len == n_k and first.k_rows.as_slice() == slice(0, n_k, 1)
    return c, kv_heads and kv_rows and first.source is None


_SCHEDULES: weakref.WeakKeyDictionary[RankPlan, Schedule] = weakref.WeakKeyDictionary()


def schedule_of(plan: RankPlan) -> Schedule:
    cached = _SCHEDULES.get(plan)
    if cached is not None:
        return cached
    touched_rows: dict[int, list[tuple[int, int]]] = {}  # unit -> packed query intervals
    touched_heads: dict[int, set[int]] = {}  # pair -> query heads
    writes = {}
    for blk in blocks_in_order(plan):
        units = range(blk.unit, blk.unit + blk.offsets)  # one pair
        pair = plan.units[blk.unit].pair
        heads = {h for u in units for h in plan.units[u].heads}
        shared = any(p != pair and heads & seen for p, seen in touched_heads.items())
        for c in blk.calls:
            lo, hi = c.q_start, c.q_start + c.runs * c.q_len
            fresh = all(not any(a < hi and lo < b for a, b in touched_rows.get(u, ())) for u in units)
            writes[c] = not shared and fresh
            for u in units:
                touched_rows.setdefault(u, []).append((lo, hi))
        touched_heads.setdefault(pair, set()).update(heads)
    cells = 0
    calls = ((c, blk.offsets * len(plan.units[blk.unit].heads)) for blk in blocks_in_order(plan) for c in blk.calls)
    for c, heads in calls:
        if not writes[c]:
            break
        cells += c.runs * c.q_len * heads
    schedule = Schedule(writes, not all(writes.values()), cells, *_adoptable(plan), gradient_adds(plan))
    _SCHEDULES[plan] = schedule
    return schedule


def gradient_adds(plan: RankPlan) -> int:
    """The most gradients any (row, head) cell of dQ, dK or dV receives, bounded above by
    taking each call's rows as the interval they span (per head offset and head)."""
    spans: dict[tuple[str, int], list[tuple[int, int]]] = {}
    for blk in blocks_in_order(plan):
        heads = range(*blk.heads.indices(blk.heads.stop))
        kv_heads = blk.kv_index.values()
        for c in blk.calls:
            q_lo, q_hi = _span(blk.q_rows.sub(c.q_start, c.q_start + c.runs * c.q_len))
            k_lo, k_hi = _span(blk.k_rows.sub(c.k_start, c.k_start + c.runs * c.k_len))
            for o in range(blk.offsets):
                for h, g in zip(heads, kv_heads):  # a gradient per query head, summed per kv head
                    spans.setdefault(("q", h + o), []).append((q_lo + o, q_hi + o))
                    spans.setdefault((blk.source, g + o), []).append((k_lo + o, k_hi + o))
    return max((_most_overlapping(s) for s in spans.values()), default=0)


def _span(rows) -> tuple[int, int]:
    ends = [e for r in rows.ranges for e in (r[0], r[-1])]
    return min(ends), max(ends)


def _most_overlapping(intervals: list[tuple[int, int]]) -> int:
    """The most closed intervals ``[lo, hi]`` sharing a point."""
    events = sorted([(lo, 1) for lo, _ in intervals] + [(hi + 1, -1) for _, hi in intervals])
    most = depth = 0
    for _, step in events:  # at one position, ends (-1) sort before starts
        depth += step
        most = max(most, depth)
    return most


def receives_gradients(plan: RankPlan) -> bool:
    """Whether dK/dV come back to this rank: it sends K/V (directly or passed on) at some shift."""
    return any(step.sends for step in plan.steps.values())


def exact_in_half(plan: RankPlan) -> bool:
    """Whether the rank's gradients may accumulate in q's dtype: at most EXACT_HALF_ADDS
    gradients per cell, none coming back from other ranks."""
    return schedule_of(plan).gradient_adds <= EXACT_HALF_ADDS and not receives_gradients(plan)


_PIECES: weakref.WeakKeyDictionary[Block, dict] = weakref.WeakKeyDictionary()


def pieces(blk: Block, c: Call, q, adopted: bool, copies: int, per_result: int) -> list[tuple[Call, slice]]:
    """The launches of call ``c``: ``(call, head offsets)`` pairs, the call's runs split so
    that each launch computes at most 1/:data:`MAX_CALL_SHARE` of the shard's cells (an
    ``adopted`` call, whose results become the accumulators, and a call whose output
    takes less than :data:`MIN_SPLIT_BYTES`, whole). ``copies`` and ``per_result``: see
    :func:`_offset_groups`.

    Cached per block, call and shard shape: the split calls are then the same objects on
    every run, so :func:`views.view`'s recipes for them are found again.
    """
    cached = _PIECES.setdefault(blk, {})
    limits = (MAX_CALL_SHARE, MIN_SPLIT_BYTES, MAX_GATHER_BYTES)  # tests vary them
    key = (c, q.shape, q.element_size(), adopted, copies, per_result, limits)
    if key not in cached:
        cached[key] = _split_call(blk, c, q, adopted, copies, per_result)
    return cached[key]


def _split_call(blk: Block, c: Call, q, adopted: bool, copies: int, per_result: int) -> list[tuple[Call, slice]]:
    groups = _offset_groups(blk, c, q, copies, per_result)
    b, n, h, d = q.shape
    per_run = (groups[0].stop - groups[0].start) * c.q_len * len(range(*blk.heads.indices(h)))
    runs = max(1, n * h // MAX_CALL_SHARE // per_run)
    small = b * c.runs * per_run * d * q.element_size() < MIN_SPLIT_BYTES
    if adopted or small or runs >= c.runs:
        return [(c, g) for g in groups]
    calls = [
        dataclasses.replace(c, q_start=c.q_start + i * c.q_len, k_start=c.k_start + i * c.k_len,
                            runs=min(runs, c.runs - i), q_rows=c.q_rows.sub(i * c.q_len, (i + runs) * c.q_len))
        for i in range(0, c.runs, runs)
    ]
    return [(piece, g) for piece in calls for g in groups]


def _offset_groups(blk: Block, c: Call, q, copies: int, per_result: int) -> list[slice]:
    """The block's head offsets as the call batches them: all at once, or one by one.

    All ``O`` offsets in one launch are a strided view only with one run and one batch
    element; otherwise the kernel gets gathered copies of its inputs (``copies``
    launches). They are made where they save launches (each offset on its own is a
    kernel and ``per_result`` launches to put its result) and copy at most
    :data:`MAX_GATHER_BYTES` (short sequences, where launches cost more than the kernels).
    """
    if blk.offsets == 1 or (q.shape[0] == 1 and c.runs == 1):
        return [slice(0, blk.offsets)]
    heads = len(range(*blk.heads.indices(q.shape[2])))
    rows = c.runs * (c.q_len + 2 * c.k_len)
    gathered = q.shape[0] * blk.offsets * rows * heads * q.shape[3] * q.element_size()
    if gathered <= MAX_GATHER_BYTES and copies < (blk.offsets - 1) * (1 + per_result):
        return [slice(0, blk.offsets)]
    return [slice(o, o + 1) for o in range(blk.offsets)]


def shard_tiles(plans: dict[int, RankPlan], ring: Ring, q: torch.Tensor, *, closed: bool) -> tuple[Tile, ...] | None:
    """The tiles a one-rank ring runs a half-precision shard ``q`` in, or ``None`` (run it
    whole): none below MIN_TILED_BYTES of float32 ``[B, n, H, D]``, else as many as leave
    each tile's over MIN_TILE_BYTES, at most ROW_TILES."""
    acc = accumulation_dtype(q.dtype)
    float32_bytes = q.numel() * acc.itemsize
    if ring.size != 1 or acc == q.dtype or float32_bytes < MIN_TILED_BYTES:
        return None
    count = min(ROW_TILES, float32_bytes // MIN_TILE_BYTES)
    return row_tiles(plans[ring.ranks[0]], q.shape[1], count, closed=closed)


_CELLS_WITHOUT_KEYS: weakref.WeakKeyDictionary[RankPlan, dict] = weakref.WeakKeyDictionary()


def cells_without_keys(plan: RankPlan, q: torch.Tensor) -> torch.Tensor:
    """``[n, H]`` bool on ``q``'s device: the (row, head) cells of the shard that no call of
    ``plan`` computes.

    Built once per plan and shape as a CPU tensor (pinned where CUDA is the target, so the
    copy does not wait for the stream) and cached; on another device that mask is copied
    over at every call (one launch, no host synchronisation). While a CUDA graph is being captured it is
    built on the device instead, a fill per run of rows: a copy from pageable host memory
    cannot be captured, and a device tensor kept across calls would live in the graph's
    memory pool, which later replays overwrite.
    """
    n, h = q.shape[1], q.shape[2]
    if q.device.type != "cpu" and _capturing_cuda_graph():
        return _build_cells_without_keys(plan, n, h, q.device)
    per_plan = _CELLS_WITHOUT_KEYS.setdefault(plan, {})
    key = (n, h, device_key(q))  # the CPU mask serves one target device and fake mode
    cells = per_plan.get(key)
    if cells is None:
        cells = _build_cells_without_keys(plan, n, h, torch.device("cpu"))
        if q.is_cuda and torch.cuda.is_available():  # pinned: from pageable memory the copy waits for the stream
            cells = cells.pin_memory()
        per_plan[key] = cells
    return cells if q.device.type == "cpu" else cells.to(q.device, non_blocking=True)


def _capturing_cuda_graph() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _build_cells_without_keys(plan: RankPlan, n: int, h: int, device: torch.device) -> torch.Tensor:
    cells = torch.ones(n, h, dtype=torch.bool, device=device)
    for blk in blocks_in_order(plan):
        heads = range(*blk.heads.indices(h))
        for c in blk.calls:
            for o in range(blk.offsets):
                for r in blk.q_rows.sub(c.q_start, c.q_start + c.runs * c.q_len).ranges:
                    cells[r.start + o : r[-1] + o + 1 : r.step, heads.start + o : heads.stop + o : heads.step] = False
    return cells
