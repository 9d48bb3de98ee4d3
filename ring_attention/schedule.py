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
it into copies saves launches and copies little (``Options.max_gather_bytes``). The output
accumulates in float32 only where some call merges, and the LSE is written only where a
merge or a backward reads it.

Memory above the accumulators stays small: the first call's results (and gradients)
*are* the accumulators where that call covers the shard, no other launch computes more
than ``1/Options.max_call_share`` of the shard's cells (a call's runs are split), and one
launch's results are alive at a time. The accumulators themselves are float32 only where
half precision would not be exact (:data:`EXACT_HALF_ADDS`), and a one-rank half-precision
shard that needs them runs in row tiles (:mod:`ring_attention.tiles`), one tile's float32
accumulators alive at a time.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from typing import cast

import torch

from .blocks import Block, Call, RankPlan, Rows
from .masks import BlockMask
from .options import Options

# Two half-precision gradients summed in half precision round once, as their float32 sum
# does when converted: up to this many gradients per cell, half-precision accumulators are
# exact (and a third of the float32 ones' bytes).
EXACT_HALF_ADDS = 2


@dataclasses.dataclass(frozen=True)
class Shard:
    """The shape of a rank's query shard ``[batch, rows, heads, head_dim]`` and its element size."""

    batch: int
    rows: int
    heads: int
    head_dim: int
    itemsize: int

    @property
    def cells(self) -> int:
        """(row, head) cells."""
        return self.rows * self.heads


def blocks_in_order(plan: RankPlan) -> Iterator[Block]:
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

    writes: dict[Call, bool]
    merges: bool
    cells_before_merge: int
    adopted: Call | None
    adopted_kv: bool
    gradient_adds: int

    def covers(self, shard: Shard) -> bool:
        """Whether every cell of the shard is written before any merge."""
        return self.cells_before_merge == shard.cells


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


def analyse(plan: RankPlan) -> Schedule:
    """The plan's :class:`Schedule` (what an executable plan holds; built once per plan)."""
    touched_rows: dict[int, list[tuple[int, int]]] = {}  # unit -> packed query intervals
    touched_heads: dict[int, set[int]] = {}  # pair -> query heads
    writes: dict[Call, bool] = {}
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
    for c, call_heads in calls:
        if not writes[c]:
            break
        cells += c.runs * c.q_len * call_heads
    return Schedule(writes, not all(writes.values()), cells, *_adoptable(plan), gradient_adds(plan))


def gradient_adds(plan: RankPlan) -> int:
    """The most gradients any (row, head) cell of dQ, dK or dV receives, bounded above by
    taking each call's rows as the interval they span (per head offset and head)."""
    spans: dict[tuple[str | int | None, int], list[tuple[int, int]]] = {}  # ("q" or source, head)
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


def _span(rows: Rows) -> tuple[int, int]:
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


def splits_values(plan: RankPlan, source_rows: int) -> bool:
    """Whether the causal calls of a rank quarantine their values (:mod:`~ring_attention.
    nonfinite`) from one split of each source, or each call from its own keys.

    A split holds two copies of a source of ``source_rows`` rows while its blocks run (its
    zeroed values and their non-finite rest), and each causal call scans its rows of the
    latter into a third: two launches for the source, two per call. A call's own quarantine
    holds one copy of its keys (zeroed, then scanned in place after its kernel): four
    launches. So a split pays where several causal calls read much of one source (a dilated
    pattern's batched segments: two launches saved per call after the first) and nowhere
    else: one causal call (a whole-shard causal block, a ring's diagonal block) quarantines
    its own, as do calls small next to their source (a sliding window's diagonal tiles,
    packed documents), for which a split would hold twice the source for little. On a GPU
    that is most of the memory above the output."""
    causal = [c.runs * c.k_len for blk in blocks_in_order(plan) for c in blk.calls if c.mask is BlockMask.CAUSAL]
    return len(causal) > 1 and 4 * max(causal) >= source_rows


def exact_in_half(plan: RankPlan, schedule: Schedule) -> bool:
    """Whether the rank's gradients may accumulate in q's dtype: at most EXACT_HALF_ADDS
    gradients per cell, none coming back from other ranks."""
    return schedule.gradient_adds <= EXACT_HALF_ADDS and not receives_gradients(plan)


def launches(blk: Block, c: Call, shard: Shard, options: Options, adopted: bool, copies: int,
             per_result: int, chunk_rows: int | None = None) -> tuple[tuple[Call, slice], ...]:
    """The launches of call ``c``: ``(call, head offsets)`` pairs, the call's runs split so
    that each launch computes at most ``1/options.max_call_share`` of the shard's cells (an
    ``adopted`` call, whose results become the accumulators, and a call whose output
    takes less than ``options.min_split_bytes``, whole). ``copies`` and ``per_result``: see
    :func:`_offset_groups`. ``chunk_rows`` (the forward's, :attr:`Options.causal_chunks`): a
    causal call of one longer run, not adopted, runs in row chunks (:func:`causal_chunks`).
    """
    groups = _offset_groups(blk, c, shard, options, copies, per_result)
    if not adopted and chunked(c, chunk_rows):  # by head offsets, then chunks: in order, one group's keys at a time
        return tuple((piece, g) for g in groups for piece in causal_chunks(c, cast(int, chunk_rows)))
    per_run = (groups[0].stop - groups[0].start) * c.q_len * len(range(*blk.heads.indices(shard.heads)))
    runs = max(1, shard.rows * shard.heads // options.max_call_share // per_run)
    small = shard.batch * c.runs * per_run * shard.head_dim * shard.itemsize < options.min_split_bytes
    if adopted or small or runs >= c.runs:
        return tuple((c, g) for g in groups)
    calls = [
        dataclasses.replace(c, q_start=c.q_start + i * c.q_len, k_start=c.k_start + i * c.k_len,
                            runs=min(runs, c.runs - i), q_rows=c.q_rows.sub(i * c.q_len, (i + runs) * c.q_len))
        for i in range(0, c.runs, runs)
    ]
    return tuple((piece, g) for piece in calls for g in groups)


def chunk_rows(shard: Shard, options: Options) -> int | None:
    """The most rows of a causal call's forward chunk (:attr:`Options.causal_chunks`), or ``None``:
    calls run whole. ``1/causal_chunks`` of the shard's rows, but no fewer than put
    ``options.min_split_bytes`` in a chunk's output: smaller ones cost more launches than
    the memory they save.

    Only where a rank's causal calls quarantine their own keys (:func:`splits_values` false:
    documents, a window's diagonal tiles) is this worth it: there a long call holds its
    output and its zeroed keys beside the shard's output, and chunks hold a chunk's output
    instead of the block's. A rank that splits its sources holds two copies of them anyway:
    there chunks would save little and cost launches."""
    if options.causal_chunks <= 1:
        return None
    row_bytes = shard.batch * shard.heads * shard.head_dim * shard.itemsize
    return max(-(-shard.rows // options.causal_chunks), -(-options.min_split_bytes // row_bytes), 1)


def chunked(c: Call, chunk_rows: int | None) -> bool:
    """Whether the forward runs call ``c`` in row chunks of ``chunk_rows`` (:func:`causal_chunks`;
    ``None``: none is): a causal call of one run longer than that. A call of several runs is
    split by runs instead (:func:`launches`)."""
    return chunk_rows is not None and c.mask is BlockMask.CAUSAL and c.runs == 1 and c.q_len > chunk_rows


def in_chunks(c: Call, pieces: tuple[tuple[Call, slice], ...]) -> bool:
    """Whether ``pieces``, the launches of call ``c`` (:func:`launches`), are its row chunks
    (:func:`causal_chunks`): a causal call of one run, whose pieces hold fewer rows."""
    return c.mask is BlockMask.CAUSAL and c.runs == 1 and pieces[0][0].q_len < c.q_len


# The most row chunks a causal call's forward runs in: each costs a kernel and the launches
# that quarantine and place its rows, so a call as long as the shard (a ring's diagonal block)
# holds a quarter of it beside the output rather than a sixteenth, for a quarter of the launches.
MAX_CALL_CHUNKS = 4


def causal_chunks(c: Call, chunk_rows: int) -> tuple[Call, ...]:
    """A square causal call of one run cut into row chunks of equal length (within one), at most
    ``chunk_rows`` each but no more than :data:`MAX_CALL_CHUNKS`: chunk ``[a, b)`` of the rows
    against keys ``[0, b)``, whose causal mask aligned bottom-right
    (:data:`~ring_attention.masks.BlockMask.CAUSAL`) keeps what the block's does in those rows."""
    count = min(-(-c.q_len // chunk_rows), MAX_CALL_CHUNKS)
    cuts = [c.q_len * i // count for i in range(count + 1)]
    return tuple(
        dataclasses.replace(c, q_start=c.q_start + a, q_len=b - a, k_len=b, q_rows=c.q_rows.sub(a, b))
        for a, b in zip(cuts, cuts[1:])
    )


def _offset_groups(blk: Block, c: Call, shard: Shard, options: Options, copies: int, per_result: int) -> list[slice]:
    """The block's head offsets as the call batches them: all at once, or one by one.

    All ``O`` offsets in one launch are a strided view only with one run and one batch
    element; otherwise the kernel gets gathered copies of its inputs (``copies``
    launches). They are made where they save launches (each offset on its own is a
    kernel and ``per_result`` launches to put its result) and copy at most
    ``options.max_gather_bytes`` (short sequences, where launches cost more than the kernels).
    """
    if blk.offsets == 1 or (shard.batch == 1 and c.runs == 1):
        return [slice(0, blk.offsets)]
    heads = len(range(*blk.heads.indices(shard.heads)))
    rows = c.runs * (c.q_len + 2 * c.k_len)
    gathered = shard.batch * blk.offsets * rows * heads * shard.head_dim * shard.itemsize
    if gathered <= options.max_gather_bytes and copies < (blk.offsets - 1) * (1 + per_result):
        return [slice(0, blk.offsets)]
    return [slice(o, o + 1) for o in range(blk.offsets)]


def capturing_cuda_graph() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def build_cells_without_keys(plan: RankPlan, n: int, h: int, device: torch.device) -> torch.Tensor:
    """``[n, H]`` bool on ``device``: the (row, head) cells of the shard that no call of
    ``plan`` computes (rows without keys there), a fill per run of rows."""
    cells = torch.ones(n, h, dtype=torch.bool, device=device)
    for blk in blocks_in_order(plan):
        heads = range(*blk.heads.indices(h))
        for c in blk.calls:
            for o in range(blk.offsets):
                for r in blk.q_rows.sub(c.q_start, c.q_start + c.runs * c.q_len).ranges:
                    cells[r.start + o : r[-1] + o + 1 : r.step, heads.start + o : heads.stop + o : heads.step] = False
    return cells
