"""Building the packed-block plans of dilated attention, for one device or a ring.

For every pair ``(w, r)`` and head offset ``o`` (SEMANTICS.md), the heads with that
offset keep the same rows: ``(p mod w') mod r == o``. A rank packs its kept rows into a
dense block; attention then only pairs runs of the same segment:

- runs on the same rank are computed locally, with no communication: the same run is a
  diagonal block (block-causal under a causal mask), runs of different intervals are
  full blocks, or skipped where the mask hides every key (causal, keys after the queries);
- runs on another rank arrive at the ring step whose shift joins the two ranks: the
  sender sends only its kept rows, of the segments the receiver also holds, that the
  mask lets one of the receiver's runs see. Runs held by different ranks never overlap,
  so such a block is either full or skipped, unless a window cuts it to a band.

What the mask makes of a pair of runs is :meth:`ring_attention.masks.SequenceMask.block`'s
to say: the planner never tests ``causal`` itself, except to join a rank's adjacent runs
(one causal block over both is exact and one call). A pair's head offsets
  travel as one message, and run as one block, where their rows are shifted copies of
  each other (as local blocks batch them).

Everything here is integer arithmetic on positions, without tensors, done once per
shape and rank and cached (:func:`rank_plan`). A rank's plan looks only at the ranks it
shares a segment with, so a process builds what it runs and nothing more.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
from collections.abc import Iterable, Iterator, Sequence
from typing import cast

from . import layout as _layout
from . import runs as _runs
from .blocks import Block, Call, Message, RankPlan, Rows, Step, Unit, merge_ranges
from .layout import Layout
from .masks import KernelMask, SequenceMask
from .options import NARROW_BAND_TILES, WIDE_BAND_TILES
from .pattern import DilatedPattern
from .runs import Run, Spec, batch_calls, block_pairs, classify, joined_keys, joined_runs, reached


def _kv_heads(spec: Spec, unit: int) -> list[int]:
    return [h // spec.group for h in spec.units[unit].heads]


@functools.lru_cache(maxsize=4096)
def _kv_rows(spec: Spec, unit: int) -> tuple[Rows, Rows, Rows]:
    """Per unit: kv head of each query head; kv heads a message carries; their positions in it."""
    per_head = _kv_heads(spec, unit)
    sent = sorted(set(per_head))
    return Rows.of(per_head), Rows.of(sent), Rows.of(sent.index(h) for h in per_head)


# A message and the runs of its rows, as packed in it.
_Sent = tuple[Message, tuple[Run, ...]]


@functools.lru_cache(maxsize=4096)
def _message(spec: Spec, unit: int, src: int, dst: int) -> _Sent | None:
    """What ``src`` sends ``dst`` for ``unit``: ``(Message, runs as packed in it)`` or None."""
    have, need = _runs.kept(spec, src, unit), _runs.kept(spec, dst, unit)
    if spec.mask.window is None:  # a key run some query run sees is seen by the segment's last run
        sent = [
            k for k in have.runs
            if k.segment in need.last_first
            and spec.mask.block(need.last_first[k.segment], -1, k.first, -1, 1, diagonal=False) is not None
        ]
    else:  # a band: the key runs some query run of the receiver sees, cut to the keys it reaches
        rate = _rate(spec, unit)
        by_segment: dict[int, list[Run]] = {}
        for q in need.runs:
            by_segment.setdefault(q.segment, []).append(q)
        sent = []
        for k in have.runs:
            seen_by = [q for q in by_segment.get(k.segment, ()) if classify(spec.mask, q, k, rate, False) is not None]
            if seen_by:
                sent.append(reached(k, seen_by, spec.mask, rate))
    if not sent:
        return None
    moved: list[Run] = []
    ranges: list[range] = []
    start = 0
    for k in sent:
        moved.append(k._replace(start=start))
        ranges.extend(have.rows.sub(k.start, k.start + k.length).ranges)
        start += k.length
    return Message(Rows(merge_ranges(ranges)), _kv_rows(spec, unit)[1]), tuple(moved)


def _rate(spec: Spec, unit: int) -> int:
    return spec.rates[spec.units[unit].pair]


def _head_slice(unit: Unit) -> slice:
    return slice(unit.heads.start, unit.heads.stop, unit.heads.step)


def _local_blocks(spec: Spec, rank: int) -> tuple[Block, ...]:
    blocks = []
    u = 0
    while u < len(spec.units):
        unit, kept = spec.units[u], _runs.kept(spec, rank, u)
        # Joined runs are no progression: only the window-free classification takes them.
        runs = joined_runs(kept.runs) if spec.mask.causal and spec.mask.window is None else kept.runs
        pairs = block_pairs(runs, runs, spec.mask, same_rank=True, rate=_rate(spec, u))
        if spec.mask.window is not None and spec.band_tiles == WIDE_BAND_TILES:
            pairs = joined_keys(pairs, spec.mask, _rate(spec, u))
        offsets = _shifted_units(spec, rank, u)
        if pairs:
            kv_index = _kv_rows(spec, u)[0]
            calls = batch_calls(pairs, kept.rows)
            blocks.append(Block(u, kept.rows, _head_slice(unit), kept.rows, kv_index, None, calls, offsets))
        u += offsets
    return tuple(blocks)


def _shifted_units(spec: Spec, rank: int, u: int) -> int:
    """How many units from ``u`` on are ``u`` shifted by 0, 1, 2, ... rows and heads.

    Such units (the head offsets of one pair, when the rate divides the heads and the
    segments) run as one batch of kernel calls over a strided view. Only without
    grouped-query heads, where a head's kv head shifts with it.
    """
    unit, kept = spec.units[u], _runs.kept(spec, rank, u)
    if spec.group != 1 or kept.rows.as_slice() is None:
        return 1
    count = 1
    while u + count < len(spec.units):
        other = spec.units[u + count]
        shifted = range(unit.heads.start + count, unit.heads.stop + count, unit.heads.step)
        if other.pair != unit.pair or other.heads != shifted:
            break
        theirs = _runs.kept(spec, rank, u + count)
        rows = tuple(range(r.start + count, r.stop + count, r.step) for r in kept.rows.ranges)
        # The runs must be shifted copies in global positions too: block masks are classified
        # from them. Shard rows shifted by ``count`` are positions shifted by ``count`` unless
        # they cross into another interval of the shard (the documents layout's small chunks).
        if theirs.rows.ranges != rows or [(k.segment, k.first - count, k.start, k.length) for k in theirs.runs] != [
            (k.segment, k.first, k.start, k.length) for k in kept.runs
        ]:
            break
        count += 1
    return count


def _step(spec: Spec, rank: int, shift: int, partners: set[int]) -> Step | None:
    r = spec.ring_size
    dst, src = (rank + shift) % r, (rank - shift) % r
    sends, receives, blocks = [], [], []
    # _message_groups lists only units with a message: _message gives no None for them.
    for u, count in _message_groups(spec, rank, dst) if dst in partners else ():
        sends.append(dataclasses.replace(cast(_Sent, _message(spec, u, rank, dst))[0], offsets=count))
    for u, count in _message_groups(spec, src, rank) if src in partners else ():
        message, moved = cast(_Sent, _message(spec, u, src, rank))
        receives.append((len(message.rows), len(message.kv_heads), count))
        kept = _runs.kept(spec, rank, u)
        calls = _receiver_calls(spec, rank, u, moved)
        if calls:
            kv_index = _kv_rows(spec, u)[2]
            k_rows = Rows.of(range(len(message.rows)))
            blocks.append(Block(u, kept.rows, _head_slice(spec.units[u]), k_rows, kv_index, len(receives) - 1,
                                calls, offsets=count))
    if not sends and not receives:
        return None
    return Step(shift, tuple(sends), tuple(receives), tuple(blocks))


def _receiver_calls(spec: Spec, rank: int, u: int, moved: Sequence[Run]) -> tuple[Call, ...]:
    kept = _runs.kept(spec, rank, u)
    pairs = block_pairs(kept.runs, moved, spec.mask, same_rank=False, rate=_rate(spec, u))
    return batch_calls(pairs, kept.rows) if pairs else ()


@functools.lru_cache(maxsize=4096)
def _message_groups(spec: Spec, src: int, dst: int) -> tuple[tuple[int, int], ...]:
    """``(unit, offsets)`` of each message ``src`` sends ``dst``, in order.

    A pair's head offsets travel as one message where they are shifted copies of each
    other on both ranks (:func:`_shifted_units`) and so are the rows sent and the calls
    the receiver makes with them: one send, one kernel call and one merge for all of them,
    as local blocks batch them. Sender and receiver both derive this from the spec alone,
    so they agree on every message's shape.
    """
    groups, u = [], 0
    while u < len(spec.units):
        got = _message(spec, u, src, dst)
        if got is None:
            u += 1
            continue
        count = 1
        limit = min(_shifted_units(spec, src, u), _shifted_units(spec, dst, u))
        message, moved = got
        calls = _call_shapes(_receiver_calls(spec, dst, u, moved))
        if message.rows.as_slice() is not None and message.kv_heads.as_slice() is not None:
            while count < limit:
                other = _message(spec, u + count, src, dst)
                if other is None or not (
                    other[0].rows.ranges == _shifted(message.rows, count)
                    and other[0].kv_heads.ranges == _shifted(message.kv_heads, count)
                    and _call_shapes(_receiver_calls(spec, dst, u + count, other[1])) == calls
                ):
                    break
                count += 1
        groups.append((u, count))
        u += count
    return tuple(groups)


def _shifted(rows: Rows, by: int) -> tuple[range, ...]:
    return tuple(range(r.start + by, r.stop + by, r.step) for r in rows.ranges)


def _call_shapes(calls: tuple[Call, ...]) -> list[tuple[int, int, int, int, int, KernelMask]]:
    return [(c.q_start, c.k_start, c.runs, c.q_len, c.k_len, c.mask) for c in calls]


def _partners(spec: Spec, rank: int) -> set[int]:
    """The other ranks holding a segment this rank holds, for any unit."""
    out: set[int] = set()
    for u in range(len(spec.units)):
        bounds = spec.bounds[spec.units[u].pair]
        for s in _runs.kept(spec, rank, u).last_first:
            out |= _layout.holders(spec.seq_len, spec.ring_size, spec.layout, bounds[s], bounds[s + 1],
                                   spec.mask.documents)
    out.discard(rank)
    return out


@functools.lru_cache(maxsize=256)
def _spec(
    pattern: DilatedPattern | None, seq_len: int, num_heads: int, num_kv_heads: int, mask: SequenceMask,
    ring_size: int, layout: Layout, band_tiles: int,
) -> Spec:
    if pattern is None:
        pattern = DilatedPattern((seq_len,), (1,))
    bounds = pattern.segment_bounds(seq_len, mask.documents)
    units = []
    for pair, (rate, heads) in enumerate(zip(pattern.dilation_rates, pattern.heads_of_pair(num_heads))):
        for offset in range(rate):
            first = heads.start + (offset - heads.start) % rate  # first head h with h % r == offset
            if first < heads.stop:
                units.append(Unit(pair, range(first, heads.stop, rate)))
    return Spec(
        seq_len, ring_size, layout, mask, num_heads // num_kv_heads, bounds,
        pattern.dilation_rates, tuple(units), band_tiles,
    )


def rank_plan(
    pattern: DilatedPattern | None,
    seq_len: int,
    num_heads: int,
    num_kv_heads: int,
    mask: SequenceMask | bool,
    ring_size: int,
    layout: Layout | str,
    rank: int,
    band_tiles: int = NARROW_BAND_TILES,
) -> RankPlan:
    """The plan of rank ``rank`` of dilated attention (full attention if ``pattern is None``)
    under ``mask`` (a bool: causal or not); a window's runs in tiles of ``1/band_tiles`` of
    its band (:attr:`~ring_attention.options.Options.band_tiles`).

    ``ring_size=1`` is single-device dilated attention: local blocks only. Shifts with no
    traffic for this rank have no step; every rank still walks the shifts in the same
    order (see :mod:`ring_attention.exchange`). Cached on the arguments normalized, so
    that every spelling of one shape (a layout's name, a bool mask, the default tiles
    given or not) finds the same plan.
    """
    return _rank_plan(pattern, seq_len, num_heads, num_kv_heads, SequenceMask.of(mask), ring_size,
                      _layout.check_layout(layout), rank, band_tiles)


@functools.lru_cache(maxsize=1024)
def _rank_plan(
    pattern: DilatedPattern | None, seq_len: int, num_heads: int, num_kv_heads: int, mask: SequenceMask,
    ring_size: int, layout: Layout, rank: int, band_tiles: int,
) -> RankPlan:
    spec = _spec(pattern, seq_len, num_heads, num_kv_heads, mask, ring_size, layout, band_tiles)
    # A window or documents: direct sends, so that a rank receives only the shards it attends.
    if (pattern is None and ring_size > 1 and mask.window is None and mask.documents is None
            and (not mask.causal or layout is Layout.ZIGZAG)):
        with _gc_paused():
            return _relay_plan(spec, rank)
    with _gc_paused():
        steps = {}
        partners = _partners(spec, rank)
        for partner in sorted(partners):
            for shift in {(partner - rank) % ring_size, (rank - partner) % ring_size}:
                if shift not in steps:
                    step = _step(spec, rank, shift, partners)
                    if step is not None:
                        steps[shift] = step
        local = _local_blocks(spec, rank)
    return RankPlan(rank, ring_size, spec.units, local, dict(sorted(steps.items())))


def _relay_plan(spec: Spec, rank: int) -> RankPlan:
    """Full attention where every rank needs every shard: a neighbour ring.

    Each rank passes its whole K/V shard around the ring, one hop per shift (as
    ring-flash-attn and PyTorch's context parallel do): between nodes, a shard crosses
    each node boundary once per shift instead of once per pair of ranks. Causal
    attention in the contiguous layout keeps direct sends: there rank ``r`` needs only
    the ``r`` shards before its own, and relaying would move the others too.
    """
    kept = _runs.kept(spec, rank, 0)  # full attention: one unit, every row
    per_head, sent_heads, positions = _kv_rows(spec, 0)
    message = Message(kept.rows, sent_heads)
    steps = {}
    for shift in range(1, spec.ring_size):
        theirs = _runs.kept(spec, (rank - shift) % spec.ring_size, 0)
        pairs = block_pairs(kept.runs, theirs.runs, spec.mask, same_rank=False, rate=1)
        blocks: tuple[Block, ...] = ()
        if pairs:
            k_rows = Rows.of(range(len(theirs.rows)))
            calls = batch_calls(pairs, kept.rows)
            blocks = (Block(0, kept.rows, _head_slice(spec.units[0]), k_rows, positions, 0, calls),)
        steps[shift] = Step(shift, (message,), ((len(theirs.rows), len(sent_heads), 1),), blocks)
    return RankPlan(rank, spec.ring_size, spec.units, _local_blocks(spec, rank), steps, relay=True)


def clear() -> None:
    """Empty the planner's caches (:func:`ring_attention.executable.clear` calls this)."""
    for cached in (_runs.kept, _kv_rows, _message, _message_groups, _spec, _rank_plan):
        cached.cache_clear()


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """A build allocates many small acyclic objects; a collection would rescan every cached plan."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def ring_plans(
    pattern: DilatedPattern | None, seq_len: int, num_heads: int, num_kv_heads: int, mask: SequenceMask | bool,
    ring_size: int, layout: Layout | str, ranks: Iterable[int], band_tiles: int = NARROW_BAND_TILES,
) -> tuple[RankPlan, ...]:
    """The plans of the ranks this process runs, in the order of ``ranks``."""
    return tuple(rank_plan(pattern, seq_len, num_heads, num_kv_heads, mask, ring_size, layout, r, band_tiles)
                 for r in ranks)
