"""LongNet dilated attention on one device.

For each pair ``(w, r)`` and head offset, the rows a head keeps are gathered into a
dense packed block, the fused kernel runs on the packed block (segments batched), and
the pairs are merged by log-sum-exp in float32. No ``N x N`` tensor is ever built:
memory grows linearly with ``N`` for fixed segment lengths. The plan of which rows
meet which is built in :mod:`ring_attention.plans` and run by
:mod:`ring_attention.packed`; this module is the public entry point.
"""

from __future__ import annotations

import torch

from . import ops
from . import pattern as _pattern
from ._checks import check_flag, check_qkv, check_scale
from .comm import SimulatedRing
from .packed import run_on_ring
from .plans import ring_plans


def dilated_attention(q, k, v, pattern, *, causal=False, scale=None, checkpoint=False):
    """Dilated attention: SEMANTICS.md's weighted attention with ``W`` from ``pattern``.

    Args:
        q: ``[B, N, H, D]``; k, v: ``[B, N, Hkv, D]`` with ``H % Hkv == 0``.
        pattern: a :class:`~ring_attention.DilatedPattern` (``mixture`` or ``head_groups``).
        causal: keep only keys at or before the query (global positions).
        scale: score scale, ``1/sqrt(D)`` by default.
        checkpoint: store only the inputs for backward and recompute the forward there,
            trading compute for activation memory.

    Returns:
        ``[B, N, H, D]`` in the input dtype; rows no pair keeps for a head are 0.
        Differentiable with exact gradients (double backward is not supported).

    Raises:
        ValueError / TypeError for malformed inputs, e.g. ``N`` not divisible by an
        effective segment length ``min(w, N)``.
    """
    _, n, h, hkv, d = check_qkv(q, k, v)
    pattern = _pattern.as_pattern(pattern)
    pattern.check(n, h)
    scale = check_scale(scale, d)
    causal = check_flag(causal, "causal")
    checkpoint = check_flag(checkpoint, "checkpoint")
    if torch.compiler.is_compiling():
        return ops.attention(q, k, v, pattern, causal=causal, ring_size=1, layout="contiguous", scale=scale,
                             checkpoint=checkpoint)
    plans = ring_plans(pattern, n, h, hkv, causal, 1, "contiguous", (0,))
    return run_on_ring(plans, SimulatedRing(1), scale, "contiguous", q, k, v, checkpoint=checkpoint)
