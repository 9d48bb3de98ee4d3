"""The forward executor: a rank's plan of fused-kernel calls, run and merged.

Dilated attention never looks at an ``N x N`` matrix. For each (pair, head offset) it
*packs* the rows a head keeps into a dense block, runs the fused kernel on the packed
block, and merges the result into the rows' running ``(out, lse)``. A
:class:`~ring_attention.blocks.RankPlan` lists those blocks for one rank of a ring; this
module runs the plans of the ranks a process holds on any
:class:`~ring_attention.comm.Ring`: each rank's own blocks first, while the first
exchange is in flight (:mod:`ring_attention.exchange`), then each shift's blocks with
what arrived. What is written and what merged is the schedule's
(:mod:`ring_attention.schedule`).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Optional, cast

import torch

from . import kernels, nonfinite, schedule, views
from .blocks import Block, Call, Index
from .comm import Ring
from .exchange import post_kv, wait
from .executable import ExecutablePlan, RankExecution
from .masks import Band, BlockMask, band_bounds
from .merge import accumulation_dtype, merge_into_
from .views import Recipe

# A shard's running [out [B, n, H, D], lse [B, H, n]]: out is None until the adopted call's
# results become it, lse None where nothing reads it.
Accumulators = list[Optional[torch.Tensor]]


class _SplitValues:
    """Value sources split once for the causal blocks that read them (:func:`nonfinite.split_values`).

    One per group of blocks that share sources (a rank's local blocks, or one step's), so
    a received message's split dies with the step, as the message does. Where the rank's
    plan does not split (:attr:`~ring_attention.executable.RankExecution.splits_values`),
    a source not seen to be finite gives ``None``: each causal call quarantines its own.
    """

    def __init__(self, splits: bool = True) -> None:
        self._splits = splits
        self._by_source: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor | None] | None]] = {}

    def __call__(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        hit = self._by_source.get(id(v))
        if hit is None:  # v is kept in the entry: its id stays its own
            if self._splits:
                hit = self._by_source[id(v)] = (v, nonfinite.split_values(v))
            else:
                hit = self._by_source[id(v)] = (v, (v, None) if nonfinite.known_finite(v) else None)
        return hit[1]


class _ChunkValues:
    """The values of a causal call whose forward runs in row chunks (``schedule.causal_chunks``)
    and quarantines its own keys: zeroed once for the call, each chunk reading their prefix,
    and each chunk's poison scanned in its own rows of that copy after its kernel
    (:func:`nonfinite.add_chunk_poison_`). The call's quarantine costs one copy of its keys and
    O(L) work, as a whole call's does. Chunks come in order for one group of head offsets
    after another; one group's copy is alive at a time."""

    def __init__(self, call: Call, vb: torch.Tensor) -> None:
        self._call, self._vb = call, vb
        self._group: tuple[int, torch.Tensor, torch.Tensor] | None = None
        self._carry: torch.Tensor | None = None

    def keys(self, c: Call, g: slice) -> torch.Tensor:
        """Chunk ``c``'s (head offsets ``g``) zeroed values: the call's, up to its last row."""
        if self._group is None or self._group[0] != g.start:
            self._group = self._carry = None  # the previous group's copy goes first
            v = views.runs(self._vb[:, g], self._call.k_start, 1, self._call.k_len)
            self._group = (g.start, v, nonfinite.zeroed(v))
        return self._group[2][..., : c.k_len, :]

    def add_poison_(self, out: torch.Tensor, c: Call) -> None:
        """Add chunk ``c``'s poison to its kernel's ``out``, after the kernel (of the group
        :meth:`keys` last took)."""
        _, v, clean = cast(tuple[int, torch.Tensor, torch.Tensor], self._group)
        if clean is v:  # seen to be finite
            return
        a, b = c.q_start - self._call.q_start, c.k_len  # the chunk's rows, within the call's keys
        self._carry = nonfinite.add_chunk_poison_(out, v[..., a:b, :], clean[..., a:b, :], self._carry,
                                                  restore=b < self._call.k_len)


def _block_forward(blk: Block, rank: RankExecution, q: torch.Tensor, k_src: torch.Tensor, v_src: torch.Tensor,
                   acc: Accumulators, scale: float, poison: torch.Tensor | None = None,
                   split: _SplitValues | None = None) -> None:
    """Run the block's calls; each result is written into or merged with the accumulators
    ``acc = [out [B, n, H, D], lse [B, H, n] or None]`` in place, through strided views
    (or, for the schedule's adopted call, becomes them). ``lse`` is ``None`` where nothing
    reads it (no merge, no backward).

    Non-finite query rows (:func:`nonfinite.marks_query_rows`) are marked as results are
    written: ``poison [B, n, H]`` (:func:`nonfinite.query_row_poison`) is added with weight 0
    in the copy (the same launch), and a merge into a marked cell keeps the NaN. ``None``:
    the caller marks the rows once at the end (:func:`_mark_query_rows`).

    Causal calls read the values from ``split(v_src)``: zeroed where not finite, their
    poison added to the call's output (one scan); the other calls read ``v_src`` itself, as
    do causal ones where the split is per call (the kernel quarantines them).
    """
    q_rows = rank.index(blk.q_rows, q)
    k_rows, kv_index = rank.index(blk.k_rows, q), rank.index(blk.kv_index, q)
    qb = views.packed(q, q_rows, blk.heads, blk.offsets)
    kb, vb = (views.source_packed(blk, t, k_rows, kv_index) for t in (k_src, v_src))
    clean_vb = bad_vb = None
    per_call = False  # each causal call quarantines its own values
    if any(c.mask is BlockMask.CAUSAL for c in blk.calls):
        values = (split or _SplitValues(rank.splits_values))(v_src)
        per_call = values is None
        if values is not None:
            clean, bad = values
            clean_vb = views.source_packed(blk, clean, k_rows, kv_index) if clean is not v_src else vb
            bad_vb = None if bad is None else views.source_packed(blk, bad, k_rows, kv_index)
    for call in blk.calls:
        write = rank.schedule.writes[call]
        mark = poison if write else None
        launches = rank.forward_launches[acc[1] is not None][call]
        chunks = _ChunkValues(call, vb) if per_call and schedule.in_chunks(call, launches) else None
        for c, g in launches:
            causal = c.mask is BlockMask.CAUSAL
            split_here = causal and not per_call
            v_from = cast(torch.Tensor, clean_vb) if split_here else vb  # split above
            o, lse = kernels.attention_forward(
                _kernel_input(rank.recipes, c, g, qb, "q"),
                _kernel_input(rank.recipes, c, g, kb, "k"),
                _kernel_input(rank.recipes, c, g, v_from, "v") if chunks is None else chunks.keys(c, g),
                causal=causal,
                scale=scale,
                mark_query_rows=False,  # marked once, at the end
                quarantined=split_here or chunks is not None,
                band=band_bounds(c.mask),
            )
            if causal and bad_vb is not None:  # the scan runs on the runs' view: no gather copy
                bad_runs = views.run_view(bad_vb[:, g], c.k_start, c.runs, c.k_len)
                o.add_(nonfinite.value_poison(bad_runs).flatten(0, 2))
            if chunks is not None:
                chunks.add_poison_(o, c)
            _put_result(rank.recipes, blk, c, g, q, q_rows, write, mark, acc, o, lse)
            del o, lse  # before the next offset's results: one block result alive at a time


def _kernel_input(recipes: dict[Hashable, Recipe], c: Call, g: slice, x: torch.Tensor, name: str) -> torch.Tensor:
    """Call ``c``'s (head offsets ``g``) query (``name`` "q") or key or value runs of the packed
    ``x [B, O, M, h, D]``, as the kernel takes them: ``[B*O*runs, h, L, D]``."""
    start, length = (c.q_start, c.q_len) if name == "q" else (c.k_start, c.k_len)
    return views.view(recipes, (c, g.start, g.stop, name), x, lambda t: views.runs(t[:, g], start, c.runs, length))


def _put_result(recipes: dict[Hashable, Recipe], blk: Block, c: Call, g: slice, q: torch.Tensor, q_rows: Index,
                write: bool, mark: torch.Tensor | None, acc: Accumulators, o: torch.Tensor, lse: torch.Tensor) -> None:
    """Write or merge the results ``o [B*O*runs, h, L, D]``, ``lse [B*O*runs, h, L]`` of
    call ``c`` (head offsets ``g``) into ``acc``; a written result marked by ``mark`` (see
    :func:`_block_forward`)."""
    if acc[0] is None:  # the adopted call: its results are the accumulators, if they can be
        out_rows, lse_rows = views.adopted_rows(o, q.shape[0]), views.adopted_rows(lse.unsqueeze(-1), q.shape[0])
        if out_rows is not None and lse_rows is not None:
            acc[0], acc[1] = out_rows, lse_rows.squeeze(-1).transpose(1, 2)
            return
        acc[:] = _accumulators(q, o.dtype, lse.dtype, covered=True)  # then written below
    out_acc, lse_acc = cast(torch.Tensor, acc[0]), acc[1]  # out is there once adoption is settled
    by_run = (-1, g.stop - g.start, c.runs)
    o, lse = torch.unflatten(o, 0, by_run), torch.unflatten(lse, 0, by_run)
    if not isinstance(q_rows, slice):
        rows = q_rows[c.q_start : c.q_start + c.runs * c.q_len]
        _scatter_result(rows, blk.heads, write, acc, o, lse, mark, isinstance(c.mask, Band))
        return

    def cells(x: torch.Tensor) -> torch.Tensor:
        return views.cells(x, q_rows, blk, g, c)

    o_acc = views.view(recipes, (c, g.start, g.stop, "out"), out_acc, cells)
    l_acc = None if lse_acc is None else views.view(recipes, (c, g.start, g.stop, "lse"), views.rows_major(lse_acc), cells)
    if not write:  # a merge: the LSE accumulator exists
        # a kernel's rows all have keys, except a band's (out 0, LSE -inf at its ends)
        merge_into_(o_acc, cast(torch.Tensor, l_acc), o, lse, empty_rows=isinstance(c.mask, Band))
    elif mark is None:
        o_acc.copy_(o)
        if l_acc is not None:
            l_acc.copy_(lse)
    else:  # the copy marks the rows: out = o + 0 * poison
        p = views.view(recipes, (c, g.start, g.stop, "mark"), mark, cells)
        torch.add(o, p.unsqueeze(-1), alpha=0, out=o_acc)
        if l_acc is not None:
            torch.add(lse, p, alpha=0, out=l_acc)


def _accumulators(
    q: torch.Tensor, out_dtype: torch.dtype, lse_dtype: torch.dtype, covered: bool, need_lse: bool = True
) -> Accumulators:
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


def _scatter_result(rows: torch.Tensor, heads: slice, write: bool, acc: Accumulators, o: torch.Tensor,
                    lse: torch.Tensor, poison: torch.Tensor | None, empty_rows: bool) -> None:
    """Write or merge a result ``[B, 1, runs, h, L, ...]`` at ``rows`` that are no progression
    (a dilated unit across zigzag chunks): gather, merge, scatter; marked by ``poison``
    (``[B, n, H]`` or ``None``) first; ``empty_rows``: the result may hold rows without keys."""
    out_acc, lse_acc = cast(torch.Tensor, acc[0]), acc[1]  # out is there once adoption is settled
    o = views.unpacked(o, out_acc.dtype)  # [B, M, h, D]
    lse_b = None if lse_acc is None else views.unpacked(lse.unsqueeze(-1), lse_acc.dtype).squeeze(-1)
    if poison is not None:
        p = poison[:, :, heads].index_select(1, rows)
        o.add_(p.unsqueeze(-1), alpha=0)
        if lse_b is not None:
            lse_b.add_(p, alpha=0)
    o_heads = out_acc[:, :, heads]
    l_heads = None if lse_acc is None else views.rows_major(lse_acc)[:, :, heads]
    if not write:  # a merge: the LSE accumulator exists
        l_heads = cast(torch.Tensor, l_heads)
        o_acc, l_acc = o_heads.index_select(1, rows), l_heads.index_select(1, rows)
        merge_into_(o_acc, l_acc, o, cast(torch.Tensor, lse_b), empty_rows=empty_rows)
        o, lse_b = o_acc, l_acc
    o_heads.index_copy_(1, rows, o)
    if l_heads is not None:
        l_heads.index_copy_(1, rows, cast(torch.Tensor, lse_b))


def run_forward(plan: ExecutablePlan, ring: Ring, qs: Mapping[int, torch.Tensor], ks: Mapping[int, torch.Tensor],
                vs: Mapping[int, torch.Tensor], scale: float, need_lse: bool = True,
                received: list[dict[int, list[torch.Tensor]]] | None = None) -> dict[int, Accumulators]:
    """Run the plan of ``ring.ranks``; returns ``{rank: [out [B,n,H,D], lse [B,H,n]]}``.

    ``out`` is in the accumulation dtype where some call merges on the whole shard, else
    in q's dtype, laid out rows-major like the kernels' results; ``lse`` is in the
    accumulation dtype. ``need_lse=False`` (no backward will run): ``lse`` may be ``None``
    where no call merges. ``received``: a list that gets the K/V each shift brought (a plan
    that :attr:`~ring_attention.executable.ExecutablePlan.keeps_received` hands it to the
    backward instead of receiving it again).
    """
    r = ring.ranks[0]
    tiles = plan.ranks[r].forward_tiles
    if tiles is None:
        return _forward_whole(plan.ranks, ring, qs, ks, vs, scale, need_lse, received)
    q = qs[r]
    b, n, h, d = q.shape
    out = torch.empty(b, n, h, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, h, n, dtype=accumulation_dtype(q.dtype), device=q.device) if need_lse else None
    # Every tile reads the whole shard's values: one split (or one look at them) for all.
    splits = {r: _SplitValues(any(tile.splits_values for *_, tile in tiles))}
    for start, stop, tile in tiles:  # one tile's float32 accumulators alive at a time
        rows = slice(start, stop)
        tile_out, tile_lse = _forward_whole({r: tile}, ring, {r: q[:, rows]}, ks, vs, scale, need_lse,
                                            local_splits=splits)[r]
        out[:, rows].copy_(cast(torch.Tensor, tile_out))
        if lse is not None:  # need_lse: every tile has its LSE
            lse[:, :, rows].copy_(cast(torch.Tensor, tile_lse))
        del tile_out, tile_lse
    return {r: [out, lse]}


def _forward_whole(ranks: Mapping[int, RankExecution], ring: Ring, qs: Mapping[int, torch.Tensor],
                   ks: Mapping[int, torch.Tensor], vs: Mapping[int, torch.Tensor], scale: float,
                   need_lse: bool, kept: list[dict[int, list[torch.Tensor]]] | None = None,
                   local_splits: Mapping[int, _SplitValues] | None = None) -> dict[int, Accumulators]:
    """:func:`run_forward` on whole shards; ``local_splits``: the local blocks' value splits,
    by rank (row tiles share one: their sources are the whole shard's)."""
    acc = accumulation_dtype(qs[ring.ranks[0]].dtype)
    state: dict[int, Accumulators] = {}
    poisons: dict[int, torch.Tensor] = {}
    marked_at_end: list[int] = []
    for r in ring.ranks:
        schedule = ranks[r].schedule
        out_dtype = acc if schedule.merges else qs[r].dtype
        covered = schedule.covers(ranks[r].shard)
        adopted = ranks[r].adopts_forward
        if nonfinite.marks_query_rows(qs[r]):
            # Marked in the copies of written results, for free; but a merge may reach a cell
            # before any write where the writes do not cover the shard: then once, at the end.
            if adopted or (schedule.merges and not covered):
                marked_at_end.append(r)
            else:
                poisons[r] = nonfinite.query_row_poison(qs[r], acc)
        if adopted:
            state[r] = [None, None]  # the adopted call's results will be the accumulators
        else:
            state[r] = _accumulators(qs[r], out_dtype, acc, covered, need_lse or schedule.merges)
    plans = {r: ranks[r].plan for r in ring.ranks}
    index = ranks[ring.ranks[0]].index  # the plan's: its ranks share one cache
    pending = post_kv(ring, plans, 1, ks, vs, index)
    for r in ring.ranks:  # own rows first, while the first exchange is in flight
        split = local_splits[r] if local_splits is not None else _SplitValues(ranks[r].splits_values)
        for blk in plans[r].local:
            _block_forward(blk, ranks[r], qs[r], ks[r], vs[r], state[r], scale, poisons.get(r), split)
    for shift in range(1, ring.size):
        received = wait(pending)
        pending = post_kv(ring, plans, shift + 1, ks, vs, index, received)
        if kept is not None:
            kept.append(received)
        for r in ring.ranks:
            split = _SplitValues(ranks[r].splits_values)
            for blk in plans[r].step(shift).blocks:
                j = 2 * cast(int, blk.source)  # a step's blocks read the messages received
                k_msg, v_msg = received[r][j], received[r][j + 1]
                _block_forward(blk, ranks[r], qs[r], k_msg, v_msg, state[r], scale, poisons.get(r), split)
    for r in marked_at_end:
        _mark_query_rows(ranks[r], qs[r], cast(torch.Tensor, state[r][0]), state[r][1])  # out is there now
    return state


def _mark_query_rows(rank: RankExecution, q: torch.Tensor, out: torch.Tensor, lse: torch.Tensor | None) -> None:
    """Make ``out [B, n, H, D]`` and ``lse [B, H, n]`` NaN where the query row ``q[:, i, h]``
    holds NaN or inf and the plan computes cell ``(i, h)``: once per shard, after every
    merge, which carry whatever the CPU op returned for such a row (0, inf, or a finite
    ``(0, 0)`` where every score is ``-inf``). A cell the plan never computes has no keys:
    it stays ``(0, -inf)`` whatever its query holds."""
    without_keys = None if rank.schedule.covers(rank.shard) else rank.cells_without_keys(q)
    nonfinite.mark_query_rows_(q, out, None if lse is None else views.rows_major(lse), without_keys)
