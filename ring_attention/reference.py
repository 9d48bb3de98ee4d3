"""The dense reference: SEMANTICS.md's weighted-attention formula with an explicit ``W``.

This is the oracle every fast path is tested against. It builds the full ``[H, N, N]``
weight matrix and score matrix, so it is for small ``N`` only (a few thousand at most).
"""

from __future__ import annotations

import torch

from . import pattern as _pattern
from ._checks import check_flag, check_qkv, check_scale


def reference_attention(q, k, v, *, pattern=None, causal=False, scale=None):
    """Dense weighted attention ``O = sum_j W exp(s) v / sum_j W exp(s)``.

    Args:
        q: ``[B, N, H, D]``; k, v: ``[B, N, Hkv, D]`` with ``H % Hkv == 0``.
        pattern: a :class:`~ring_attention.DilatedPattern`, or ``None`` for full attention.
        causal: keep only keys at or before the query (global positions).
        scale: score scale, ``1/sqrt(D)`` by default.

    Returns:
        ``[B, N, H, D]`` in the input dtype. Computed in float32 (float64 for float64
        inputs). Rows whose weights are all zero are exactly 0 and pass no gradient.
    """
    b, n, h, hkv, d = check_qkv(q, k, v)
    scale = check_scale(scale, d)
    causal = check_flag(causal, "causal")
    if pattern is not None:
        _pattern.as_pattern(pattern).check(n, h)
    w = _pattern.weights(pattern, n, h, is_causal=causal).to(q.device)
    acc = torch.promote_types(q.dtype, torch.float32)
    group = h // hkv
    kx = k.to(acc).repeat_interleave(group, dim=2)
    vx = v.to(acc).repeat_interleave(group, dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", q.to(acc), kx) * scale
    keep = w > 0
    scores = scores.masked_fill(~keep, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    p = w.to(acc) * torch.exp(scores - row_max)
    denom = p.sum(dim=-1, keepdim=True)
    has_keys = denom > 0
    p = p / torch.where(has_keys, denom, torch.ones_like(denom))
    out = torch.einsum("bhij,bjhd->bihd", p, vx)
    return out.to(q.dtype)
