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

# Kernels merge_into_ launches into float32 accumulators when no row is empty on both sides.
MERGE_LAUNCHES = 4


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types and float32; float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def merge_into_(
    out_acc: torch.Tensor, lse_acc: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor, *,
    empty_rows: bool = True,
) -> None:
    """Merge ``(out_b, lse_b)`` into the accumulators in place (strided views allowed).

    Five kernels: the weight of ``b`` is ``sigmoid(lse_b - lse_acc)``, the output moves
    towards ``out_b`` by it (``lerp``, exact at weights 0 and 1), the LSE is their
    ``logaddexp``. Two empty sides give ``(-inf) - (-inf) = NaN``: that weight becomes
    0.5, which leaves two zero outputs zero; a NaN partial has NaN in ``out`` as well as
    ``lse``, so it still spreads through the ``lerp``.

    Args:
        out_acc, lse_acc: ``[..., D]`` and ``[...]`` in the accumulation dtype.
        out_b, lse_b: the other partial, any float dtype.
        empty_rows: whether both sides may be empty ``(0, -inf)`` at once. ``False``
            when ``(out_b, lse_b)`` is a kernel's result (a kernel never returns
            ``lse = -inf`` for a row with keys), which saves the NaN guard.
    """
    weight = torch.sigmoid(lse_b - lse_acc)
    if empty_rows:
        weight = weight.nan_to_num_(0.5)
    weight = weight.unsqueeze(-1)
    out_acc.lerp_(out_b.to(out_acc.dtype), weight)
    torch.logaddexp(lse_acc, lse_b, out=lse_acc)


def merge(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Functional :func:`merge_into_`: new ``(out, lse)`` in the accumulation dtype."""
    acc = accumulation_dtype(torch.promote_types(lse_a.dtype, lse_b.dtype))
    out = out_a.to(acc, copy=True)
    lse = lse_a.to(acc, copy=True)
    merge_into_(out, lse, out_b, lse_b)
    return out, lse
