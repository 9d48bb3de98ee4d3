"""The backward executor: a rank's plan run again for dQ, dK and dV.

It follows PyTorch's context-parallel recipe: each block's kernel backward is called
with the rows' *final* output and LSE, which makes its gradient that block's exact share
of the gradient of the merged result; dQ accumulates locally in float32, dK/dV of
received rows travel back to their owner (:mod:`ring_attention.exchange`), also in
float32. Gradients accumulate in q's dtype only where that is exact
(:func:`~ring_attention.schedule.exact_in_half`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Optional, cast

import torch

from . import kernels, views
from .blocks import Block, Call, Index, Step
from .comm import Ring
from .exchange import Returning, add_returned, post_kv, post_returns, wait
from .executable import ExecutablePlan, RankExecution
from .masks import BlockMask, band_bounds
from .merge import accumulation_dtype

# [dq, dk, dv] of a block's query shard and key source: None until the adopted call's gradients
# become them (and, in the autograd function, once each is converted).
Gradients = list[Optional[torch.Tensor]]


def _block_backward(blk: Block, rank: RankExecution, q: torch.Tensor, k_src: torch.Tensor, v_src: torch.Tensor,
                    dout: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, accs: Gradients, scale: float) -> None:
    """Adds this block's dQ, dK, dV into ``accs = [dq, dk, dv]``.

    ``dk``/``dv`` have the key source's shape, all three the accumulation dtype; ``lse``
    is ``[B, H, n]``. Each call's gradients go straight into strided views of the
    accumulators where rows and heads are progressions, else through ``index_add_``.
    ``accs = [None] * 3`` adopts the first call's gradients as the accumulators (the
    schedule's adopted call, when it covers every row and head of q, k and v).
    """
    q_rows, k_rows, kv_index = rank.index(blk.q_rows, q), rank.index(blk.k_rows, q), rank.index(blk.kv_index, q)
    qb, dob, ob = (views.packed(t, q_rows, blk.heads, blk.offsets) for t in (q, dout, out))
    lb = views.packed(views.rows_major(lse), q_rows, blk.heads, blk.offsets)
    kb, vb = (views.source_packed(blk, t, k_rows, kv_index) for t in (k_src, v_src))
    for c, g in (launch for call in blk.calls for launch in rank.backward_launches[call]):
        dq, dk, dv = kernels.attention_backward(
            views.runs(dob[:, g], c.q_start, c.runs, c.q_len),
            views.runs(qb[:, g], c.q_start, c.runs, c.q_len),
            views.runs(kb[:, g], c.k_start, c.runs, c.k_len),
            views.runs(vb[:, g], c.k_start, c.runs, c.k_len),
            views.runs(ob[:, g], c.q_start, c.runs, c.q_len),
            views.runs(lb[:, g].unsqueeze(-1), c.q_start, c.runs, c.q_len).squeeze(-1),
            causal=c.mask is BlockMask.CAUSAL,
            scale=scale,
            band=band_bounds(c.mask),
        )
        _add_gradients(blk, c, g, q, (q_rows, k_rows, kv_index), accs, dq, dk, dv)
        del dq, dk, dv  # before the next call's: one block's gradients alive at a time


def _add_gradients(blk: Block, c: Call, g: slice, q: torch.Tensor, indices: tuple[Index, Index, Index], accs: Gradients,
                   dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor) -> None:
    """Add call ``c``'s gradients ``[B*O*runs, h, L, D]`` (head offsets ``g``) into ``accs``;
    ``indices``: the block's query rows, key rows and kv heads as slices or index tensors."""
    q_rows, k_rows, kv_index = indices
    if accs[0] is None:  # the adopted call: its gradients are the accumulators, if they can be
        adopted = [views.adopted_rows(grad, q.shape[0]) for grad in (dq, dk, dv)]
        if all(a is not None for a in adopted):
            accs[:] = adopted
            return
        # Adopted calls cover q, k and v of the shard, which then have one shape.
        accs[:] = [torch.zeros(q.shape, dtype=dq.dtype, device=q.device) for _ in range(3)]
    dq_acc, dk_src, dv_src = cast(list[torch.Tensor], accs)  # there once adoption is settled
    kv_strided = isinstance(k_rows, slice) and isinstance(kv_index, slice)
    by_run = (-1, g.stop - g.start, c.runs)
    if isinstance(q_rows, slice):
        dq_b = views.packed(dq_acc, q_rows, blk.heads, blk.offsets)[:, g]
        views.run_view(dq_b, c.q_start, c.runs, c.q_len).add_(torch.unflatten(dq, 0, by_run))
    else:
        rows: Index = q_rows[c.q_start : c.q_start + c.runs * c.q_len]
        views.scatter_add(dq_acc, rows, blk.heads, views.unpacked(torch.unflatten(dq, 0, by_run), dq_acc.dtype))
    for acc, grad in ((dk_src, dk), (dv_src, dv)):
        if kv_strided:
            acc_b = views.source_packed(blk, acc, k_rows, kv_index)[:, g]
            views.run_view(acc_b, c.k_start, c.runs, c.k_len).add_(torch.unflatten(grad, 0, by_run))
            continue
        rows = k_rows
        if isinstance(rows, slice):
            sub = range(rows.start, rows.stop, rows.step)[c.k_start : c.k_start + c.runs * c.k_len]
            rows = slice(sub.start, sub.stop, sub.step)
        else:
            rows = rows[c.k_start : c.k_start + c.runs * c.k_len]
        views.scatter_add(acc, rows, kv_index, views.unpacked(torch.unflatten(grad, 0, by_run), acc.dtype))


def run_backward(plan: ExecutablePlan, ring: Ring, qs: Mapping[int, torch.Tensor], ks: Mapping[int, torch.Tensor], vs: Mapping[int, torch.Tensor],
                 outs: Mapping[int, torch.Tensor], lses: Mapping[int, torch.Tensor], douts: Mapping[int, torch.Tensor], scale: float,
                 received: Sequence[Mapping[int, list[torch.Tensor]]] | None = None) -> dict[int, Gradients]:
    """Gradients ``{rank: [dq, dk, dv]}``, in the accumulation dtype or (where that is exact,
    see :data:`~ring_attention.schedule.EXACT_HALF_ADDS`, or the rank ran in row tiles) in q's dtype.

    ``received``: the K/V of each shift as the forward received it
    (:func:`~ring_attention.forward.run_forward`); ``None``: received again."""
    r = ring.ranks[0]
    q = qs[r]
    tiles = plan.ranks[r].backward_tiles
    if tiles is None:
        return _backward_whole(plan.ranks, ring, qs, ks, vs, outs, lses, douts, scale, received)
    grads: Gradients = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, ks[r], vs[r])]
    for start, stop, tile in tiles:  # one tile's float32 accumulators alive at a time
        rows = slice(start, stop)
        tile_grads = _backward_whole(
            {r: tile}, ring, {r: q[:, rows]}, {r: ks[r][:, rows]}, {r: vs[r][:, rows]},
            {r: outs[r][:, rows]}, {r: lses[r][:, :, rows]}, {r: douts[r][:, rows]}, scale)[r]
        for grad, tile_grad in zip(cast(list[torch.Tensor], grads), cast(list[torch.Tensor], tile_grads)):
            grad[:, rows].copy_(tile_grad)
        del tile_grads
    return {r: grads}


def _backward_whole(ranks: Mapping[int, RankExecution], ring: Ring, qs: Mapping[int, torch.Tensor], ks: Mapping[int, torch.Tensor], vs: Mapping[int, torch.Tensor],
                    outs: Mapping[int, torch.Tensor], lses: Mapping[int, torch.Tensor], douts: Mapping[int, torch.Tensor], scale: float,
                    kept: Sequence[Mapping[int, list[torch.Tensor]]] | None = None) -> dict[int, Gradients]:
    """:func:`run_backward` on whole shards."""
    acc = accumulation_dtype(qs[ring.ranks[0]].dtype)
    plans = {r: ranks[r].plan for r in ring.ranks}
    grads: dict[int, Gradients] = {}
    for r in ring.ranks:
        dtype = qs[r].dtype if ranks[r].gradients_in_half else acc
        grads[r] = [None] * 3 if ranks[r].adopts_backward else [
            torch.zeros(t.shape, dtype=dtype, device=t.device) for t in (qs[r], ks[r], vs[r])
        ]
    index = ranks[ring.ranks[0]].index  # the plan's: its ranks share one cache
    pending = None if kept is not None else post_kv(ring, plans, 1, ks, vs, index)
    for r in ring.ranks:
        for blk in plans[r].local:
            _block_backward(blk, ranks[r], qs[r], ks[r], vs[r], douts[r], outs[r], lses[r], grads[r], scale)
    relay = plans[ring.ranks[0]].relay
    returning: Returning | None = None  # dK/dV of the last shift on their way: back to owners, or one hop on
    for shift in range(1, ring.size):
        if kept is not None:
            received = kept[shift - 1]
        else:
            received = wait(pending)
            pending = post_kv(ring, plans, shift + 1, ks, vs, index, received)
        passed_on = wait(returning[1]) if relay and returning is not None else {}
        back: dict[int, list[torch.Tensor]] = {}
        for r in ring.ranks:
            step: Step = plans[r].step(shift)
            if step.receives:
                msgs = received[r]
                dmsgs = passed_on.get(r) or [torch.zeros(t.shape, dtype=acc, device=t.device) for t in msgs]
                for blk in step.blocks:
                    j = 2 * cast(int, blk.source)  # a step's blocks read the messages received
                    accs = [grads[r][0], dmsgs[j], dmsgs[j + 1]]
                    _block_backward(blk, ranks[r], qs[r], msgs[j], msgs[j + 1], douts[r], outs[r], lses[r], accs, scale)
                back[r] = dmsgs
        if relay:
            returning = post_returns(ring, plans, shift, back, ks, acc, hop=1)
        else:
            add_returned(returning, plans, grads, index)
            returning = post_returns(ring, plans, shift, back, ks, acc, hop=-shift)
    add_returned(returning, plans, grads, index)  # relay: after R-1 hops, each rank's own shard
    return grads
