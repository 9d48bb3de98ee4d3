"""Attention over packed rows: running plans of fused-kernel calls, forward and backward.

Dilated attention never looks at an ``N x N`` matrix. For each (pair, head offset) it
*packs* the rows a head keeps into a dense block, runs the fused kernel on the packed
block, and merges the result into the rows' running ``(out, lse)``. A
:class:`~ring_attention.blocks.RankPlan` lists those blocks for one rank of a ring; this
module runs the plans of the ranks a process holds on any
:class:`~ring_attention.comm.Ring`.

Every rank walks the shifts ``1 .. R-1`` in the same order, posting the exchange of
shift ``s + 1`` before computing shift ``s`` (and, in backward, returning the dK/dV of
shift ``s`` after computing it). A rank with nothing to send or receive at a shift posts
nothing, so between any two ranks the messages are posted in the same order on both
sides.

The executor decides whether a kernel result is written or merged: a call writes only
if no call it ran before touched the same cells (same unit and overlapping packed rows,
or another pair on a shared head). Accumulators start at ``(0, -inf)``, which a merge
leaves exact, so this is an optimization that no execution order can make wrong. They
are left uninitialized only where the calls before the first merge write every cell
(writes never overlap, so counting their cells is enough), and the first call's outputs
*are* the accumulators where it alone covers the shard (full attention on one rank, a
ring's local block, a mixture's pair of segments shorter than the shard at rate 1).

Launches are what a GPU pays for in eager mode (each op costs host time), so results
move through strided views, never through per-block buffers: a kernel's output is
copied into (or merged with) a view of the accumulators, its gradients added into
views of the gradient accumulators; a block of ``O`` head offsets runs as one batch
where that is a view, or where gathering it into copies saves launches and copies
little (:data:`MAX_GATHER_BYTES`). The output accumulates in float32 only where some
call merges, and the LSE is written only where a merge or a backward reads it.

Memory above the accumulators stays small: the first call's results (and gradients)
*are* the accumulators where that call covers the shard, no other launch computes more
than 1/:data:`MAX_CALL_SHARE` of the shard's cells (a call's runs are split), and one
launch's results are alive at a time. The accumulators themselves are float32 only where
half precision would not be exact (:data:`EXACT_HALF_ADDS`), and a one-rank half-precision
shard that needs them runs in row tiles (:mod:`ring_attention.tiles`), one tile's float32
accumulators alive at a time.

The backward follows PyTorch's context-parallel recipe: each block's kernel backward is
called with the rows' *final* output and LSE, which makes its gradient that block's
exact share of the gradient of the merged result; dQ accumulates locally in float32,
dK/dV of received rows travel back to their owner, also in float32.
"""

from __future__ import annotations

import dataclasses
import itertools
import weakref

import torch
import torch.utils.checkpoint
from torch._subclasses.fake_tensor import is_fake
from torch.utils._python_dispatch import _disable_current_modes

from . import kernels
from . import layout as _layout
from .blocks import Block, Call, Index, Message, RankPlan, Step, device_key, index
from .comm import Ring
from .merge import MERGE_LAUNCHES, accumulation_dtype, merge_into_
from .tiles import Tile, row_tiles

# Bytes of q, k and v a call that batches a block's head offsets may gather into copies;
# beyond it the offsets run one by one on strided views (see _offset_groups). A copy of
# 4 MiB costs a GPU about what a launch costs its host (~5 us at 3 TB/s, read and write).
MAX_GATHER_BYTES = 4 * 2**20
# A launch computes at most 1/MAX_CALL_SHARE of the shard's (row, head) cells, unless it
# is the adopted call or its output is under MIN_SPLIT_BYTES: its results, and in backward
# its gradients, are alive beside the accumulators, so this bounds the memory above them
# where memory matters more than launches (see _pieces).
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


def take(x: torch.Tensor, rows: Index, heads: Index) -> torch.Tensor:
    """``x[:, rows, heads]`` for ``x [B, N, H, ...]``; a view where both are slices."""
    x = x[:, rows] if isinstance(rows, slice) else x.index_select(1, rows)
    return x[:, :, heads] if isinstance(heads, slice) else x.index_select(2, heads)


def _packed(x: torch.Tensor, rows: Index, heads: Index, offsets: int = 1) -> torch.Tensor:
    """A block's rows and heads of ``x [B, N, H, ...]`` as ``[B, O, M, h, ...]``.

    Offset ``o`` of the ``O = offsets`` is the block shifted by ``o`` rows and ``o``
    heads: one strided view (rows and heads are then slices). Index tensors gather a
    copy (``O = 1``).
    """
    if not (isinstance(rows, slice) and isinstance(heads, slice)):
        return take(x, rows, heads).unsqueeze(1)
    st = x.stride()
    size = (x.shape[0], offsets, len(range(rows.start, rows.stop, rows.step)),
            len(range(heads.start, heads.stop, heads.step)), *x.shape[3:])
    stride = (st[0], st[1] + st[2], st[1] * rows.step, st[2] * heads.step, *st[3:])
    return x.as_strided(size, stride, x.storage_offset() + rows.start * st[1] + heads.start * st[2])


def _source_packed(blk: Block, t: torch.Tensor, rows: Index, heads: Index) -> torch.Tensor:
    """The block's key rows and heads of its source ``t`` as ``[B, O, M, h, ...]``: ``t``
    itself where it is a message of several head offsets, already so packed (:class:`Message`)."""
    stacked = blk.source is not None and blk.offsets > 1
    return t if stacked else _packed(t, rows, heads, blk.offsets)


def _run_view(x: torch.Tensor, start: int, runs: int, length: int) -> torch.Tensor:
    """Packed ``[B, O, M, h, ...]`` rows ``start .. start + runs*length`` as ``[B, O, runs, h, length, ...]``."""
    return x[:, :, start : start + runs * length].unflatten(2, (runs, length)).transpose(3, 4)


def _runs(x: torch.Tensor, start: int, runs: int, length: int) -> torch.Tensor:
    """Packed ``[B, O, M, h, ...]`` rows -> ``[B*O*runs, h, length, ...]``: the kernel's layout."""
    return _run_view(x, start, runs, length).flatten(0, 2)


def _unpacked(x: torch.Tensor, dtype) -> torch.Tensor:
    """Kernel results ``[B, 1, runs, h, L, ...]`` -> ``[B, runs*L, h, ...]``: a copy in ``dtype``."""
    x = x.squeeze(1).transpose(2, 3)
    return x.to(dtype, memory_format=torch.contiguous_format).flatten(1, 2)


# How each call views its tensors, per block: (size, stride, storage offset from the viewed
# tensor's) by (what the view is for, the viewed tensor's shape and strides). A call's kernel inputs and result cells take a
# dozen view ops to derive (slices, unflatten, transpose, flatten), and their host time is
# most of what a small call costs besides its kernel; their recipe, once known, is one
# as_strided.
_VIEW_RECIPES: weakref.WeakKeyDictionary[Block, dict] = weakref.WeakKeyDictionary()


def _view(blk: Block, key, x: torch.Tensor, build) -> torch.Tensor:
    """``build(x)``, taken by the recipe cached under ``key`` where it is a view of ``x``.

    The recipe is found by building the view of a meta tensor laid out as ``x``; where
    ``build`` copies (a flatten that strides cannot express), it runs as it is. A traced
    ``x`` (``torch.compile``, fake tensors) runs ``build`` too: host time is not spent there.
    """
    if torch.compiler.is_compiling() or is_fake(x):
        return build(x)
    recipes = _VIEW_RECIPES.get(blk)
    if recipes is None:
        recipes = _VIEW_RECIPES[blk] = {}
    layout = (key, x.shape, x.stride())  # view ops move the storage offset by a constant
    recipe = recipes.get(layout)
    if recipe is None:
        with _disable_current_modes():  # a meta probe is not the caller's to count or trace
            base = torch.empty(x.untyped_storage().nbytes() // x.element_size(), dtype=x.dtype, device="meta")
            probe = build(base.as_strided(x.shape, x.stride(), x.storage_offset()))
        recipe = recipes[layout] = (
            (tuple(probe.shape), probe.stride(), probe.storage_offset() - x.storage_offset())
            if probe._base is base else False
        )
    if not recipe:
        return build(x)
    size, stride, offset = recipe
    return x.as_strided(size, stride, x.storage_offset() + offset)


def _rows_major(lse: torch.Tensor) -> torch.Tensor:
    """LSE ``[B, H, n]`` as a ``[B, n, H]`` view, indexed like the outputs."""
    return lse.transpose(1, 2)


def _blocks_in_order(plan: RankPlan):
    """The rank's blocks in execution order: local first, then by shift."""
    return itertools.chain(plan.local, *(step.blocks for step in plan.steps.values()))


@dataclasses.dataclass(frozen=True)
class _Schedule:
    """What the executor derives from a plan once: which calls write, what needs a merge.

    ``writes[call]``: the call is the first to touch its cells, so its result is copied
    in, not merged. ``merges``: some call merges (the output needs a float32 accumulator).
    ``cells_before_merge``: the (row, head) cells written before the first merge. Writes
    never overlap, so when that is every cell of the shard, each cell holds a kernel's
    result before any merge reads it: the accumulators need no initial ``(0, -inf)``.
    ``adopted``: the first call, when it alone writes every row and head in order: its
    kernel outputs *are* the accumulators (where their layout allows, see
    :func:`_adopted_rows`). ``adopted_kv``: it covers every key and value row and head
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
    first = next(_blocks_in_order(plan), None)
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


_SCHEDULES: weakref.WeakKeyDictionary[RankPlan, _Schedule] = weakref.WeakKeyDictionary()


def _schedule(plan: RankPlan) -> _Schedule:
    cached = _SCHEDULES.get(plan)
    if cached is not None:
        return cached
    touched_rows: dict[int, list[tuple[int, int]]] = {}  # unit -> packed query intervals
    touched_heads: dict[int, set[int]] = {}  # pair -> query heads
    writes = {}
    for blk in _blocks_in_order(plan):
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
    calls = ((c, blk.offsets * len(plan.units[blk.unit].heads)) for blk in _blocks_in_order(plan) for c in blk.calls)
    for c, heads in calls:
        if not writes[c]:
            break
        cells += c.runs * c.q_len * heads
    schedule = _Schedule(writes, not all(writes.values()), cells, *_adoptable(plan), _gradient_adds(plan))
    _SCHEDULES[plan] = schedule
    return schedule


def _gradient_adds(plan: RankPlan) -> int:
    """The most gradients any (row, head) cell of dQ, dK or dV receives, bounded above by
    taking each call's rows as the interval they span (per head offset and head)."""
    spans: dict[tuple[str, int], list[tuple[int, int]]] = {}
    for blk in _blocks_in_order(plan):
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


# --- forward ---------------------------------------------------------------------------


class _SplitValues:
    """Value sources split once for the causal blocks that read them (:func:`kernels.split_values`).

    One per group of blocks that share sources (a rank's local blocks, or one step's), so
    a received message's split dies with the step, as the message does.
    """

    def __init__(self):
        self._by_source: dict[int, tuple] = {}

    def __call__(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        hit = self._by_source.get(id(v))
        if hit is None:  # v is kept in the entry: its id stays its own
            hit = self._by_source[id(v)] = (v, *kernels.split_values(v))
        return hit[1], hit[2]


def _block_forward(blk: Block, schedule, q, k_src, v_src, acc: list, scale: float, poison=None,
                   split: _SplitValues | None = None) -> None:
    """Run the block's calls; each result is written into or merged with the accumulators
    ``acc = [out [B, n, H, D], lse [B, H, n] or None]`` in place, through strided views
    (or, for the schedule's adopted call, becomes them). ``lse`` is ``None`` where nothing
    reads it (no merge, no backward).

    Non-finite query rows (:func:`kernels.marks_query_rows`) are marked as results are
    written: ``poison [B, n, H]`` (:func:`kernels.query_row_poison`) is added with weight 0
    in the copy (the same launch), and a merge into a marked cell keeps the NaN. ``None``:
    the caller marks the rows once at the end (:func:`_mark_query_rows`).

    Causal calls read the values from ``split(v_src)``: zeroed where not finite, their
    poison added to the call's output (one scan); the other calls read ``v_src`` itself.
    """
    q_rows = index(blk.q_rows, q)
    k_rows, kv_index = index(blk.k_rows, q), index(blk.kv_index, q)
    qb = _packed(q, q_rows, blk.heads, blk.offsets)
    kb, vb = (_source_packed(blk, t, k_rows, kv_index) for t in (k_src, v_src))
    clean_vb = bad_vb = None
    if any(c.causal for c in blk.calls):
        clean, bad = (split or _SplitValues())(v_src)
        clean_vb = _source_packed(blk, clean, k_rows, kv_index) if clean is not v_src else vb
        bad_vb = None if bad is None else _source_packed(blk, bad, k_rows, kv_index)
    for call in blk.calls:
        write = schedule.writes[call]
        mark = poison if write else None
        # Launches per result: a merge (MERGE_LAUNCHES), or a copy of out (and of lse).
        per_result = (1 + (acc[1] is not None)) if write else MERGE_LAUNCHES
        adopted = acc[0] is None  # (then call is the schedule's adopted call)
        for c, g in _pieces(blk, call, q, adopted, copies=3, per_result=per_result):
            o, lse = kernels.attention_forward(
                *_kernel_inputs(blk, c, g, qb, kb, clean_vb if c.causal else vb),
                causal=c.causal,
                scale=scale,
                mark_query_rows=False,  # marked once, at the end
                quarantined=c.causal,
            )
            if c.causal and bad_vb is not None:  # the scan runs on the runs' view: no gather copy
                bad_runs = _run_view(bad_vb[:, g], c.k_start, c.runs, c.k_len)
                o.add_(kernels.value_poison(bad_runs).flatten(0, 2))
            _put_result(blk, c, g, q, q_rows, write, mark, acc, o, lse)
            del o, lse  # before the next offset's results: one block result alive at a time


def _kernel_inputs(blk: Block, c: Call, g: slice, qb, kb, vb) -> tuple[torch.Tensor, ...]:
    """Call ``c``'s (head offsets ``g``) query, key and value runs of the packed ``qb``,
    ``kb``, ``vb [B, O, M, h, D]``, as the kernel takes them: ``[B*O*runs, h, L, D]``."""
    return (
        _view(blk, (c, g.start, g.stop, "q"), qb, lambda x: _runs(x[:, g], c.q_start, c.runs, c.q_len)),
        _view(blk, (c, g.start, g.stop, "k"), kb, lambda x: _runs(x[:, g], c.k_start, c.runs, c.k_len)),
        _view(blk, (c, g.start, g.stop, "v"), vb, lambda x: _runs(x[:, g], c.k_start, c.runs, c.k_len)),
    )


def _put_result(blk: Block, c: Call, g: slice, q, q_rows: Index, write: bool, mark, acc: list, o, lse) -> None:
    """Write or merge the results ``o [B*O*runs, h, L, D]``, ``lse [B*O*runs, h, L]`` of
    call ``c`` (head offsets ``g``) into ``acc``; a written result marked by ``mark`` (see
    :func:`_block_forward`)."""
    if acc[0] is None:  # the adopted call: its results are the accumulators, if they can be
        adopted = _adopted_rows(o, q.shape[0]), _adopted_rows(lse.unsqueeze(-1), q.shape[0])
        if None not in adopted:
            acc[0], acc[1] = adopted[0], adopted[1].squeeze(-1).transpose(1, 2)
            return
        acc[:] = _accumulators(q, o.dtype, lse.dtype, covered=True)  # then written below
    out_acc, lse_acc = acc
    by_run = (-1, g.stop - g.start, c.runs)
    o, lse = o.unflatten(0, by_run), lse.unflatten(0, by_run)
    if not isinstance(q_rows, slice):
        rows = q_rows[c.q_start : c.q_start + c.runs * c.q_len]
        _scatter_result(rows, blk.heads, write, acc, o, lse, mark)
        return

    def cells(x):
        return _cells(x, q_rows, blk, g, c)

    o_acc = _view(blk, (c, g.start, g.stop, "out"), out_acc, cells)
    l_acc = None if lse_acc is None else _view(blk, (c, g.start, g.stop, "lse"), _rows_major(lse_acc), cells)
    if not write:
        merge_into_(o_acc, l_acc, o, lse, empty_rows=False)  # kernel results are never empty
    elif mark is None:
        o_acc.copy_(o)
        if l_acc is not None:
            l_acc.copy_(lse)
    else:  # the copy marks the rows: out = o + 0 * poison
        p = _view(blk, (c, g.start, g.stop, "mark"), mark, cells)
        torch.add(o, p.unsqueeze(-1), alpha=0, out=o_acc)
        if l_acc is not None:
            torch.add(lse, p, alpha=0, out=l_acc)


def _accumulators(q, out_dtype, lse_dtype, covered: bool, need_lse: bool = True) -> list:
    """``[out [B, n, H, D], lse [B, H, n] or None]`` for the shard ``q``: uninitialized where
    ``covered`` (every cell is written before any merge reads it), else ``(0, -inf)``:
    cells no call writes are rows without keys."""
    b, n, h, d = q.shape
    out = (torch.empty if covered else torch.zeros)(b, n, h, d, dtype=out_dtype, device=q.device)
    if not need_lse:
        lse = None
    elif covered:
        lse = torch.empty(b, h, n, dtype=lse_dtype, device=q.device)
    else:  # read by merges (and returned by the custom op)
        lse = torch.full((b, h, n), float("-inf"), dtype=lse_dtype, device=q.device)
    return [out, lse]


def _adopted_rows(x: torch.Tensor, batch: int) -> torch.Tensor | None:
    """A kernel result ``[B*runs, H, L, ...]`` of runs back to back as ``[B, runs*L, H, ...]``,
    a view; ``None`` where its layout has no such view (one run always has one; several
    need the rows of a run and the runs to follow each other in memory, as the CPU and
    CUDA kernels lay out their results, but not the CPU op's meta kernel)."""
    rows = x.transpose(1, 2).unflatten(0, (batch, -1))  # [B, runs, L, H, ...]
    if rows.shape[1] != 1 and rows.stride(1) != rows.shape[2] * rows.stride(2):
        return None
    return rows.flatten(1, 2)


def _cells(x: torch.Tensor, rows: slice, blk: Block, g: slice, c: Call) -> torch.Tensor:
    """The cells of ``x [B, n, H, ...]`` that call ``c`` (head offsets ``g``) computes, shaped
    like its results ``[B, O, runs, h, L, ...]``: a strided view."""
    return _run_view(_packed(x, rows, blk.heads, blk.offsets)[:, g], c.q_start, c.runs, c.q_len)


def _scatter_result(rows: torch.Tensor, heads: slice, write: bool, acc: list, o, lse, poison) -> None:
    """Write or merge a result ``[B, 1, runs, h, L, ...]`` at ``rows`` that are no progression
    (a dilated unit across zigzag chunks): gather, merge, scatter; marked by ``poison``
    (``[B, n, H]`` or ``None``) first."""
    out_acc, lse_acc = acc
    o = _unpacked(o, out_acc.dtype)  # [B, M, h, D]
    lse = None if lse_acc is None else _unpacked(lse.unsqueeze(-1), lse_acc.dtype).squeeze(-1)
    if poison is not None:
        p = poison[:, :, heads].index_select(1, rows)
        o.add_(p.unsqueeze(-1), alpha=0)
        if lse is not None:
            lse.add_(p, alpha=0)
    o_heads = out_acc[:, :, heads]
    l_heads = None if lse_acc is None else _rows_major(lse_acc)[:, :, heads]
    if not write:
        o_acc, l_acc = o_heads.index_select(1, rows), l_heads.index_select(1, rows)
        merge_into_(o_acc, l_acc, o, lse, empty_rows=False)  # kernel results are never empty
        o, lse = o_acc, l_acc
    o_heads.index_copy_(1, rows, o)
    if l_heads is not None:
        l_heads.index_copy_(1, rows, lse)


_PIECES: weakref.WeakKeyDictionary[Block, dict] = weakref.WeakKeyDictionary()


def _pieces(blk: Block, c: Call, q, adopted: bool, copies: int, per_result: int) -> list[tuple[Call, slice]]:
    """The launches of call ``c``: ``(call, head offsets)`` pairs, the call's runs split so
    that each launch computes at most 1/:data:`MAX_CALL_SHARE` of the shard's cells (an
    ``adopted`` call, whose results become the accumulators, and a call whose output
    takes less than :data:`MIN_SPLIT_BYTES`, whole). ``copies`` and ``per_result``: see
    :func:`_offset_groups`.

    Cached per block, call and shard shape: the split calls are then the same objects on
    every run, so :func:`_view`'s recipes for them are found again.
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


def _message_tensors(msgs: tuple[Message, ...], k, v) -> list[torch.Tensor]:
    out = []
    for m in msgs:
        rows, heads = index(m.rows, k), index(m.kv_heads, k)
        if m.offsets > 1:  # progressions: one strided [B, O, M, h, D] view each
            out += [_packed(k, rows, heads, m.offsets), _packed(v, rows, heads, m.offsets)]
        else:
            out += [take(k, rows, heads), take(v, rows, heads)]
    return out


def _sizes(msgs: tuple[Message, ...]) -> list[tuple[int, int, int]]:
    return [(len(m.rows), len(m.kv_heads), m.offsets) for m in msgs]


def _shapes(k: torch.Tensor, sizes, dtype) -> list:
    """What arrives for messages of ``sizes`` ``(rows, kv heads, offsets)``: K and V each."""
    b, _, _, d = k.shape
    spec = []
    for rows, kv_heads, offsets in sizes:
        shape = (b, rows, kv_heads, d) if offsets == 1 else (b, offsets, rows, kv_heads, d)
        spec += [(shape, dtype)] * 2
    return spec


def _post_kv(ring: Ring, plans: dict[int, RankPlan], shift: int, ks, vs, held=None):
    """Post shift ``shift``'s exchange of k/v rows for every rank this process runs.

    A relay plan passes on ``held[r]`` (what arrived at the shift before) from shift 2 on.
    """
    relay = plans[ring.ranks[0]].relay
    sends, specs = {}, {}
    for r in ring.ranks:
        step = plans[r].step(shift)
        if step.sends:
            sends[r] = held[r] if relay and shift > 1 else _message_tensors(step.sends, ks[r], vs[r])
        if step.receives:
            specs[r] = _shapes(ks[r], step.receives, ks[r].dtype)
    if not sends and not specs:
        return None
    return ring.exchange(1 if relay else shift, sends, specs, ks[ring.ranks[0]].device)


def _wait(pending) -> dict:
    return {} if pending is None else pending.wait()


def _row_tiles(plans: dict[int, RankPlan], ring: Ring, q: torch.Tensor, *, closed: bool) -> tuple[Tile, ...] | None:
    """The tiles a one-rank ring runs a half-precision shard ``q`` in, or ``None`` (run it
    whole): none below MIN_TILED_BYTES of float32 ``[B, n, H, D]``, else as many as leave
    each tile's over MIN_TILE_BYTES, at most ROW_TILES."""
    acc = accumulation_dtype(q.dtype)
    float32_bytes = q.numel() * acc.itemsize
    if ring.size != 1 or acc == q.dtype or float32_bytes < MIN_TILED_BYTES:
        return None
    count = min(ROW_TILES, float32_bytes // MIN_TILE_BYTES)
    return row_tiles(plans[ring.ranks[0]], q.shape[1], count, closed=closed)


def run_forward(plans: dict[int, RankPlan], ring: Ring, qs: dict, ks: dict, vs: dict, scale: float,
                need_lse: bool = True):
    """Run the plans; returns ``{rank: [out [B,n,H,D], lse [B,H,n]]}``.

    ``out`` is in the accumulation dtype where some call merges on the whole shard, else
    in q's dtype, laid out rows-major like the kernels' results; ``lse`` is in the
    accumulation dtype. ``need_lse=False`` (no backward will run): ``lse`` may be ``None``
    where no call merges.
    """
    r = ring.ranks[0]
    tiles = _row_tiles(plans, ring, qs[r], closed=False) if _schedule(plans[r]).merges else None
    if tiles is None:
        return _forward_whole(plans, ring, qs, ks, vs, scale, need_lse)
    q = qs[r]
    b, n, h, d = q.shape
    out = torch.empty(b, n, h, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, h, n, dtype=accumulation_dtype(q.dtype), device=q.device) if need_lse else None
    for tile in tiles:  # one tile's float32 accumulators alive at a time
        rows = slice(tile.start, tile.stop)
        tile_out, tile_lse = _forward_whole({r: tile.plan}, ring, {r: q[:, rows]}, ks, vs, scale, need_lse)[r]
        out[:, rows].copy_(tile_out)
        if lse is not None:
            lse[:, :, rows].copy_(tile_lse)
        del tile_out, tile_lse
    return {r: [out, lse]}


def _forward_whole(plans: dict[int, RankPlan], ring: Ring, qs: dict, ks: dict, vs: dict, scale: float,
                   need_lse: bool):
    """:func:`run_forward` on whole shards."""
    acc = accumulation_dtype(qs[ring.ranks[0]].dtype)
    state, poisons, marked_at_end = {}, {}, []
    for r in ring.ranks:
        schedule = _schedule(plans[r])
        out_dtype = acc if schedule.merges else qs[r].dtype
        covered = schedule.covers(qs[r])
        adopted = covered and schedule.adopted is not None and out_dtype == qs[r].dtype
        if kernels.marks_query_rows(qs[r]):
            # Marked in the copies of written results, for free; but a merge may reach a cell
            # before any write where the writes do not cover the shard: then once, at the end.
            if adopted or (schedule.merges and not covered):
                marked_at_end.append(r)
            else:
                poisons[r] = kernels.query_row_poison(qs[r], acc)
        if adopted:
            state[r] = [None, None]  # the adopted call's results will be the accumulators
        else:
            state[r] = _accumulators(qs[r], out_dtype, acc, covered, need_lse or schedule.merges)
    pending = _post_kv(ring, plans, 1, ks, vs)
    for r in ring.ranks:  # own rows first, while the first exchange is in flight
        schedule, split = _schedule(plans[r]), _SplitValues()
        for blk in plans[r].local:
            _block_forward(blk, schedule, qs[r], ks[r], vs[r], state[r], scale, poisons.get(r), split)
    for shift in range(1, ring.size):
        received = _wait(pending)
        pending = _post_kv(ring, plans, shift + 1, ks, vs, received)
        for r in ring.ranks:
            schedule, split = _schedule(plans[r]), _SplitValues()
            for blk in plans[r].step(shift).blocks:
                k_msg, v_msg = received[r][2 * blk.source], received[r][2 * blk.source + 1]
                _block_forward(blk, schedule, qs[r], k_msg, v_msg, state[r], scale, poisons.get(r), split)
    for r in marked_at_end:
        _mark_query_rows(plans[r], qs[r], *state[r])
    return state


def _mark_query_rows(plan: RankPlan, q: torch.Tensor, out: torch.Tensor, lse: torch.Tensor | None) -> None:
    """Make ``out [B, n, H, D]`` and ``lse [B, H, n]`` NaN where the query row ``q[:, i, h]``
    holds NaN or inf and the plan computes cell ``(i, h)``: once per shard, after every
    merge, which carry whatever the CPU op returned for such a row (0, inf, or a finite
    ``(0, 0)`` where every score is ``-inf``). A cell the plan never computes has no keys:
    it stays ``(0, -inf)`` whatever its query holds."""
    without_keys = None if _schedule(plan).covers(q) else _cells_without_keys(plan, q)
    kernels.mark_query_rows_(q, out, None if lse is None else _rows_major(lse), without_keys)


_CELLS_WITHOUT_KEYS: weakref.WeakKeyDictionary[RankPlan, dict] = weakref.WeakKeyDictionary()


def _cells_without_keys(plan: RankPlan, q: torch.Tensor) -> torch.Tensor:
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
    for blk in _blocks_in_order(plan):
        heads = range(*blk.heads.indices(h))
        for c in blk.calls:
            for o in range(blk.offsets):
                for r in blk.q_rows.sub(c.q_start, c.q_start + c.runs * c.q_len).ranges:
                    cells[r.start + o : r[-1] + o + 1 : r.step, heads.start + o : heads.stop + o : heads.step] = False
    return cells


# --- backward --------------------------------------------------------------------------


def _block_backward(blk: Block, q, k_src, v_src, dout, out, lse, accs: list, scale):
    """Adds this block's dQ, dK, dV into ``accs = [dq, dk, dv]``.

    ``dk``/``dv`` have the key source's shape, all three the accumulation dtype; ``lse``
    is ``[B, H, n]``. Each call's gradients go straight into strided views of the
    accumulators where rows and heads are progressions, else through ``index_add_``.
    ``accs = [None] * 3`` adopts the first call's gradients as the accumulators (the
    schedule's adopted call, when it covers every row and head of q, k and v).
    """
    q_rows, k_rows, kv_index = index(blk.q_rows, q), index(blk.k_rows, q), index(blk.kv_index, q)
    qb, dob, ob = (_packed(t, q_rows, blk.heads, blk.offsets) for t in (q, dout, out))
    lb = _packed(_rows_major(lse), q_rows, blk.heads, blk.offsets)
    kb, vb = (_source_packed(blk, t, k_rows, kv_index) for t in (k_src, v_src))
    # Gathered copies: dout, q, k, v and out; putting a result: three adds.
    pieces = (piece for call in blk.calls for piece in _pieces(blk, call, q, accs[0] is None, 5, 3))
    for c, g in pieces:
        dq, dk, dv = kernels.attention_backward(
            _runs(dob[:, g], c.q_start, c.runs, c.q_len),
            _runs(qb[:, g], c.q_start, c.runs, c.q_len),
            _runs(kb[:, g], c.k_start, c.runs, c.k_len),
            _runs(vb[:, g], c.k_start, c.runs, c.k_len),
            _runs(ob[:, g], c.q_start, c.runs, c.q_len),
            _runs(lb[:, g].unsqueeze(-1), c.q_start, c.runs, c.q_len).squeeze(-1),
            causal=c.causal,
            scale=scale,
        )
        _add_gradients(blk, c, g, q, (q_rows, k_rows, kv_index), accs, dq, dk, dv)
        del dq, dk, dv  # before the next call's: one block's gradients alive at a time


def _add_gradients(blk: Block, c: Call, g: slice, q, indices: tuple, accs: list, dq, dk, dv) -> None:
    """Add call ``c``'s gradients ``[B*O*runs, h, L, D]`` (head offsets ``g``) into ``accs``;
    ``indices``: the block's query rows, key rows and kv heads as slices or index tensors."""
    q_rows, k_rows, kv_index = indices
    if accs[0] is None:  # the adopted call: its gradients are the accumulators, if they can be
        adopted = [_adopted_rows(grad, q.shape[0]) for grad in (dq, dk, dv)]
        if None not in adopted:
            accs[:] = adopted
            return
        # Adopted calls cover q, k and v of the shard, which then have one shape.
        accs[:] = [torch.zeros(q.shape, dtype=dq.dtype, device=q.device) for _ in range(3)]
    dq_acc, dk_src, dv_src = accs
    kv_strided = isinstance(k_rows, slice) and isinstance(kv_index, slice)
    by_run = (-1, g.stop - g.start, c.runs)
    if isinstance(q_rows, slice):
        dq_b = _packed(dq_acc, q_rows, blk.heads, blk.offsets)[:, g]
        _run_view(dq_b, c.q_start, c.runs, c.q_len).add_(dq.unflatten(0, by_run))
    else:
        rows = q_rows[c.q_start : c.q_start + c.runs * c.q_len]
        _scatter_add(dq_acc, rows, blk.heads, _unpacked(dq.unflatten(0, by_run), dq_acc.dtype))
    for acc, grad in ((dk_src, dk), (dv_src, dv)):
        if kv_strided:
            acc_b = _source_packed(blk, acc, k_rows, kv_index)[:, g]
            _run_view(acc_b, c.k_start, c.runs, c.k_len).add_(grad.unflatten(0, by_run))
            continue
        rows = k_rows
        if isinstance(rows, slice):
            sub = range(rows.start, rows.stop, rows.step)[c.k_start : c.k_start + c.runs * c.k_len]
            rows = slice(sub.start, sub.stop, sub.step)
        else:
            rows = rows[c.k_start : c.k_start + c.runs * c.k_len]
        _scatter_add(acc, rows, kv_index, _unpacked(grad.unflatten(0, by_run), acc.dtype))


def _scatter_add(acc, rows: Index, heads: Index, grad) -> None:
    """``acc[:, rows, heads] += grad`` for packed ``grad [B, M, h, D]`` in ``acc``'s dtype.

    Rows never repeat; heads may (grouped-query heads sharing a kv head), and add up.
    """
    if isinstance(rows, slice):
        acc = acc[:, rows]
        if isinstance(heads, slice):
            acc[:, :, heads].add_(grad)
        else:
            acc.index_add_(2, heads, grad)
    elif isinstance(heads, slice):
        acc[:, :, heads].index_add_(1, rows, grad)
    else:
        b, m, _, d = grad.shape
        folded = torch.zeros(b, m, acc.shape[2], d, dtype=acc.dtype, device=acc.device)
        acc.index_add_(1, rows, folded.index_add_(2, heads, grad))


def _post_returns(ring: Ring, plans, shift: int, back: dict, ks, acc, hop: int):
    """Send the dK/dV of rows received at ``shift`` ``hop`` ranks on: back to their owners
    (``-shift``), or to the neighbour that holds their K/V next (relay)."""
    specs = {}
    for r in ring.ranks:
        step = plans[r].step(shift)
        if step.sends:  # direct: the gradients of the rows r sent; relay: of the rows r passed on
            specs[r] = _shapes(ks[r], _sizes(step.sends), acc)
    if not back and not specs:
        return None
    return shift, ring.exchange(hop, back, specs, ks[ring.ranks[0]].device)


def _add_returned(returning, plans, grads) -> None:
    if returning is None:
        return
    shift, pending = returning
    for r, tensors in pending.wait().items():
        _, dk, dv = grads[r]
        for m, dk_rows, dv_rows in zip(plans[r].step(shift).sends, tensors[0::2], tensors[1::2]):
            rows, heads = index(m.rows, dk), index(m.kv_heads, dk)
            if m.offsets > 1:  # [B, O, M, h, D]: into the strided view it was sent from
                _packed(dk, rows, heads, m.offsets).add_(dk_rows)
                _packed(dv, rows, heads, m.offsets).add_(dv_rows)
                continue
            _scatter_add(dk, rows, heads, dk_rows)
            _scatter_add(dv, rows, heads, dv_rows)


def _receives_gradients(plan: RankPlan) -> bool:
    """Whether dK/dV come back to this rank: it sends K/V (directly or passed on) at some shift."""
    return any(step.sends for step in plan.steps.values())


def _exact_in_half(plan: RankPlan) -> bool:
    """Whether the rank's gradients may accumulate in q's dtype: at most EXACT_HALF_ADDS
    gradients per cell, none coming back from other ranks."""
    return _schedule(plan).gradient_adds <= EXACT_HALF_ADDS and not _receives_gradients(plan)


def run_backward(plans: dict[int, RankPlan], ring: Ring, qs, ks, vs, outs, lses, douts, scale: float):
    """Gradients ``{rank: [dq, dk, dv]}``, in the accumulation dtype or (where that is exact,
    see :data:`EXACT_HALF_ADDS`, or the rank ran in row tiles) in q's dtype."""
    r = ring.ranks[0]
    q = qs[r]
    tiles = None if _exact_in_half(plans[r]) else _row_tiles(plans, ring, q, closed=True)
    if tiles is None:
        return _backward_whole(plans, ring, qs, ks, vs, outs, lses, douts, scale)
    grads = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, ks[r], vs[r])]
    for tile in tiles:  # one tile's float32 accumulators alive at a time
        rows = slice(tile.start, tile.stop)
        tile_grads = _backward_whole(
            {r: tile.plan}, ring, {r: q[:, rows]}, {r: ks[r][:, rows]}, {r: vs[r][:, rows]},
            {r: outs[r][:, rows]}, {r: lses[r][:, :, rows]}, {r: douts[r][:, rows]}, scale)[r]
        for grad, tile_grad in zip(grads, tile_grads):
            grad[:, rows].copy_(tile_grad)
        del tile_grads
    return {r: grads}


def _backward_whole(plans: dict[int, RankPlan], ring: Ring, qs, ks, vs, outs, lses, douts, scale: float):
    """:func:`run_backward` on whole shards."""
    acc = accumulation_dtype(qs[ring.ranks[0]].dtype)
    grads = {}
    for r in ring.ranks:
        schedule = _schedule(plans[r])
        # The adopted call's gradients (in q's dtype) are the accumulators where those are
        # in q's dtype too.
        dtype = qs[r].dtype if _exact_in_half(plans[r]) else acc
        adopt = schedule.adopted_kv and ks[r].shape == qs[r].shape and dtype == qs[r].dtype
        grads[r] = [None] * 3 if adopt else [
            torch.zeros(t.shape, dtype=dtype, device=t.device) for t in (qs[r], ks[r], vs[r])
        ]
    pending = _post_kv(ring, plans, 1, ks, vs)
    for r in ring.ranks:
        for blk in plans[r].local:
            _block_backward(blk, qs[r], ks[r], vs[r], douts[r], outs[r], lses[r], grads[r], scale)
    relay = plans[ring.ranks[0]].relay
    returning = None  # dK/dV of the last shift on their way: back to owners, or one hop on
    for shift in range(1, ring.size):
        received = _wait(pending)
        pending = _post_kv(ring, plans, shift + 1, ks, vs, received)
        passed_on = _wait(returning[1]) if relay and returning is not None else {}
        back = {}
        for r in ring.ranks:
            step: Step = plans[r].step(shift)
            if step.receives:
                msgs = received[r]
                dmsgs = passed_on.get(r) or [torch.zeros(t.shape, dtype=acc, device=t.device) for t in msgs]
                for blk in step.blocks:
                    j = 2 * blk.source
                    accs = [grads[r][0], dmsgs[j], dmsgs[j + 1]]
                    _block_backward(blk, qs[r], msgs[j], msgs[j + 1], douts[r], outs[r], lses[r], accs, scale)
                back[r] = dmsgs
        if relay:
            returning = _post_returns(ring, plans, shift, back, ks, acc, hop=1)
        else:
            _add_returned(returning, plans, grads)
            returning = _post_returns(ring, plans, shift, back, ks, acc, hop=-shift)
    _add_returned(returning, plans, grads)  # relay: after R-1 hops, each rank's own shard
    return grads


class PackedAttention(torch.autograd.Function):
    """Differentiable :func:`run_forward` for the ranks ``ring.ranks``.

    Inputs are the ranks' plans (in ``ring.ranks`` order), the ring, the scale, whether a
    backward may follow (``need_lse``), then their q shards, k shards and v shards; outputs
    are the ranks' output shards in the input dtype. Double backward is refused: the
    backward runs fused kernels that have no derivative.
    """

    @staticmethod
    def forward(ctx, plans: tuple[RankPlan, ...], ring: Ring, scale: float, need_lse: bool, *tensors):
        n = len(ring.ranks)
        by_rank = dict(zip(ring.ranks, plans))
        qs = dict(zip(ring.ranks, tensors[:n]))
        ks = dict(zip(ring.ranks, tensors[n : 2 * n]))
        vs = dict(zip(ring.ranks, tensors[2 * n :]))
        state = run_forward(by_rank, ring, qs, ks, vs, scale, need_lse)
        outs = tuple(state[r][0].to(qs[r].dtype) for r in ring.ranks)
        lses = tuple(state[r][1] for r in ring.ranks)
        ctx.plans, ctx.ring, ctx.scale = by_rank, ring, scale
        ctx.save_for_backward(*tensors, *outs, *lses)
        return outs

    @staticmethod
    def backward(ctx, *douts):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "ring_attention does not support double backward (create_graph=True): its "
                "backward runs fused attention kernels that have no derivative"
            )
        ring = ctx.ring
        n = len(ring.ranks)
        saved = ctx.saved_tensors
        qs, ks, vs, outs, lses = (dict(zip(ring.ranks, saved[i * n : (i + 1) * n])) for i in range(5))
        douts = {r: (d if d is not None else torch.zeros_like(outs[r])) for r, d in zip(ring.ranks, douts)}
        grads = run_backward(ctx.plans, ring, qs, ks, vs, outs, lses, douts, ctx.scale)
        results = []
        for i, inputs in enumerate((qs, ks, vs)):
            for r in ring.ranks:
                results.append(grads[r][i].to(inputs[r].dtype))
                grads[r][i] = None  # a float32 accumulator is freed once converted
        return (None, None, None, None, *results)


def run_on_ring(plans: tuple[RankPlan, ...], ring: Ring, scale: float, layout: _layout.Layout | str, q, k, v, *,
                checkpoint: bool):
    """Run the plans of ``ring.ranks``: one rank's shard, or every rank's in turn.

    With one rank in this process, ``q, k, v`` are its shard; with several (a simulated
    ring), they are the whole sequence in natural order, split into the ranks' shards
    here and joined back. ``checkpoint`` stores only the inputs and reruns the forward
    in backward.
    """

    def run(q, k, v):
        need_lse = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))  # for a backward
        if len(ring.ranks) == 1:
            return PackedAttention.apply(plans, ring, scale, need_lse, q, k, v)[0]
        shards = [_layout.split(t, ring.size, layout) for t in (q, k, v)]
        outs = PackedAttention.apply(plans, ring, scale, need_lse, *shards[0], *shards[1], *shards[2])
        return _layout.join(list(outs), layout)

    if checkpoint and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(run, q, k, v, use_reentrant=False)
    return run(q, k, v)
