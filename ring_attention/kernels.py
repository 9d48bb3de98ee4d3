"""One attention block with its log-sum-exp: the fused kernel every variant calls.

Layout here is the fused ops' ``[B, H, L, D]``; the public functions use ``[B, N, H, D]``
and transpose (a free view) at the boundary. ``q``, ``k`` and ``v`` of a block have the
same number of heads.

``causal`` here is the block-local lower triangle aligned bottom-right (``j <= i + Lk - Lq``,
``Lq <= Lk``): a square diagonal block, or a row chunk of one against the keys up to its last
row. ``band=(lo, hi)`` keeps block-local key ``j`` for query ``i`` when ``lo <= j - i <= hi``
(a block cut by a sliding window), and a row with no key in it gives out 0 and LSE ``-inf``.
A band runs on the CPU op with an additive mask, or on ``math`` (CUDA: flash's
``window_size``, or ``math``). Which blocks are diagonal, full or skipped is the caller's
business: this module knows nothing of global positions. The CPU op aligns a causal mask
top-left and CUDA flash bottom-right, which agree only when ``Lq == Lk``: a causal block with
fewer queries than keys runs as its band (:func:`_kernel_mask`).

Backends (:func:`backend`), each called only with inputs its kernel accepts:

- ``cpu``: ``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward
  (float16, bfloat16, float32, float64; any head dim), for blocks of at least
  :data:`CPU_FEW_KEYS` keys, or fewer keys seen to be finite (others run on ``math``).
- ``flash``, ``efficient``: the fused CUDA kernels (:mod:`ring_attention.fused_cuda`: what
  each accepts and what every call gets to meet it). A band runs on flash with its native
  ``window_size`` where a window keeps exactly the band's keys (:func:`~ring_attention.
  fused_cuda.flash_window`), else on ``math``.
- ``math``: exact matmul/softmax, for anything else (CUDA with both fused kernels
  disabled, other devices). It materializes scores for at most
  :data:`MATH_SCORE_BYTES` bytes of query rows at a time (more only when a single row's
  scores exceed it), never a whole ``L x L`` block.

Non-finite inputs show where the reference says (:mod:`ring_attention.nonfinite`): a causal
or band's block quarantines its non-finite values, and query rows holding NaN or inf are
marked NaN. A band's block runs on the CPU op only where its keys are seen to be finite (the op adds
the band to the scores, and a masked ``inf`` score would be NaN); flash replaces masked
scores, and takes any keys.

Any finite scale works: a scale the kernels cannot take as a positive float32 (zero,
negative, subnormal) is folded into ``q``, because the fused ops scale the masked
``-inf`` scores too and would turn them into NaN.

The backward takes the *final* output and LSE of the query rows (after every merge),
not this block's own: then ``exp(s - lse)`` are the global probabilities and the
result is this block's exact share of the gradient of the merged attention.
"""

from __future__ import annotations

from typing import cast

import torch

from . import fused_cuda
from .masks import band_keeps, band_rows
from .nonfinite import (
    band_hits,
    causal_poison,
    known_finite,
    mark_query_rows_,
    marks_query_rows,
    scores_bounded,
    zeroed,
)

aten = torch.ops.aten

# Bytes of float32 scores the math backend materializes per chunk of query rows.
MATH_SCORE_BYTES = 256 * 2**20
# With fewer keys than this, torch's CPU op returns a finite 0 for a row whose every score
# is NaN (a NaN query row, or a causal row that sees only a NaN key): measured on torch 2.13
# for 1-15 keys. Such small blocks run on the math backend, which propagates the NaN.
CPU_FEW_KEYS = 16
_F32 = torch.finfo(torch.float32)


def backend(q: torch.Tensor, kv_len: int | None = None, k: torch.Tensor | None = None, scale: float = 1.0) -> str:
    """The backend a block with ``q [B, H, L, D]`` (and ``kv_len`` keys ``k``) runs on: cpu,
    flash, efficient or math.

    A CPU block of fewer than :data:`CPU_FEW_KEYS` keys runs on math unless its scores are
    seen to be finite (:func:`~ring_attention.nonfinite.scores_bounded`): then no row's scores
    are all NaN (a non-finite query row is marked afterwards, whatever the backend), and many
    short documents stay on the fused op instead of a dozen math launches each."""
    if q.device.type == "cpu" and kv_len is not None and kv_len < CPU_FEW_KEYS \
            and (k is None or not scores_bounded(q, k, scale)):
        return "math"
    if q.device.type in ("cpu", "meta"):  # meta: shapes only, through the CPU op's meta kernel
        return "cpu"
    if q.device.type != "cuda":
        return "math"
    return fused_cuda.kind(q)


def attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float,
    mark_query_rows: bool = True, quarantined: bool = False, band: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one block. Returns ``(out [B,H,L,D] in q.dtype, lse [B,H,L])``.

    ``lse`` is float32 (float64 for float64 inputs) and contiguous.

    ``mark_query_rows=False`` leaves a backend's non-finite query rows as it returns them
    (:func:`marks_query_rows`): the caller marks them once with :func:`mark_query_rows_`
    after merging every block of the rows, instead of once per block.

    ``quarantined=True``: ``v`` of a causal block holds no non-finite value, and the caller
    adds the rows' value poison itself (:func:`split_values`, :func:`value_poison`), from
    one split of the whole source instead of four kernels per call.
    """
    _check_block(q, k, causal)
    q, scale, _ = fold_scale(q, scale)
    kernel_causal, kernel_band = _kernel_mask(q.shape[-2], k.shape[-2], causal, band)
    if band is not None:  # as below, the values' poison found after the kernel
        clean = zeroed(v)
        out, lse = _forward(q, k, clean, kernel_causal, scale, kernel_band)
        if clean is not v:
            del clean
            out.masked_fill_(cast(torch.Tensor, band_hits(q.shape[-2], v, band)), float("nan"))
    elif not causal or quarantined:
        out, lse = _forward(q, k, v, kernel_causal, scale, kernel_band)
    else:  # the poison after the kernel: one copy of the values alive at a time
        clean = zeroed(v)
        out, lse = _forward(q, k, clean, kernel_causal, scale, kernel_band)
        if clean is not v:  # the kernel is done with its copy: the poison is scanned in it
            out.add_(causal_poison(v, q.shape[-2], clean))
    if mark_query_rows and marks_query_rows(q):
        mark_query_rows_(q, out, lse)
    return out, lse


def _kernel_mask(q_len: int, k_len: int, causal: bool, band: tuple[int, int] | None) -> tuple[bool, tuple[int, int] | None]:
    """``(causal, band)`` as the kernels take them: a causal block with fewer queries than keys
    (aligned bottom-right) as the band that is its mask, since the CPU op aligns causal
    top-left; a square causal block as it is, every kernel's own."""
    if causal and q_len != k_len:
        return False, (1 - q_len, k_len - q_len)
    return causal, band


def _kind(q: torch.Tensor, k: torch.Tensor, scale: float, band: tuple[int, int] | None, forward: bool) -> str:
    """The backend of a block. A band runs on flash where a window keeps exactly its keys,
    else on math; on the CPU op, whose forward runs it only where its keys are seen to be
    finite (the op adds the band to the scores: a masked ``inf`` score would be NaN). The
    backward does not look (a reduction per call): with an infinite key, a band's gradients
    may hold NaN in more rows than the reference's; outputs never do."""
    kind = backend(q, k.shape[-2], k, scale)
    if band is None or kind == "math":
        return kind
    if kind == "cpu":
        return "cpu" if not forward or known_finite(k) else "math"
    if kind == "flash" and fused_cuda.band_call(q.shape[-2], k.shape[-2], band) is not None:
        return "flash"
    return "math"


def _forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
    band: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    kind = _kind(q, k, scale, band, forward=True)
    if kind == "cpu":
        return _cpu_forward(q, k, v, causal, scale, band)
    if kind == "math":
        return _math_forward(q, k, v, causal=causal, scale=scale, band=band)
    if band is None:
        return fused_cuda.forward(kind, q, k, v, causal, scale)
    call = cast(fused_cuda.BandCall, fused_cuda.band_call(q.shape[-2], k.shape[-2], band))  # flash: there is one
    rows, keys = call.rows, call.keys
    o, lse = fused_cuda.forward(kind, q[:, :, rows], k[:, :, keys], v[:, :, keys], False, scale, call.window)
    lq = q.shape[-2]  # rows without a key in the band: out 0, LSE -inf
    return _placed(o, lq, rows, 0.0), _placed(lse, lq, rows, float("-inf"), dim=-1)


def _placed(part: torch.Tensor, length: int, rows: slice, fill: float, dim: int = -2) -> torch.Tensor:
    """``part``, the rows ``rows`` of a block's ``length`` along ``dim``, within a whole block
    filled with ``fill`` elsewhere: ``part`` itself where it holds every row."""
    if (rows.start, rows.stop) == (0, length):
        return part
    shape = list(part.shape)
    shape[dim] = length
    whole = part.new_full(shape, fill)
    whole.narrow(dim, rows.start, rows.stop - rows.start).copy_(part)
    return whole


def attention_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    *, causal: bool, scale: float, band: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` of one block, given the rows' final ``out`` and ``lse``."""
    _check_block(q, k, causal)
    q, scale, q_factor = fold_scale(q, scale)
    causal, band = _kernel_mask(q.shape[-2], k.shape[-2], causal, band)
    kind = fused_cuda.backward_kind(q, _kind(q, k, scale, band, forward=False))
    if band is not None and kind == "efficient":  # flash's backward cannot take this head dim
        kind = "math"
    if kind == "cpu":
        dq, dk, dv = _cpu_backward(dout, q, k, v, out, lse, causal, scale, band)
    elif kind == "math":
        dq, dk, dv = _math_backward(dout, q, k, v, out, lse, causal=causal, scale=scale, band=band)
    elif band is None:
        dq, dk, dv = fused_cuda.backward(kind, dout, q, k, v, out, lse, causal, scale)
    else:
        dq, dk, dv = _flash_band_backward(dout, q, k, v, out, lse, scale, band)
    if q_factor != 1.0:
        dq = dq * q_factor
    return dq, dk, dv


def _flash_band_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    scale: float, band: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A band's gradients on flash, on the rows and keys that hold a pair
    (:func:`~ring_attention.fused_cuda.band_call`); the others get none."""
    call = cast(fused_cuda.BandCall, fused_cuda.band_call(q.shape[-2], k.shape[-2], band))  # flash: there is one
    rows, keys = call.rows, call.keys
    dq, dk, dv = fused_cuda.backward(
        "flash", dout[:, :, rows], q[:, :, rows], k[:, :, keys], v[:, :, keys], out[:, :, rows], lse[..., rows],
        False, scale, call.window,
    )
    lq, lk = q.shape[-2], k.shape[-2]
    return _placed(dq, lq, rows, 0.0), _placed(dk, lk, keys, 0.0), _placed(dv, lk, keys, 0.0)


# --- preconditions ----------------------------------------------------------------------


def _check_block(q: torch.Tensor, k: torch.Tensor, causal: bool) -> None:
    if causal and q.shape[-2] > k.shape[-2]:
        raise ValueError(
            f"a causal block aligns bottom-right and needs at least as many keys as queries, got "
            f"{q.shape[-2]} query rows and {k.shape[-2]} key rows"
        )


def fold_scale(q: torch.Tensor, scale: float) -> tuple[torch.Tensor, float, float]:
    """``(q', scale', dq factor)`` with ``q' * scale' == q * scale`` and ``scale'`` a positive
    normal float32: fused kernels multiply masked ``-inf`` scores by the scale as well."""
    if _F32.tiny <= scale <= _F32.max:
        return q, scale, 1.0
    return q * scale, 1.0, scale


# --- CPU ----------------------------------------------------------------------------------


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    """The CPU op reads the head dim as contiguous: copy only when it is not."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _band_bias(q: torch.Tensor, k_len: int, band: tuple[int, int]) -> torch.Tensor:
    """The band as the CPU op's additive ``attn_mask`` ``[Lq, Lk]`` (0 or ``-inf``, in q's
    dtype, which the op requires)."""
    keep = band_keeps(q.shape[-2], k_len, band, q.device)
    return torch.zeros(keep.shape, dtype=q.dtype, device=q.device).masked_fill_(~keep, float("-inf"))


def _cpu_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
    band: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = _unit_stride(q), _unit_stride(k), _unit_stride(v)
    bias = None if band is None else _band_bias(q, k.shape[-2], band)
    out, lse = aten._scaled_dot_product_flash_attention_for_cpu.default(
        q, k, v, 0.0, causal, attn_mask=bias, scale=scale
    )
    if band is not None:  # the op gives a row whose every key is masked out LSE 0
        _no_key_rows_(lse, k.shape[-2], band)
    return out, lse


def _no_key_rows_(lse: torch.Tensor, k_len: int, band: tuple[int, int]) -> None:
    """Set ``lse [..., Lq]`` to ``-inf`` in the rows that have no key in ``band``
    (:func:`~ring_attention.masks.band_rows`): the CPU op gives their outputs 0, as it
    should, but their LSE 0."""
    first, stop = band_rows(lse.shape[-1], k_len, band)
    lse[..., :first] = float("-inf")
    lse[..., stop:] = float("-inf")


def _cpu_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    causal: bool, scale: float, band: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dout, q, k, v, out = (_unit_stride(x) for x in (dout, q, k, v, out))
    bias = None
    if band is not None:  # the op's exp(s - lse) is NaN for a row without keys anywhere (-inf - -inf)
        bias, lse = _band_bias(q, k.shape[-2], band), _finite_shift(lse)
    # The CPU kernel reads the LSE through all three of its strides (it makes its own
    # rows-major, [B, L, H] in memory): unlike CUDA's, a strided view needs no copy.
    dq, dk, dv = aten._scaled_dot_product_flash_attention_for_cpu_backward.default(
        dout, q, k, v, out, lse, 0.0, causal, attn_mask=bias, scale=scale
    )
    return dq, dk, dv


# --- math ---------------------------------------------------------------------------------


def _row_chunks(q: torch.Tensor, k: torch.Tensor) -> list[tuple[int, int]]:
    """``(start, length)`` of query-row chunks whose float32 scores fit in MATH_SCORE_BYTES."""
    b, h, lq, _ = q.shape
    rows = max(1, MATH_SCORE_BYTES // max(b * h * k.shape[-2] * 4, 1))
    return [(i, min(rows, lq - i)) for i in range(0, lq, rows)]


def _math_probs(
    q: torch.Tensor, k: torch.Tensor, start: int, length: int, *, causal: bool, scale: float,
    lse: torch.Tensor | None = None, band: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Scores (or probabilities, given ``lse``) of ``length`` query rows in float32/64."""
    acc = torch.promote_types(q.dtype, torch.float32)
    s = torch.matmul(q.narrow(2, start, length).to(acc), k.to(acc).transpose(-1, -2)) * scale
    if causal:
        i = torch.arange(start, start + length, device=q.device).unsqueeze(1)
        j = torch.arange(k.shape[-2], device=q.device).unsqueeze(0)
        s = s.masked_fill(j > i, float("-inf"))
    if band is not None:
        keep = band_keeps(q.shape[-2], k.shape[-2], band, q.device).narrow(0, start, length)
        s = s.masked_fill(~keep, float("-inf"))
    return s if lse is None else torch.exp(s - _finite_shift(lse.narrow(2, start, length)).unsqueeze(-1))


def _finite_shift(lse: torch.Tensor) -> torch.Tensor:
    """``lse`` with ``-inf`` (a row whose scores are all ``-inf``) as 0: its probabilities
    are then ``exp(-inf) = 0``, as the fused kernels give, not ``-inf - -inf = NaN``."""
    return lse.masked_fill(lse == float("-inf"), 0.0)


def _math_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float,
    band: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    outs, lses = [], []
    for start, length in _row_chunks(q, k):
        s = _math_probs(q, k, start, length, causal=causal, scale=scale, band=band)
        lse = torch.logsumexp(s, dim=-1)
        outs.append(torch.matmul(torch.exp(s - _finite_shift(lse)[..., None]), v.to(s.dtype)).to(q.dtype))
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def _math_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    *, causal: bool, scale: float, band: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    acc = torch.promote_types(q.dtype, torch.float32)
    dq = torch.empty(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    for start, length in _row_chunks(q, k):
        p = _math_probs(q, k, start, length, causal=causal, scale=scale, lse=lse.to(acc), band=band)
        do = dout.narrow(2, start, length).to(acc)
        dv += torch.matmul(p.transpose(-1, -2), do)
        dp = torch.matmul(do, v.to(acc).transpose(-1, -2))
        delta = (do * out.narrow(2, start, length).to(acc)).sum(-1, keepdim=True)
        ds = p * (dp - delta) * scale
        dq.narrow(2, start, length).copy_(torch.matmul(ds, k.to(acc)))
        dk += torch.matmul(ds.transpose(-1, -2), q.narrow(2, start, length).to(acc))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
