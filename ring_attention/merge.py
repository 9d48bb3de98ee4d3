"""Log-sum-exp merge of partial attention results.

A partial result over a subset of keys is ``(out, lse)``: the softmax-normalized output
over those keys and the log of its (weighted) denominator. Two partials over disjoint
key sets combine exactly into the result over their union:

    lse = logaddexp(lse_a, lse_b),   out = sigmoid(lse_a - lse_b) * out_a + sigmoid(lse_b - lse_a) * out_b

The weight is a function of the LSEs' difference only, which is exact in float32 even
for large LSEs (rounding ``lse`` first and subtracting it would not be).

Accumulators are float32 (float64 for float64 inputs). A row that saw no key has
``lse = -inf`` and ``out = 0``: merging into it yields the other side exactly, and a row
masked on both sides stays ``(0, -inf)`` instead of NaN. A NaN on either side stays NaN.
"""

from __future__ import annotations

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types and float32; float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def merge_into_(out_acc, lse_acc, out_b, lse_b) -> None:
    """Merge ``(out_b, lse_b)`` into the accumulators in place (strided views allowed).

    Args:
        out_acc, lse_acc: ``[..., D]`` and ``[...]`` in the accumulation dtype.
        out_b, lse_b: the other partial, any float dtype.
    """
    out_acc.mul_(_weight(lse_acc, lse_b).unsqueeze(-1))
    out_acc.add_(out_b * _weight(lse_b, lse_acc).unsqueeze(-1))
    lse_acc.copy_(torch.logaddexp(lse_acc, lse_b))


def _weight(lse_this, lse_other):
    """``sigmoid(lse_this - lse_other)``; 0 for an empty side, even against another empty one."""
    return torch.sigmoid(torch.where(lse_this == float("-inf"), float("-inf"), lse_this - lse_other))


def merge(out_a, lse_a, out_b, lse_b):
    """Functional :func:`merge_into_`: new ``(out, lse)`` in the accumulation dtype."""
    acc = accumulation_dtype(torch.promote_types(lse_a.dtype, lse_b.dtype))
    out = out_a.to(acc, copy=True)
    lse = lse_a.to(acc, copy=True)
    merge_into_(out, lse, out_b, lse_b)
    return out, lse
