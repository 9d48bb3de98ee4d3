"""The dense reference: SEMANTICS.md's weighted-attention formula with an explicit ``W``.

This is the oracle every fast path is tested against. It builds the full ``[H, N, N]``
weight matrix and score matrix, so it is for small ``N`` only (a few thousand at most).

A zero weight contributes exactly nothing, forward and backward, whatever the inputs
hold. Dense matrix products cannot promise that on their own: a product over all keys
multiplies a zero weight by a NaN or infinite value and gets NaN (``0 * nan``), so one
NaN row of ``v`` would poison every output row, and a NaN upstream gradient of a row
would leak into the gradients of keys it never attends. The two contractions over keys
(and their adjoints) therefore sum over the *kept* pairs only (:func:`_kept_sum`), and
the result is what IEEE arithmetic gives when each row's formula is evaluated over its
weighted keys alone; a NaN in a query, or in a key or value the row attends, still
makes the row NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from . import pattern as _pattern
from .checks import check_documents, check_flag, check_qkv, check_scale, check_window


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, pattern: _pattern.DilatedPattern | None = None,
    causal: bool = False, scale: float | None = None, query_rows: torch.Tensor | Sequence[int] | None = None,
    window: tuple[int, int] | None = None, cu_seqlens: torch.Tensor | Sequence[int] | None = None,
) -> torch.Tensor:
    """Dense weighted attention ``O = sum_j W exp(s) v / sum_j W exp(s)``.

    :param q: queries ``[B, N, H, D]``.
    :param k: keys ``[B, N, Hkv, D]`` with ``H % Hkv == 0``.
    :param v: values, shaped as ``k``.
    :param pattern: a :class:`~ring_attention.DilatedPattern`, or ``None`` for full attention.
    :param causal: keep only keys at or before the query (global positions).
    :param window: ``(left, right)``, a sliding window in flash-attn's convention: key ``j``
        is kept for query ``i`` when ``i - left <= j <= i + right`` (a side of ``-1`` is
        unbounded); composed with ``causal`` and the pattern. ``None``: no window.
    :param cu_seqlens: packed documents, their cumulative starts ``0 = c_0 < ... < c_D = N``
        (a 1-d int32 tensor as flash-attn takes it, or a sequence of ints): a query sees only
        keys of its own document, and a pattern restarts at every document start, as if each
        document ran on its own. ``None``: one document.
    :param scale: score scale, ``1/sqrt(D)`` by default.
    :param query_rows: compute only these query positions (a 1-d integer tensor or sequence,
        each in ``[0, N)``, in any order, repeats allowed): the rows of the full result,
        at ``H * len(rows) * N`` memory, so long sequences can be checked on a sample.
    :returns: ``[B, N, H, D]`` (``[B, len(query_rows), H, D]``) in the input dtype. Computed in
        float32 (float64 for float64 inputs). Rows whose weights are all zero are exactly
        0 and pass no gradient; keys with zero weight never enter a row, even when they
        hold NaN or inf.
    :raises TypeError, ValueError: for malformed inputs or ``query_rows``.
    """
    b, n, h, hkv, d = check_qkv(q, k, v)
    scale = check_scale(scale, d)
    causal = check_flag(causal, "causal")
    window = check_window(window)
    documents = check_documents(cu_seqlens, n)
    if pattern is not None:
        _pattern.as_pattern(pattern).check(n, h, documents)
    rows = None if query_rows is None else _check_rows(query_rows, n)
    w = _pattern.weights(pattern, n, h, is_causal=causal, rows=rows, window=window, documents=documents)
    w = w.to(q.device)
    if rows is not None:
        q = q[:, rows.to(q.device)]
    acc = torch.promote_types(q.dtype, torch.float32)
    group = h // hkv
    kx = k.to(acc).repeat_interleave(group, dim=2)
    vx = v.to(acc).repeat_interleave(group, dim=2)
    keep = (w > 0)[None]  # [1, H, N or len(query_rows), N]
    drop = ~keep
    has_keys = keep.any(dim=-1, keepdim=True)
    scores: torch.Tensor = _KeptScores.apply(q.to(acc), kx, drop, scale)  # type: ignore[no-untyped-call]  # torch's Function.apply is unannotated
    # Rows with keys subtract their own max, even a non-finite one (inf - inf is NaN, as
    # the formula evaluated on those keys gives); rows without keys subtract 0.
    row_max = torch.where(has_keys, scores.amax(dim=-1, keepdim=True), 0.0).detach()
    p = torch.where(keep, w.to(acc) * torch.exp(scores - row_max), 0.0)
    denom = p.sum(dim=-1, keepdim=True)
    p = p / torch.where(has_keys, denom, 1.0)
    out: torch.Tensor = _KeptProduct.apply(p, vx, drop)  # type: ignore[no-untyped-call]  # as above
    return out.to(q.dtype)


def _check_rows(query_rows: torch.Tensor | Sequence[int], seq_len: int) -> torch.Tensor:
    """``query_rows`` as a 1-d int64 CPU tensor of positions in ``[0, seq_len)``."""
    rows = torch.as_tensor(query_rows).cpu()
    if rows.numel() == 0 and rows.dim() == 1:  # torch.as_tensor([]) is float32
        rows = rows.long()
    if rows.dtype.is_floating_point or rows.is_complex() or rows.dtype == torch.bool:
        raise TypeError(f"query_rows must hold integer positions, got dtype {rows.dtype}")
    if rows.dim() != 1:
        raise ValueError(f"query_rows must be 1-d, got shape {tuple(rows.shape)}")
    rows = rows.long()
    if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= seq_len):
        raise ValueError(f"query_rows must lie in [0, {seq_len}), got {int(rows.min())} .. {int(rows.max())}")
    return rows


class _KeptScores(torch.autograd.Function):
    """``s[b,h,i,j] = scale * <q[b,i,h], k[b,j,h]>`` for kept pairs, ``-inf`` where ``drop``.

    Each score is its own dot product, so the forward needs no care; the backward sums
    ``ds`` over kept pairs only, so a NaN query never reaches the gradient of a key it
    does not attend, nor a NaN key the gradient of such a query.
    """

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, drop: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(q, k, drop)
        ctx.scale = scale
        scores = torch.einsum("bihd,bjhd->bhij", q, k) * scale
        return scores.masked_fill(drop, float("-inf"))

    @staticmethod
    def backward(ctx: Any, ds: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        q, k, drop = ctx.saved_tensors
        ds = ds * ctx.scale
        need_q, need_k = ctx.needs_input_grad[:2]
        dq = _kept_sum("bhij,bjhd->bihd", ds, k, drop) if need_q else None
        dk = _kept_sum("bhij,bihd->bjhd", ds, q, drop) if need_k else None
        return dq, dk, None, None


class _KeptProduct(torch.autograd.Function):
    """``o[b,i,h] = sum_{j kept} p[b,h,i,j] v[b,j,h]``: values of dropped keys never enter."""

    @staticmethod
    def forward(ctx: Any, p: torch.Tensor, v: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(p, v, drop)
        return _kept_sum("bhij,bjhd->bihd", p, v, drop)

    @staticmethod
    def backward(ctx: Any, do: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        p, v, drop = ctx.saved_tensors
        # d p[i,j] = <do[i], v[j]> for kept pairs only; d v[j] = sum over rows that keep j.
        need_p, need_v = ctx.needs_input_grad[:2]
        dp = torch.einsum("bihd,bjhd->bhij", do, v).masked_fill(drop, 0.0) if need_p else None
        dv = _kept_sum("bhij,bihd->bjhd", p, do, drop) if need_v else None
        return dp, dv, None


def _kept_sum(equation: str, a: torch.Tensor, b: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """``einsum(equation, a, b)`` summing over kept pairs only (not ``drop``), in IEEE arithmetic.

    ``a`` is a ``[B, H, N, N]`` pair tensor (``drop`` broadcasts to it) and ``b`` a
    ``[B, N, H, D]`` tensor; the contraction runs over one of ``a``'s position axes. A
    dropped pair's term is never formed, so ``a = 0`` meeting a NaN or inf in ``b``
    adds nothing, while a kept pair's term is ``a * b`` exactly as IEEE defines it.

    With finite operands this is one einsum. Otherwise the finite parts go through the
    einsum and each output element's non-finite terms are *counted* by further einsums
    of 0/1 indicators (exact small integers): any NaN term (NaN, ``0 * inf``) makes it
    NaN, ``+inf`` and ``-inf`` terms together make it NaN, else one sign makes it that
    infinity; adding that to the finite sum is what summing every kept term gives.
    """
    a = a.masked_fill(drop, 0.0)
    # One cheap pass each: a finite sum means finite entries (a sum that overflows only
    # sends finite operands down the exact path below, which gives the same result).
    if bool(a.sum().isfinite()) and bool(b.sum().isfinite()):
        return torch.einsum(equation, a, b)
    a_fin, b_fin = a.isfinite(), b.isfinite()
    out = torch.einsum(equation, a.where(a_fin, 0.0), b.where(b_fin, 0.0))

    def count(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # how many kept pairs have both indicator properties
        return torch.einsum(equation, x.to(out.dtype), y.to(out.dtype))

    kept = (~drop).expand_as(a)
    a_inf, b_inf = a.isinf(), b.isinf()
    a_pos, a_neg, b_pos, b_neg = a > 0, a < 0, b > 0, b < 0  # infinities included
    nan_terms = (
        count(a.isnan(), torch.ones_like(b_fin))
        + count(kept, b.isnan())
        + count(kept & (a == 0), b_inf)
        + count(a_inf, b == 0)
    )
    # A signed infinite term needs an infinite factor and a non-zero, non-NaN other one.
    pos_terms = count(a_pos, b_inf & b_pos) + count(a_neg, b_inf & b_neg)
    pos_terms = pos_terms + count(a_inf & a_pos, b_pos) + count(a_inf & a_neg, b_neg)
    neg_terms = count(a_pos, b_inf & b_neg) + count(a_neg, b_inf & b_pos)
    neg_terms = neg_terms + count(a_inf & a_pos, b_neg) + count(a_inf & a_neg, b_pos)
    inf = float("inf")
    special = torch.where(pos_terms > 0, inf, 0.0) + torch.where(neg_terms > 0, -inf, 0.0)
    special = torch.where(nan_terms > 0, float("nan"), special)
    return out + special
