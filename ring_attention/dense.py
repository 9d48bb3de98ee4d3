"""Full attention through torch's fused SDPA: the speed anchor every benchmark compares with."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .checks import check_flag, check_qkv, check_scale
from .kernels import CPU_FEW_KEYS, fold_scale
from .nonfinite import known_finite, quarantine_values, query_row_poison


def dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False, scale: float | None = None
) -> torch.Tensor:
    """Full (optionally causal) attention, ``W = 1`` or ``W = [j <= i]``.

    :param q: queries ``[B, N, H, D]``.
    :param k: keys ``[B, N, Hkv, D]`` with ``H % Hkv == 0``.
    :param v: values, shaped as ``k``.
    :param causal: keep only keys at or before the query.
    :param scale: score scale, ``1/sqrt(D)`` by default.
    :returns: ``[B, N, H, D]`` in the input dtype. Runs
        :func:`torch.nn.functional.scaled_dot_product_attention` (flash / efficient /
        CPU flash kernels) on ``[B, H, N, D]`` views; differentiable.
    :raises TypeError, ValueError: for malformed inputs.
    """
    _, _, h, hkv, d = check_qkv(q, k, v)
    scale = check_scale(scale, d)
    causal = check_flag(causal, "causal")
    q, scale, _ = fold_scale(q, scale)  # autograd carries the fold's factor into dq
    v = v.transpose(1, 2)
    if causal:
        v, poison = quarantine_values(v)  # a non-finite value shows in the rows attending it only
    # the CPU op returns 0, not NaN, for a row whose every score is NaN below CPU_FEW_KEYS keys
    few_keys = q.device.type == "cpu" and k.shape[1] < CPU_FEW_KEYS
    with sdpa_kernel([SDPBackend.MATH]) if few_keys else contextlib.nullcontext():
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v, is_causal=causal, scale=scale, enable_gqa=h != hkv
        )
    if causal and poison is not None:
        out = _add(out, poison.repeat_interleave(h // hkv, dim=1) if h != hkv else poison)
    # A query row holding inf can score -inf against every key, which the fused kernels
    # take for a row without keys (output 0); the math, and the reference, give NaN.
    if not known_finite(q):
        rows = query_row_poison(q.detach(), torch.promote_types(q.dtype, torch.float32)).mul_(0)  # 0 or NaN
        out = _add(out, rows.to(out.dtype).transpose(1, 2).unsqueeze(-1))
    return out.transpose(1, 2)


def _add(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``out + x``, in place unless autograd keeps ``out`` for SDPA's backward."""
    return out + x if out.requires_grad else out.add_(x)
