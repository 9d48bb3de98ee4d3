"""Attention over packed rows: plans of fused-kernel calls and their forward/backward.

Dilated attention never looks at an ``N x N`` matrix. For each (pair, head offset) it
*packs* the rows a head keeps into a dense block, runs the fused kernel on the packed
block, and merges the result into the rows' running ``(out, lse)``. A :class:`Plan`
lists those blocks for every rank of a ring; this module runs any plan, forward and
backward, on any :class:`~ring_attention.comm.Ring`.

Vocabulary:

- a *run* is a maximal stretch of packed rows that lie in one segment and one
  contiguous interval of the shard; runs of equal length that follow each other batch
  into one kernel call (:class:`Call`);
- a :class:`Block` pairs packed query rows of this rank with packed key rows from a
  *source*: the rank's own shard, or a message another rank sent at a :class:`Step`;
- a :class:`Step` is one shift of the ring: who sends which rows to whom, and the
  blocks computed with what arrives.

The backward follows PyTorch's context-parallel recipe: each block's kernel backward is
called with the rows' *final* output and LSE, which makes its gradient that block's
exact share of the gradient of the merged result; dQ accumulates locally in float32,
dK/dV of received rows travel back to their owner, also in float32.
"""

from __future__ import annotations

import dataclasses
from typing import Union

import torch

from . import kernels
from .comm import Ring
from .merge import accumulation_dtype, merge, merge_into_

Index = Union[slice, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Call:
    """One batched kernel call: ``runs`` query runs against as many key runs, pairwise."""

    q_start: int
    k_start: int
    runs: int
    q_len: int
    k_len: int
    causal: bool  # diagonal block: the key run is the query run itself
    fresh: bool  # no earlier call wrote these (row, head) cells: write instead of merge


@dataclasses.dataclass(frozen=True)
class Block:
    q_rows: Index  # rows of the query shard, packed order
    heads: Index  # query heads
    k_rows: Index  # rows of the key source
    kv_index: torch.Tensor  # for each query head, its head in the key source
    source: int | None  # None: the rank's own shard; i: the i-th message received at the step
    calls: tuple[Call, ...]


@dataclasses.dataclass(frozen=True)
class Message:
    rows: Index  # rows of the sender's k/v shard
    kv_heads: Index  # kv heads sent


@dataclasses.dataclass(frozen=True)
class Step:
    shift: int
    sends: dict[int, tuple[Message, ...]]  # rank r sends these to (r + shift) % R
    blocks: dict[int, tuple[Block, ...]]  # rank r computes these with what it receives


@dataclasses.dataclass(frozen=True)
class Plan:
    ring_size: int
    local: dict[int, tuple[Block, ...]]
    steps: tuple[Step, ...]


def index_length(index: Index, size: int) -> int:
    return len(range(*index.indices(size))) if isinstance(index, slice) else index.numel()


def sub_index(index: Index, start: int, stop: int) -> Index:
    """``index[start:stop]`` for a slice or an index tensor."""
    if isinstance(index, slice):
        first, _, step = index.indices(1 << 62)
        return slice(first + start * step, first + stop * step, step)
    return index[start:stop]


def take(x: torch.Tensor, rows: Index, heads: Index) -> torch.Tensor:
    """``x[:, rows, heads]`` for ``x [B, N, H, ...]``; a view where both are slices."""
    x = x[:, rows] if isinstance(rows, slice) else x.index_select(1, rows)
    return x[:, :, heads] if isinstance(heads, slice) else x.index_select(2, heads)


def put(x: torch.Tensor, rows: Index, heads: Index, value: torch.Tensor) -> None:
    """``x[:, rows, heads] = value`` (rows and heads have no repeats)."""
    if isinstance(rows, slice):
        target = x[:, rows]
        if isinstance(heads, slice):
            target[:, :, heads] = value
        else:
            target.index_copy_(2, heads, value)
    elif isinstance(heads, slice):
        x[:, :, heads].index_copy_(1, rows, value)
    else:
        x[:, rows[:, None], heads] = value


def add_rows(x: torch.Tensor, rows: Index, value: torch.Tensor) -> None:
    """``x[:, rows] += value`` (rows have no repeats)."""
    if isinstance(rows, slice):
        x[:, rows] += value
    else:
        x.index_add_(1, rows, value)


def _runs(x: torch.Tensor, start: int, runs: int, length: int) -> torch.Tensor:
    """Packed ``[B, M, h, D]`` rows -> ``[B*runs, h, length, D]`` kernel layout."""
    b, _, h, d = x.shape
    piece = x[:, start : start + runs * length]
    return piece.reshape(b * runs, length, h, d).transpose(1, 2)


def _unruns(x: torch.Tensor, batch: int) -> torch.Tensor:
    """Kernel layout ``[B*runs, h, L, ...]`` -> packed ``[B, runs*L, h, ...]``."""
    x = x.transpose(1, 2)
    return x.reshape(batch, -1, *x.shape[2:])


# --- forward ---------------------------------------------------------------------------


def _block_forward(blk: Block, q, k_src, v_src, out_acc, lse_acc, scale: float) -> None:
    batch = q.shape[0]
    qb = take(q, blk.q_rows, blk.heads)
    kb = take(k_src, blk.k_rows, blk.kv_index)
    vb = take(v_src, blk.k_rows, blk.kv_index)
    for c in blk.calls:
        o, lse = kernels.attention_forward(
            _runs(qb, c.q_start, c.runs, c.q_len),
            _runs(kb, c.k_start, c.runs, c.k_len),
            _runs(vb, c.k_start, c.runs, c.k_len),
            causal=c.causal,
            scale=scale,
        )
        o, lse = _unruns(o, batch), _unruns(lse.unsqueeze(-1), batch).squeeze(-1)
        rows = sub_index(blk.q_rows, c.q_start, c.q_start + c.runs * c.q_len)
        if c.fresh:
            put(out_acc, rows, blk.heads, o.to(out_acc.dtype))
            put(lse_acc, rows, blk.heads, lse.to(lse_acc.dtype))
        elif isinstance(rows, slice) and isinstance(blk.heads, slice):
            # Evenly spaced rows and heads: the accumulators' views merge in place.
            merge_into_(take(out_acc, rows, blk.heads), take(lse_acc, rows, blk.heads), o, lse)
        else:
            o, lse = merge(take(out_acc, rows, blk.heads), take(lse_acc, rows, blk.heads), o, lse)
            put(out_acc, rows, blk.heads, o)
            put(lse_acc, rows, blk.heads, lse)


def _message_tensors(msgs: tuple[Message, ...], k, v) -> list[torch.Tensor]:
    out = []
    for m in msgs:
        out += [take(k, m.rows, m.kv_heads), take(v, m.rows, m.kv_heads)]
    return out


def _message_specs(msgs: tuple[Message, ...], k, dtype) -> list:
    b, n, hkv, d = k.shape
    spec = []
    for m in msgs:
        shape = (b, index_length(m.rows, n), index_length(m.kv_heads, hkv), d)
        spec += [(shape, dtype), (shape, dtype)]
    return spec


def _post_step(ring: Ring, plan: Plan, i: int, ks, vs):
    """Post step ``i``'s exchange of k/v rows for every rank this process runs."""
    step = plan.steps[i]
    k0 = ks[ring.ranks[0]]
    sends = {r: _message_tensors(step.sends[r], ks[r], vs[r]) for r in ring.ranks if step.sends.get(r)}
    specs = {}
    for r in ring.ranks:
        src = (r - step.shift) % plan.ring_size
        if step.sends.get(src):
            specs[r] = _message_specs(step.sends[src], k0, k0.dtype)
    return ring.exchange(step.shift, sends, specs, k0.device)


def run_forward(plan: Plan, ring: Ring, qs: dict, ks: dict, vs: dict, scale: float):
    """Run ``plan``; returns ``{rank: (out [B,n,H,D] accumulation dtype, lse [B,n,H])}``."""
    acc = accumulation_dtype(qs[ring.ranks[0]].dtype)
    state = {}
    for r in ring.ranks:
        b, n, h, d = qs[r].shape
        state[r] = (
            torch.zeros(b, n, h, d, dtype=acc, device=qs[r].device),
            torch.full((b, n, h), float("-inf"), dtype=acc, device=qs[r].device),
        )
    pending = _post_step(ring, plan, 0, ks, vs) if plan.steps else None
    for r in ring.ranks:  # own rows first, while the first exchange is in flight
        for blk in plan.local[r]:
            _block_forward(blk, qs[r], ks[r], vs[r], *state[r], scale)
    for i, step in enumerate(plan.steps):
        received = pending.wait()
        if i + 1 < len(plan.steps):
            pending = _post_step(ring, plan, i + 1, ks, vs)
        for r in ring.ranks:
            for blk in step.blocks.get(r, ()):
                k_msg, v_msg = received[r][2 * blk.source], received[r][2 * blk.source + 1]
                _block_forward(blk, qs[r], k_msg, v_msg, *state[r], scale)
    return state


# --- backward --------------------------------------------------------------------------


def _block_backward(blk: Block, q, k_src, v_src, dout, out, lse, dq_acc, dk_src, dv_src, scale):
    """Adds this block's dQ into ``dq_acc`` and its dK/dV into ``dk_src``/``dv_src``.

    ``dk_src``/``dv_src`` have the key source's shape in the accumulation dtype.
    """
    batch = q.shape[0]
    qb = take(q, blk.q_rows, blk.heads)
    kb = take(k_src, blk.k_rows, blk.kv_index)
    vb = take(v_src, blk.k_rows, blk.kv_index)
    dob = take(dout, blk.q_rows, blk.heads)
    ob = take(out, blk.q_rows, blk.heads)
    lb = take(lse, blk.q_rows, blk.heads)
    dq_b = torch.zeros(qb.shape, dtype=dq_acc.dtype, device=q.device)
    dk_b = torch.zeros(kb.shape, dtype=dq_acc.dtype, device=q.device)
    dv_b = torch.zeros(kb.shape, dtype=dq_acc.dtype, device=q.device)
    for c in blk.calls:
        qsl = slice(c.q_start, c.q_start + c.runs * c.q_len)
        ksl = slice(c.k_start, c.k_start + c.runs * c.k_len)
        dq, dk, dv = kernels.attention_backward(
            _runs(dob, c.q_start, c.runs, c.q_len),
            _runs(qb, c.q_start, c.runs, c.q_len),
            _runs(kb, c.k_start, c.runs, c.k_len),
            _runs(vb, c.k_start, c.runs, c.k_len),
            _runs(ob, c.q_start, c.runs, c.q_len),
            _runs(lb.unsqueeze(-1), c.q_start, c.runs, c.q_len).squeeze(-1),
            causal=c.causal,
            scale=scale,
        )
        dq_b[:, qsl] += _unruns(dq, batch)
        dk_b[:, ksl] += _unruns(dk, batch)
        dv_b[:, ksl] += _unruns(dv, batch)
    add_rows(dq_acc, blk.q_rows, _fold_heads(dq_b, blk.heads, q.shape[2], per_query=True))
    add_rows(dk_src, blk.k_rows, _fold_heads(dk_b, blk.kv_index, k_src.shape[2]))
    add_rows(dv_src, blk.k_rows, _fold_heads(dv_b, blk.kv_index, k_src.shape[2]))


def _fold_heads(x: torch.Tensor, heads: Index, num_heads: int, per_query: bool = False) -> torch.Tensor:
    """Scatter-add ``x [B, M, h, D]`` over ``heads`` into a ``[B, M, num_heads, D]`` tensor."""
    b, m, _, d = x.shape
    full = torch.zeros(b, m, num_heads, d, dtype=x.dtype, device=x.device)
    if isinstance(heads, slice):
        full[:, :, heads] += x
    else:
        full.index_add_(2, heads, x)
    return full


def run_backward(plan: Plan, ring: Ring, qs, ks, vs, outs, lses, douts, scale: float):
    """Gradients ``{rank: (dq, dk, dv)}`` in the accumulation dtype."""
    acc = accumulation_dtype(qs[ring.ranks[0]].dtype)
    grads = {
        r: tuple(torch.zeros(t.shape, dtype=acc, device=t.device) for t in (qs[r], ks[r], vs[r]))
        for r in ring.ranks
    }
    pending = _post_step(ring, plan, 0, ks, vs) if plan.steps else None
    for r in ring.ranks:
        dq, dk, dv = grads[r]
        for blk in plan.local[r]:
            _block_backward(blk, qs[r], ks[r], vs[r], douts[r], outs[r], lses[r], dq, dk, dv, scale)
    returning = None
    for i, step in enumerate(plan.steps):
        received = pending.wait()
        if i + 1 < len(plan.steps):
            pending = _post_step(ring, plan, i + 1, ks, vs)
        back, specs = {}, {}
        for r in ring.ranks:
            if step.blocks.get(r):
                msgs = received[r]
                dmsgs = [torch.zeros(t.shape, dtype=acc, device=t.device) for t in msgs]
                for blk in step.blocks[r]:
                    j = 2 * blk.source
                    _block_backward(
                        blk, qs[r], msgs[j], msgs[j + 1], douts[r], outs[r], lses[r],
                        grads[r][0], dmsgs[j], dmsgs[j + 1], scale,
                    )
                back[r] = dmsgs
            if step.sends.get(r):  # gradients of the rows r sent come back from (r + shift)
                specs[r] = _message_specs(step.sends[r], ks[r], acc)
        if returning is not None:
            _add_returned(returning, grads)
        # Gradients of received rows go back to their owner: the reverse shift.
        back_ring_sends = {r: back[r] for r in back}
        returning = (step, ring.exchange(-step.shift, back_ring_sends, specs, qs[ring.ranks[0]].device))
    if returning is not None:
        _add_returned(returning, grads)
    return grads


def _add_returned(returning, grads) -> None:
    step, pending = returning
    for r, tensors in pending.wait().items():
        for m, (dk_rows, dv_rows) in zip(step.sends[r], zip(tensors[0::2], tensors[1::2])):
            _, dk, dv = grads[r]
            add_rows(dk, m.rows, _fold_heads(dk_rows, m.kv_heads, dk.shape[2]))
            add_rows(dv, m.rows, _fold_heads(dv_rows, m.kv_heads, dv.shape[2]))


class PackedAttention(torch.autograd.Function):
    """Differentiable :func:`run_forward` for the ranks ``ring.ranks``.

    Inputs are the ranks' q shards, then k shards, then v shards; outputs are the ranks'
    output shards in the input dtype.
    """

    @staticmethod
    def forward(ctx, plan: Plan, ring: Ring, scale: float, *tensors):
        n = len(ring.ranks)
        qs = dict(zip(ring.ranks, tensors[:n]))
        ks = dict(zip(ring.ranks, tensors[n : 2 * n]))
        vs = dict(zip(ring.ranks, tensors[2 * n :]))
        state = run_forward(plan, ring, qs, ks, vs, scale)
        outs = tuple(state[r][0].to(qs[r].dtype) for r in ring.ranks)
        lses = tuple(state[r][1] for r in ring.ranks)
        ctx.plan, ctx.ring, ctx.scale = plan, ring, scale
        ctx.save_for_backward(*tensors, *outs, *lses)
        return outs

    @staticmethod
    def backward(ctx, *douts):
        ring = ctx.ring
        n = len(ring.ranks)
        saved = ctx.saved_tensors
        qs, ks, vs, outs, lses = (dict(zip(ring.ranks, saved[i * n : (i + 1) * n])) for i in range(5))
        douts = {r: (d if d is not None else torch.zeros_like(outs[r])) for r, d in zip(ring.ranks, douts)}
        grads = run_backward(ctx.plan, ring, qs, ks, vs, outs, lses, douts, ctx.scale)
        dqs = [grads[r][0].to(qs[r].dtype) for r in ring.ranks]
        dks = [grads[r][1].to(ks[r].dtype) for r in ring.ranks]
        dvs = [grads[r][2].to(vs[r].dtype) for r in ring.ranks]
        return (None, None, None, *dqs, *dks, *dvs)
