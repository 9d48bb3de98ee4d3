"""Log-sum-exp merge of partial attention results.

A partial result over a subset of keys is ``(out, lse)``: the softmax-normalized output
over those keys and the log of its (weighted) denominator. Two partials over disjoint
key sets combine exactly into the result over their union. Everything here runs in
float32 (float64 for float64 inputs) and keeps fully masked rows (``lse = -inf`` on both
sides) at ``out = 0, lse = -inf`` instead of NaN.
"""

from __future__ import annotations

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types and float32; float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def merge(out_a, lse_a, out_b, lse_b):
    """Combine two partials; returns new ``(out, lse)`` in the accumulation dtype.

    Args:
        out_a, out_b: ``[..., D]`` partial outputs (any float dtype).
        lse_a, lse_b: ``[...]`` their log-sum-exps (``-inf`` where a row saw no key).
    """
    acc = torch.promote_types(lse_a.dtype, lse_b.dtype)
    lse_a, lse_b = lse_a.to(acc), lse_b.to(acc)
    top = torch.maximum(lse_a, lse_b)
    # Rows masked on both sides have top = -inf; shift them by 0 so exp() gives 0, not NaN.
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    exp_a = torch.exp(lse_a - top)
    exp_b = torch.exp(lse_b - top)
    total = exp_a + exp_b
    lse = top + torch.log(total)  # log(0) = -inf for rows masked on both sides
    inv = 1.0 / torch.where(total > 0, total, torch.ones_like(total))
    out = out_a.to(acc) * (exp_a * inv).unsqueeze(-1) + out_b.to(acc) * (exp_b * inv).unsqueeze(-1)
    return out, lse


def merge_into_(out_acc, lse_acc, out_b, lse_b) -> None:
    """In-place :func:`merge` of ``(out_b, lse_b)`` into the accumulators (views allowed).

    ``out_acc``/``lse_acc`` are in the accumulation dtype; same -inf handling as
    :func:`merge`, without allocating a new output.
    """
    lse_b = lse_b.to(lse_acc.dtype)
    top = torch.maximum(lse_acc, lse_b)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    exp_a = torch.exp(lse_acc - top)
    exp_b = torch.exp(lse_b - top)
    total = exp_a + exp_b
    inv = 1.0 / torch.where(total > 0, total, torch.ones_like(total))
    out_acc.mul_((exp_a * inv).unsqueeze(-1)).add_(out_b.to(out_acc.dtype) * (exp_b * inv).unsqueeze(-1))
    lse_acc.copy_(top + torch.log(total))
