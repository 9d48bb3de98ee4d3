"""Row tiles of a one-rank plan: the same calls, cut at row boundaries into smaller plans.

Where a half-precision shard merges several results per row, its accumulators are float32:
twice the bytes of the output it returns, and in backward three float32 gradients. Run on
``T`` tiles of rows, one tile at a time, only one tile's accumulators are float32 (1/T of
them), and each tile's result is copied into the half-precision output as it completes.
The arithmetic per cell is unchanged: a tile plan computes every cell with the same kernel
calls on the same keys, in the same order, as the whole plan.

A tile is a plan like any other (:class:`~ring_attention.blocks.RankPlan`), over the rows
``[start, stop)`` of the shard, with row indices rebased to the tile:

- a *query* tile (``closed=False``) cuts query runs anywhere, except inside a causal run
  (a square diagonal block; cut, it would no longer be one) or a window's band (whose
  offsets are the block's own) and where a block's head
  offsets would keep different numbers of rows. Key rows stay those of the whole shard:
  its plan runs on ``q[:, start:stop]`` against all of ``k`` and ``v``. This suits the
  forward, whose result per query row needs only that row's keys.
- a *closed* tile (``closed=True``) cuts only where no run of queries or keys straddles
  the cut, so the tile's queries see only the tile's keys: its plan runs on
  ``q, k, v [:, start:stop]`` and its dK/dV are complete for the tile's rows. This suits
  the backward, and exists where segments are short next to the shard (LongNet's fixed
  segments), not where one segment spans it.

Only plans whose blocks are local and whose rows are arithmetic progressions are tiled
(every one-rank plan of a pattern whose segments are multiples of their rates); any other
plan, or a shard that no cut divides, gives ``None``: run it whole.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import cast

from .blocks import Block, Call, RankPlan, Rows
from .masks import BlockMask


@dataclasses.dataclass(frozen=True)
class Tile:
    """Rows ``[start, stop)`` of the shard and the plan that computes them."""

    start: int
    stop: int
    plan: RankPlan


@dataclasses.dataclass(frozen=True)
class _Progression:
    """A block's packed rows ``first + step * p`` for ``p < length``, at ``offsets`` head
    offsets (offset ``o`` adds ``o`` to every row)."""

    first: int
    step: int
    length: int
    offsets: int

    @staticmethod
    def of(rows: Rows, offsets: int) -> _Progression | None:
        s = rows.as_slice()
        if s is None:
            return None
        return _Progression(s.start, s.step, len(rows), offsets)

    def below(self, cut: int) -> int | None:
        """How many packed rows lie below ``cut`` (the same at every head offset), or ``None``
        where the offsets disagree."""
        x = cut - self.first
        lo, hi = (min(max(-(-(x - o) // self.step), 0), self.length) for o in (0, self.offsets - 1))
        return lo if lo == hi else None

    def end_of(self, packed: int) -> int:
        """The first row after packed row ``packed`` at every head offset."""
        return self.first + self.step * packed + self.offsets


# A tileable block with its query rows and (closed tiles) key rows as progressions.
_TileBlock = tuple[Block, "_Progression", "_Progression | None"]


def _tileable(plan: RankPlan, closed: bool) -> list[_TileBlock] | None:
    """``[(block, query progression, key progression or None)]``, or ``None`` if untileable."""
    if plan.ring_size != 1 or plan.steps:
        return None
    out: list[_TileBlock] = []
    for blk in plan.local:
        q = _Progression.of(blk.q_rows, blk.offsets)
        k = _Progression.of(blk.k_rows, blk.offsets) if closed else None
        if blk.source is not None or q is None or (closed and k is None):
            return None
        out.append((blk, q, k))
    return out


def _next_cut(blocks: Sequence[_TileBlock], cut: int, closed: bool) -> int:
    """The first cut at or after ``cut`` that every block allows."""
    while True:
        moved = cut
        for blk, q, k in blocks:
            for c in blk.calls:
                moved = max(moved, _allowed(q, c.q_start, c.runs, c.q_len, moved, c.mask is not BlockMask.FULL or closed))
                if k is not None:
                    moved = max(moved, _allowed(k, c.k_start, c.runs, c.k_len, moved, True))
        if moved == cut:
            return cut
        cut = moved


def _allowed(rows: _Progression, start: int, runs: int, length: int, cut: int, whole_runs: bool) -> int:
    """The first cut at or after ``cut`` allowed by ``runs`` runs of ``length`` packed rows
    from ``start``: one the head offsets agree on, and with ``whole_runs``, between runs."""
    below = rows.below(cut)
    if below is None:  # between the rows of different offsets: move to the next row of offset 0
        x = cut - rows.first
        return rows.first + -(-x // rows.step) * rows.step
    inside = below - start
    if whole_runs and 0 < inside < runs * length and inside % length:
        return rows.end_of(start + (inside // length + 1) * length - 1)
    return cut


def row_tiles(plan: RankPlan, seq_len: int, count: int, *, closed: bool) -> tuple[Tile, ...] | None:
    """About ``count`` tiles of nearly equal rows covering ``[0, seq_len)``, in order; ``None``
    where the plan cannot be tiled or fewer than two tiles result."""
    blocks = _tileable(plan, closed)
    if blocks is None or count < 2:
        return None
    cuts = [0]
    for j in range(1, count):
        cut = _next_cut(blocks, max(j * seq_len // count, cuts[-1] + 1), closed)
        if cut >= seq_len:
            break
        cuts.append(cut)
    if len(cuts) < 2:
        return None
    tiles = []
    for a, b in zip(cuts, cuts[1:] + [seq_len]):
        tile_plan = _tile_plan(plan, blocks, a, b, closed)
        if tile_plan is None:
            return None
        tiles.append(Tile(a, b, tile_plan))
    return tuple(tiles)


def _rebased(rows: Rows, start: int, stop: int, by: int) -> Rows:
    return Rows(tuple(range(r.start - by, r.stop - by, r.step) for r in rows.sub(start, stop).ranges))


def _tile_plan(plan: RankPlan, blocks: Sequence[_TileBlock], a: int, b: int, closed: bool) -> RankPlan | None:
    local = []
    for blk, q, k in blocks:
        # _next_cut chose a and b where every block's head offsets agree: below() is an int there.
        qa, qb = cast(int, q.below(a)), cast(int, q.below(b))
        if closed:
            kp = cast(_Progression, k)  # a closed tile's blocks have key progressions (_tileable)
            ka, kb = cast(int, kp.below(a)), cast(int, kp.below(b))
        else:
            ka, kb = 0, len(blk.k_rows)
        q_rows = _rebased(blk.q_rows, qa, qb, a)
        calls = tuple(
            piece
            for c in blk.calls
            for piece in _cut_call(c, qa, qb, ka, q_rows)
        )
        if closed and any(c.k_start < 0 or c.k_start + c.runs * c.k_len > kb - ka for c in calls):
            return None  # a query run of the tile pairs with keys of another tile
        if calls:
            k_rows = _rebased(blk.k_rows, ka, kb, a) if closed else blk.k_rows
            local.append(dataclasses.replace(blk, q_rows=q_rows, k_rows=k_rows, calls=calls))
    return RankPlan(plan.rank, 1, plan.units, tuple(local), {})


def _cut_call(c: Call, qa: int, qb: int, ka: int, q_rows: Rows) -> list[Call]:
    """Call ``c``'s runs restricted to the packed query rows ``[qa, qb)``, positions rebased
    to the tile (queries by ``qa``, keys by ``ka``): whole runs stay one call, a run cut
    at either end becomes a call of its own."""
    lo, hi = max(qa, c.q_start), min(qb, c.q_start + c.runs * c.q_len)
    pieces = []
    while lo < hi:
        run, within = divmod(lo - c.q_start, c.q_len)
        if within or hi - lo < c.q_len:  # a cut run: its rows up to the run's end or the tile's
            length, runs = min(c.q_len - within, hi - lo), 1
        else:
            runs = (hi - lo) // c.q_len
            length = c.q_len
        q_start, k_start = lo - qa, c.k_start + run * c.k_len - ka
        pieces.append(dataclasses.replace(
            c, q_start=q_start, k_start=k_start, runs=runs, q_len=length,
            q_rows=q_rows.sub(q_start, q_start + runs * length),
        ))
        lo += runs * length
    return pieces
