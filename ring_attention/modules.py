"""``torch.nn.Module`` wrappers around the functional API."""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from torch import nn

from . import pattern as _pattern
from .dilated import dilated_attention
from .ring_dilated import ring_dilated_attention


class DilatedAttention(nn.Module):
    """:func:`~ring_attention.dilated_attention` with its pattern and options held.

    ``forward(q, k, v)`` takes ``[B, N, H, D]`` / ``[B, N, Hkv, D]`` tensors.
    """

    def __init__(self, pattern, *, causal=False, scale=None, checkpoint=False):
        super().__init__()
        self.pattern = _pattern.as_pattern(pattern)
        self.causal, self.scale, self.checkpoint = causal, scale, checkpoint

    def forward(self, q, k, v):
        return dilated_attention(
            q, k, v, self.pattern, causal=self.causal, scale=self.scale, checkpoint=self.checkpoint
        )

    def extra_repr(self) -> str:
        return f"pattern={self.pattern}, causal={self.causal}, checkpoint={self.checkpoint}"


class RingDilatedAttention(nn.Module):
    """:func:`~ring_attention.ring_dilated_attention` holding its process group or ring size.

    With ``group`` set, ``forward`` takes and returns this rank's shard; with
    ``ring_size`` alone it simulates the ring on the whole sequence.
    """

    def __init__(
        self, pattern, *, group=None, ring_size=None, causal=False, scale=None,
        layout="contiguous", checkpoint=False,
    ):
        super().__init__()
        self.pattern = _pattern.as_pattern(pattern)
        self.group, self.ring_size = group, ring_size
        self.causal, self.scale, self.layout, self.checkpoint = causal, scale, layout, checkpoint

    def forward(self, q, k, v):
        return ring_dilated_attention(
            q, k, v, self.pattern, group=self.group, ring_size=self.ring_size, causal=self.causal,
            scale=self.scale, layout=self.layout, checkpoint=self.checkpoint,
        )

    def extra_repr(self) -> str:
        size = "group" if self.group is not None else f"ring_size={self.ring_size}"
        return f"pattern={self.pattern}, {size}, layout={self.layout!r}, causal={self.causal}"


class MultiheadDilatedAttention(nn.Module):
    """Multi-head dilated attention with input and output projections.

    Follows :class:`torch.nn.MultiheadAttention`'s habits: ``embed_dim``, ``num_heads``,
    ``bias``, ``batch_first`` (``[B, N, E]`` when true, ``[N, B, E]`` otherwise), and
    ``forward(query, key, value)`` returning ``(output, None)``. Attention weights are
    never materialized, so ``need_weights=True``, ``key_padding_mask`` and ``attn_mask``
    are rejected with a ``ValueError`` rather than silently ignored; use ``causal=True``
    for causal masking.

    Args:
        embed_dim: model width ``E``; must be divisible by ``num_heads``.
        num_heads: query heads ``H``.
        pattern: the :class:`~ring_attention.DilatedPattern`.
        num_kv_heads: key/value heads (grouped-query attention); ``num_heads`` by default.
        group, ring_size, layout: run as ring dilated attention (see
            :func:`~ring_attention.ring_dilated_attention`); a plain single-device
            dilated attention when both are ``None``.
        causal: as in :func:`~ring_attention.dilated_attention`.
        checkpoint: checkpoint the whole layer (projections and attention): backward
            recomputes it from the layer's inputs instead of storing its activations.
    """

    def __init__(
        self, embed_dim, num_heads, pattern, *, num_kv_heads=None, bias=True, batch_first=True,
        causal=False, checkpoint=False, group=None, ring_size=None, layout="contiguous",
        device=None, dtype=None,
    ):
        super().__init__()
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, int) or num_kv_heads <= 0:
            raise ValueError(f"num_kv_heads must be a positive integer, got {num_kv_heads!r}")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.batch_first = batch_first
        kv_dim = num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(embed_dim, kv_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(embed_dim, kv_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.checkpoint = checkpoint
        self.attention = RingDilatedAttention(
            pattern, group=group, ring_size=ring_size, causal=causal, layout=layout
        )

    def forward(
        self, query, key=None, value=None, key_padding_mask=None, need_weights=False,
        attn_mask=None,
    ):
        """``(output, None)``; ``key``/``value`` default to ``query`` (self-attention)."""
        if key_padding_mask is not None:
            raise ValueError("key_padding_mask is not supported: dilated attention takes no padding mask")
        if attn_mask is not None:
            raise ValueError("attn_mask is not supported: the pattern (and causal=True) define the mask")
        if need_weights:
            raise ValueError("need_weights=True is not supported: attention weights are never materialized")
        key = query if key is None else key
        value = key if value is None else value
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor) or t.dim() != 3 or t.shape[-1] != self.embed_dim:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name} must be a 3-d tensor with last dimension embed_dim={self.embed_dim}, got {shape}")
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        if self.checkpoint and torch.is_grad_enabled():
            # Checkpoint the whole layer: only its inputs are stored, and the projections
            # as well as the attention are recomputed in backward.
            out = torch.utils.checkpoint.checkpoint(self._layer, query, key, value, use_reentrant=False)
        else:
            out = self._layer(query, key, value)
        return (out if self.batch_first else out.transpose(0, 1)), None

    def _layer(self, query, key, value):
        b, n, _ = query.shape
        q = self.q_proj(query).view(b, n, self.num_heads, self.head_dim)
        k = self.k_proj(key).view(b, key.shape[1], self.num_kv_heads, self.head_dim)
        v = self.v_proj(value).view(b, value.shape[1], self.num_kv_heads, self.head_dim)
        a = self.attention(q, k, v)
        return self.out_proj(a.reshape(b, n, self.embed_dim))
