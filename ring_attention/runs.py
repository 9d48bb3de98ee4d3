"""What one rank keeps of a pattern, and how its runs pair into kernel calls.

A rank keeps, for every unit (pair, head offset), the rows ``(p mod w') mod r == o`` of
the segments its shard meets (SEMANTICS.md), packed into a dense block and cut into
*runs*: stretches of one segment and one interval of the shard (and, under a window of
finite width, of at most a tile). Two runs of one segment meet in a block whose mask
:meth:`~ring_attention.masks.SequenceMask.block` classifies; blocks batch into as few
kernel calls as their shapes allow. :mod:`ring_attention.plans` builds ring plans from
these pieces. Plain integer arithmetic, cached per spec, rank and unit.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
from collections.abc import Iterable
from typing import NamedTuple

from . import layout as _layout
from . import pattern as _pattern
from .blocks import Call, Rows, Unit, merge_ranges
from .layout import Layout
from .masks import Band, BlockMask, KernelMask, SequenceMask
from .options import NARROW_BAND_TILES


class Run(NamedTuple):
    segment: int
    first: int  # global position of the run's first row (orders runs of different ranks)
    start: int  # packed index of its first row
    length: int


class Kept(NamedTuple):
    """The rows one rank keeps for one unit: local row indices and runs, packed order."""

    rows: Rows
    runs: tuple[Run, ...]
    last_first: dict[int, int]  # segment -> first position of its last run here


@dataclasses.dataclass(frozen=True, eq=False)
class Spec:
    """What fixes a plan, besides the rank (one object per shape: hashed by identity)."""

    seq_len: int
    ring_size: int
    layout: Layout
    mask: SequenceMask
    group: int  # query heads per kv head
    bounds: tuple[tuple[int, ...], ...]  # per pair: its segments' starts, then N (DilatedPattern.segment_bounds)
    rates: tuple[int, ...]
    units: tuple[Unit, ...]
    band_tiles: int = NARROW_BAND_TILES  # a window's tiles: 1/band_tiles of its band (window_tile)


@functools.lru_cache(maxsize=4096)
def kept(spec: Spec, rank: int, unit: int) -> Kept:
    """The rows ``rank`` keeps for ``unit``, and their runs, in packed order."""
    pair = spec.units[unit].pair
    bounds, rate = spec.bounds[pair], spec.rates[pair]
    offset = spec.units[unit].heads.start % rate
    tile = window_tile(spec.mask, rate, spec.band_tiles)
    ranges: list[range] = []
    runs: list[Run] = []
    last_first: dict[int, int] = {}
    base = packed = 0
    for a, b in _layout.shard_intervals(spec.seq_len, spec.ring_size, rank, spec.layout, spec.mask.documents):
        for s in range(bisect.bisect_right(bounds, a) - 1, bisect.bisect_right(bounds, b - 1)):
            positions = _pattern.kept_positions(bounds[s], bounds[s + 1], rate, offset, a, b)
            if not positions:
                continue
            first, count = positions.start, len(positions)
            local = first - a + base
            ranges.append(range(local, local + count * rate, rate))
            for piece in range(0, count, tile or count):  # a window's runs in tiles
                length = min(tile or count, count - piece)
                runs.append(Run(s, first + piece * rate, packed + piece, length))
                last_first[s] = first + piece * rate
            packed += count
        base += b - a
    return Kept(Rows(merge_ranges(ranges)), tuple(runs), last_first)


# The fewest rows a window's tile holds: smaller tiles would cost more launches than the
# scores they skip.
MIN_WINDOW_TILE = 64


def window_tile(mask: SequenceMask, rate: int, share: int = NARROW_BAND_TILES) -> int | None:
    """Rows per run under a window whose band is finite (both sides bounded, or causal with
    a left side): ``1/share`` of the band's width in kept rows, rounded down to a power of
    two, at least :data:`MIN_WINDOW_TILE` (``share``: :attr:`~ring_attention.options.Options.
    band_tiles`). A block of two whole shards cut by a narrow band
    computes mostly scores outside it, and sends keys no query reaches; in tiles, the pairs
    outside the band are neither computed nor sent, and the rest is within a few percent of
    the band's (a tile's edge block computes about half a tile more per row). A power of two
    meets the band's edges at the same offsets in every tile, so each kind of edge block
    batches into one call however many tiles there are. ``None``: runs stay whole."""
    left, right = mask.reach
    if left < 0 or right < 0:
        return None
    rows = -(-(left + right + 1) // (share * rate))
    return max(MIN_WINDOW_TILE, 1 << (rows.bit_length() - 1))


def batch_calls(pairs: Iterable[tuple[Run, Run, KernelMask]], q_rows: Rows) -> tuple[Call, ...]:
    """Group ``(q_run, k_run, block mask)`` pairs into as few kernel calls as possible.

    Full pairs coalesce first: a query run's key runs that follow each other in packed
    order become one longer key span, then query runs that follow each other against
    the same key span one longer query span (a non-square block is fine without a mask).
    Then spans batch: consecutive spans of equal lengths and mask that follow each other
    in both packed orders join one call as its runs. Diagonal (causal) blocks stay square,
    and blocks cut by a window keep their shape (their band is on the block's own indices).
    """
    # Masked blocks grouped by mask (in order within each): a window's tiles alternate a
    # band's edge block and a diagonal one per query tile, and only neighbours batch.
    diagonal = sorted(((q.start, q.length, k.start, k.length, m) for q, k, m in pairs if m is not BlockMask.FULL),
                      key=lambda block: _mask_order(block[4]))
    by_query: dict[tuple[int, int], list[list[int]]] = {}
    for q, k, m in pairs:
        if m is not BlockMask.FULL:
            continue
        spans = by_query.setdefault((q.start, q.length), [])
        if spans and spans[-1][0] + spans[-1][1] == k.start:
            spans[-1][1] += k.length
        else:
            spans.append([k.start, k.length])
    full: list[list[int]] = []  # [q start, q length, k start, k length] of full spans
    for (qs, ql), spans in by_query.items():
        for ks, kl in spans:
            prev = full[-1] if full else None
            if prev and prev[2:4] == [ks, kl] and prev[0] + prev[1] == qs:
                prev[1] += ql
            else:
                full.append([qs, ql, ks, kl])
    calls: list[list[int]] = []  # [q start, k start, runs, q length, k length]
    masks: list[KernelMask] = []  # the mask of each of calls
    fulls: list[tuple[int, int, int, int, KernelMask]] = [(f[0], f[1], f[2], f[3], BlockMask.FULL) for f in full]
    for qs, ql, ks, kl, mask in diagonal + fulls:
        if calls:
            c = calls[-1]
            if (
                masks[-1] == mask and c[3] == ql and c[4] == kl
                and qs == c[0] + c[2] * c[3] and ks == c[1] + c[2] * c[4]
            ):
                c[2] += 1
                continue
        calls.append([qs, ks, 1, ql, kl])
        masks.append(mask)
    return tuple(
        Call(qs, ks, n, ql, kl, mask, q_rows.sub(qs, qs + n * ql))
        for (qs, ks, n, ql, kl), mask in zip(calls, masks)
    )


def _mask_order(mask: KernelMask) -> tuple[int, int, int]:
    return (1, mask.lo, mask.hi) if isinstance(mask, Band) else (0, 0, 0)


def classify(mask: SequenceMask, q: Run, k: Run, rate: int, diagonal: bool) -> KernelMask | None:
    """:meth:`SequenceMask.block` of query run ``q`` against key run ``k`` (rows ``rate`` apart)."""
    return mask.block(q.first, q.first + rate * (q.length - 1), k.first, k.first + rate * (k.length - 1), rate,
                      diagonal=diagonal)


def block_pairs(q_runs: Iterable[Run], k_runs: Iterable[Run], mask: SequenceMask, same_rank: bool,
                 rate: int) -> list[tuple[Run, Run, KernelMask]]:
    """``(query run, key run, block mask)`` of every pair of runs of one segment that the
    mask lets meet (runs of a pair of rate ``rate``); on one rank a run meets itself in a
    diagonal block, and runs of different intervals never overlap."""
    by_segment: dict[int, list[Run]] = {}
    for k in k_runs:
        by_segment.setdefault(k.segment, []).append(k)
    pairs: list[tuple[Run, Run, KernelMask]] = []
    for q in q_runs:
        for k in by_segment.get(q.segment, ()):
            block = classify(mask, q, k, rate, same_rank and k.start == q.start)
            if block is not None:
                pairs.append((q, k, block))
    return pairs


def joined_keys(pairs: list[tuple[Run, Run, KernelMask]], mask: SequenceMask,
                rate: int) -> list[tuple[Run, Run, KernelMask]]:
    """``pairs`` (:func:`block_pairs`) with a query run's key runs that follow each other, in
    packed order and in positions, joined into one block, its mask classified anew.

    For a kernel that skips a band's masked pairs itself (flash's window; tiles as wide as the
    band, :attr:`~ring_attention.options.Options.band_tiles`): a window's query tile then
    meets its band in one call (the tile before and its own diagonal block, one band) instead
    of two whose results merge, so its rows are written once and need no float32
    accumulators. A kernel that computes masked blocks whole would compute the joined block's
    masked half too: there blocks stay apart."""
    out: list[tuple[Run, Run, KernelMask]] = []
    for q, k, m in pairs:
        prev = out[-1] if out else None
        if prev is not None and prev[0] == q and prev[1].segment == k.segment \
                and prev[1].start + prev[1].length == k.start and prev[1].first + rate * prev[1].length == k.first:
            joined = prev[1]._replace(length=prev[1].length + k.length)
            block = classify(mask, q, joined, rate, diagonal=False)
            assert block is not None  # it holds the pairs of both
            out[-1] = (q, joined, block)
        else:
            out.append((q, k, m))
    return out


def reached(k: Run, queries: Iterable[Run], mask: SequenceMask, rate: int) -> Run:
    """Key run ``k`` cut to the keys the band of ``mask.window`` lets some of ``queries`` reach
    (runs of ``k``'s segment, rows ``rate`` apart): a message carries no key outside every
    query's band, so a window's first tile travels as far as the band reaches, not whole."""
    left, right = mask.reach
    last = k.first + rate * (k.length - 1)
    qs = list(queries)
    lo = min(q.first for q in qs) - left if left >= 0 else k.first
    hi = max(q.first + rate * (q.length - 1) for q in qs) + right if right >= 0 else last
    skip = max(0, -(-(lo - k.first) // rate))  # first kept key at or after lo
    stop = min(k.length, (hi - k.first) // rate + 1)
    return Run(k.segment, k.first + rate * skip, k.start + skip, max(stop - skip, 0))


def joined_runs(runs: tuple[Run, ...]) -> tuple[Run, ...]:
    """A rank's runs with those of one segment that follow each other in packed order joined.

    In the zigzag layout a segment can cover both chunks of a rank: its two runs are then
    adjacent in packed order, and packed order is position order, so one causal block over
    both is exact where two diagonal blocks and a full one would take three calls.
    """
    out: list[Run] = []
    for run in runs:
        prev = out[-1] if out else None
        if prev is not None and prev.segment == run.segment and prev.start + prev.length == run.start:
            out[-1] = prev._replace(length=prev.length + run.length)
        else:
            out.append(run)
    return tuple(out)
