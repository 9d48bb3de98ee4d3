"""LongNet dilated attention on one device.

For each pair ``(w, r)`` and head offset, the rows a head keeps are gathered into a
dense packed block, the fused kernel runs on the packed block (segments batched), and
the pairs are merged by log-sum-exp in float32. No ``N x N`` tensor is ever built:
memory grows linearly with ``N`` for fixed segment lengths. The plan of which rows
meet which is built in :mod:`ring_attention.plans` and run by
:mod:`ring_attention.forward`, through :func:`ring_attention.entry.attend` (a ring of one).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .entry import attend
from .pattern import DilatedPattern


def dilated_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: DilatedPattern, *, causal: bool = False,
    scale: float | None = None, checkpoint: bool = False, window: tuple[int, int] | None = None,
    cu_seqlens: torch.Tensor | Sequence[int] | None = None,
) -> torch.Tensor:
    """Dilated attention: SEMANTICS.md's weighted attention with ``W`` from ``pattern``.

    :param q: queries ``[B, N, H, D]``.
    :param k: keys ``[B, N, Hkv, D]`` with ``H % Hkv == 0``.
    :param v: values, shaped as ``k``.
    :param pattern: a :class:`~ring_attention.DilatedPattern` (``mixture`` or ``head_groups``).
    :param causal: keep only keys at or before the query (global positions).
    :param scale: score scale, ``1/sqrt(D)`` by default.
    :param checkpoint: store only the inputs for backward and recompute the forward there,
        trading compute for activation memory.
    :param window: ``(left, right)``, a sliding window in flash-attn's convention on global
        positions: key ``j`` is kept for query ``i`` when ``i - left <= j <= i + right``
        (a side of ``-1`` unbounded), composed with ``causal`` and the pattern. ``None``: no window.
        Blocks wholly outside the band are never computed.
    :param cu_seqlens: packed documents: the cumulative document starts ``0 = c_0 < ... < c_D = N``
        (a 1-d int32 tensor, flash-attn's varlen convention, or a sequence of ints). A query
        sees only keys of its own document and the pattern restarts at every document start:
        the result equals running each document on its own. ``None``: one document.
    :returns: ``[B, N, H, D]`` in the input dtype; rows no pair keeps for a head are 0.
        Differentiable with exact gradients (double backward is not supported).
    :raises ValueError, TypeError: for malformed inputs, e.g. ``N`` not divisible by an
        effective segment length ``min(w, N)``.
    """
    return attend(q, k, v, pattern, ring_size=1, causal=causal, scale=scale, checkpoint=checkpoint, window=window,
                  cu_seqlens=cu_seqlens)
