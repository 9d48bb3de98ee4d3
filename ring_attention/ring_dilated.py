"""Ring dilated attention: LongNet's pattern over a sequence sharded across a ring.

Each rank holds one shard (``contiguous`` or ``zigzag`` layout). A segment that lies
inside a shard is computed locally with no communication. A segment spanning ranks
exchanges only its kept (dilated) K/V rows, and only between ranks that hold that
segment: at ring step ``d`` rank ``r - d`` sends rank ``r`` the kept rows of the
segments they share, about ``w / r`` rows per pair instead of ``w``. Partial results
merge by log-sum-exp in float32; the backward sends dK/dV of received rows back to
their owner. The exchange plan is built in :mod:`ring_attention.plans` and run by
:mod:`ring_attention.forward`, for a process group or a one-process simulation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from .entry import attend
from .layout import Layout
from .pattern import DilatedPattern


def ring_dilated_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: DilatedPattern, *,
    group: dist.ProcessGroup | None = None, ring_size: int | None = None, causal: bool = False,
    scale: float | None = None, layout: Layout | str = "contiguous", checkpoint: bool = False,
    window: tuple[int, int] | None = None,
    cu_seqlens: torch.Tensor | Sequence[int] | None = None,
) -> torch.Tensor:
    """Dilated attention over a ring of ranks: :func:`~ring_attention.ring_attention` with a
    pattern's weights instead of full attention's.

    :param q: queries ``[B, n, H, D]``, this rank's shard or the whole sequence, as for
        :func:`~ring_attention.ring_attention`.
    :param k: keys ``[B, n, Hkv, D]``, held as ``q``.
    :param v: values, shaped as ``k``.
    :param pattern: a :class:`~ring_attention.DilatedPattern`.
    :param group: a ``torch.distributed`` process group (``torch.distributed.group.WORLD``
        for all ranks), or ``None`` to simulate the ring in this process.
    :param ring_size: ``R`` for the simulation; with ``group`` it must be ``None`` or the
        group's size.
    :param causal: as in :func:`~ring_attention.dilated_attention`, on global positions.
    :param scale: as in :func:`~ring_attention.dilated_attention`.
    :param layout: a :class:`~ring_attention.Layout`, or its name: ``"contiguous"`` or ``"zigzag"``.
    :param checkpoint: recompute the forward in backward instead of storing activations.
    :param window: ``(left, right)``, a sliding window in flash-attn's convention on global
        positions: key ``j`` is kept for query ``i`` when ``i - left <= j <= i + right``
        (a side of ``-1`` unbounded), composed with ``causal`` and the pattern. ``None``: no window.
        Blocks wholly outside the band are never computed and their keys never sent.
        With ``group``, every rank passes the same window (the ranks agree on it).
    :param cu_seqlens: packed documents: the cumulative document starts ``0 = c_0 < ... < c_D = N``
        in global positions (a 1-d int32 tensor, flash-attn's varlen convention, or a sequence
        of ints; with ``group``, every rank passes the same global offsets). A query sees only
        keys of its own document, and the pattern restarts at every document start (as if each document ran on its own); blocks across documents are never computed and their
        keys never sent. ``None``: one document. Under ``torch.compile`` a tensor is data of the
        graph: a new packing of as many documents compiles nothing new.
    :returns: this rank's output shard (with ``group``) or the whole output in natural order.
        The result does not depend on ``R`` or ``layout`` beyond rounding.
    :raises ValueError, TypeError: for malformed inputs; in a process group every rank
        raises, so a bad shard on one rank never leaves the others waiting.
    """
    return attend(
        q, k, v, pattern, group=group, ring_size=ring_size, causal=causal, scale=scale, layout=layout,
        checkpoint=checkpoint, window=window, cu_seqlens=cu_seqlens,
    )
