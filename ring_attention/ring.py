"""Ring attention: full (or causal) attention over a sequence sharded across a ring.

Each rank keeps its queries. At ring step ``d = 1 .. R-1`` rank ``r`` receives the K/V
shard of rank ``r - d``: passed along the ring one hop per step (every rank sends the
shard it holds to ``r + 1``, as ring-flash-attn and PyTorch's context parallel do), so
between nodes each shard crosses a node boundary once per step. The next step is posted
before the current block is computed, so communication overlaps compute, and every rank
posts the same exchanges in the same order, so there is no deadlock. Each block's
``(out, lse)`` merges into the rank's running result by log-sum-exp in float32. The
backward re-exchanges K/V, keeps dQ local, and passes each shard's dK/dV (float32) along
with it, one hop behind, until it reaches its owner. Under a sliding window whose band reaches
at most a shard, the forward keeps the keys it received (about one more shard) and the
backward sends only their dK/dV back.

Causal attention in the contiguous layout is the exception: rank ``r`` needs only the
shards before its own, so each rank sends its shard straight to the ranks after it
(``r + d`` at step ``d``) and their dK/dV come straight back: about half the bytes of
a relay, but more of them cross nodes. On 2 nodes of 8 ranks, a pass of direct sends
between all pairs makes 128 cross-node shard transfers, a neighbour ring 30.

- Causal: a block whose keys all come after the queries is skipped (never computed,
  never sent); the diagonal block is block-causal; blocks below it are full.
- ``zigzag`` layout: rank ``r`` holds chunks ``r`` and ``2R-1-r``, so every rank does
  the same causal work.
- Grouped-query attention: only the ``Hkv`` kv heads travel.

Full attention is the dilated pattern ``(N, 1)``, so the per-rank steps are the ones of
:mod:`ring_attention.ring_dilated`: same plan builder, same kernels, same merges.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from .entry import FULL, attend
from .layout import Layout


def ring_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group: dist.ProcessGroup | None = None,
    ring_size: int | None = None, causal: bool = False, scale: float | None = None,
    layout: Layout | str = "contiguous", checkpoint: bool = False, window: tuple[int, int] | None = None,
    cu_seqlens: torch.Tensor | Sequence[int] | None = None,
) -> torch.Tensor:
    """Full attention over a ring of ranks (SEMANTICS.md, section Ring).

    :param q: queries ``[B, n, H, D]``. With ``group``, this rank's shard (``n = N / R``) in
        ``layout``; without, the whole sequence in natural order.
    :param k: keys ``[B, n, Hkv, D]``, held as ``q``.
    :param v: values, shaped as ``k``.
    :param group: a ``torch.distributed`` process group, or ``None`` to run every rank's
        steps in this process (the one-device simulation).
    :param ring_size: ``R`` for the simulation (``None`` means 1); with ``group`` it must be
        ``None`` or the group's size.
    :param causal: keep keys at or before the query, in global positions.
    :param scale: score scale, ``1/sqrt(D)`` by default.
    :param layout: a :class:`~ring_attention.Layout`, or its name: ``"contiguous"`` or ``"zigzag"``.
    :param checkpoint: recompute the forward in backward instead of storing activations.
    :param window: ``(left, right)``, a sliding window in flash-attn's convention on global
        positions: key ``j`` is kept for query ``i`` when ``i - left <= j <= i + right``
        (a side of ``-1`` unbounded), composed with ``causal``. ``None``: no window.
        Blocks wholly outside the band are never computed and their keys never sent.
        With ``group``, every rank passes the same window (the ranks agree on it).
    :param cu_seqlens: packed documents: the cumulative document starts ``0 = c_0 < ... < c_D = N``
        in global positions (a 1-d int32 tensor, flash-attn's varlen convention, or a sequence
        of ints; with ``group``, every rank passes the same global offsets). A query sees only
        keys of its own document; blocks across documents are never computed and their
        keys never sent. ``None``: one document. Under ``torch.compile`` a tensor is data of the
        graph: a new packing of as many documents compiles nothing new.
    :returns: this rank's output shard, or the whole output in natural order.
    :raises ValueError, TypeError: naming the problem, on every rank of the group.
    """
    return attend(
        q, k, v, FULL, group=group, ring_size=ring_size, causal=causal, scale=scale, layout=layout,
        checkpoint=checkpoint, window=window, cu_seqlens=cu_seqlens,
    )
