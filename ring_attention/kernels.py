"""One attention block with its log-sum-exp: the fused kernel every variant calls.

Layout here is the fused ops' ``[B, H, L, D]``; the public functions use ``[B, N, H, D]``
and transpose (a free view) at the boundary. A block has as many key/value heads as
query heads: grouped-query callers expand kv heads first (:func:`expand_kv_heads`)
and fold the gradients back (:func:`fold_kv_heads`).

``causal`` here is the block-local, top-left aligned mask of a square diagonal block
(``j <= i`` in block coordinates). Which blocks are diagonal, full or skipped is the
caller's business: this module knows nothing of global positions.

Backends:

- CPU: ``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward
  (float16, bfloat16, float32, float64).
- CUDA, float16/bfloat16: ``aten._scaled_dot_product_flash_attention`` and its backward.
- anything else (CUDA float32): an exact math fallback that materializes the block's
  scores. It is correct but not fast.

The backward takes the *final* output and LSE of the query rows (after every merge),
not this block's own: then ``exp(s - lse)`` are the global probabilities and the
result is this block's exact share of the gradient of the merged attention.
"""

from __future__ import annotations

import torch

aten = torch.ops.aten


def _use_cuda_flash(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    """The fused ops read the head dim as contiguous: copy only when it is not."""
    return x if x.stride(-1) == 1 else x.contiguous()


def attention_forward(q, k, v, *, causal: bool, scale: float):
    """Attention of one block. Returns ``(out [B,H,L,D] in q.dtype, lse [B,H,L] float)``.

    ``lse`` is float32 (float64 for float64 inputs).
    """
    q, k, v = _unit_stride(q), _unit_stride(k), _unit_stride(v)
    if q.device.type == "cpu":
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=None, scale=scale
        )
        return out, lse
    if _use_cuda_flash(q):
        res = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
        return res[0], res[1]
    return _math_forward(q, k, v, causal=causal, scale=scale)


def attention_backward(dout, q, k, v, out, lse, *, causal: bool, scale: float):
    """Gradients ``(dq, dk, dv)`` of one block, given the rows' final ``out`` and ``lse``."""
    lse = lse.contiguous()
    dout, q, k, v, out = (_unit_stride(x) for x in (dout, q, k, v, out))
    if q.device.type == "cpu":
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, causal, attn_mask=None, scale=scale
        )
    if _use_cuda_flash(q):
        empty = torch.empty(0, dtype=torch.int64, device=q.device)
        return aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse, None, None, q.shape[2], k.shape[2], 0.0, causal,
            empty, empty, scale=scale,
        )[:3]
    return _math_backward(dout, q, k, v, out, lse, causal=causal, scale=scale)


def _math_scores(q, k, *, causal, scale):
    acc = torch.promote_types(q.dtype, torch.float32)
    s = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale
    if causal:
        lq, lk = s.shape[-2:]
        mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~mask, float("-inf"))
    return s


def _math_forward(q, k, v, *, causal, scale):
    s = _math_scores(q, k, causal=causal, scale=scale)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1))
    out = torch.matmul(p, v.to(p.dtype))
    return out.to(q.dtype), lse


def _math_backward(dout, q, k, v, out, lse, *, causal, scale):
    s = _math_scores(q, k, causal=causal, scale=scale)
    p = torch.exp(s - lse.unsqueeze(-1))
    acc = p.dtype
    do = dout.to(acc)
    dv = torch.matmul(p.transpose(-1, -2), do)
    dp = torch.matmul(do, v.to(acc).transpose(-1, -2))
    delta = (do * out.to(acc)).sum(-1, keepdim=True)
    ds = p * (dp - delta) * scale
    dq = torch.matmul(ds, k.to(acc))
    dk = torch.matmul(ds.transpose(-1, -2), q.to(acc))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def kv_head_index(num_heads: int, num_kv_heads: int, device=None) -> torch.Tensor:
    """``kv(h) = h // (H // Hkv)`` for every query head (grouped-query attention)."""
    return torch.arange(num_heads, device=device) // (num_heads // num_kv_heads)


def expand_kv_heads(x: torch.Tensor, num_heads: int, dim: int) -> torch.Tensor:
    """Repeat kv heads along ``dim`` so that query head ``h`` reads kv head ``kv(h)``."""
    groups = num_heads // x.shape[dim]
    return x if groups == 1 else x.repeat_interleave(groups, dim=dim)


def fold_kv_heads(dx: torch.Tensor, num_kv_heads: int, dim: int) -> torch.Tensor:
    """Sum the gradients of repeated kv heads back onto ``num_kv_heads`` heads."""
    h = dx.shape[dim]
    if h == num_kv_heads:
        return dx
    shape = dx.shape[:dim] + (num_kv_heads, h // num_kv_heads) + dx.shape[dim + 1 :]
    return dx.reshape(shape).sum(dim + 1)
