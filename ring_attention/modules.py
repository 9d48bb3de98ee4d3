"""``torch.nn.Module`` wrappers around the functional API.

Every constructor validates its arguments with the functional API's own checks and
messages, so a bad ``causal``, ``layout``, ``ring_size``, ``window`` or pattern fails where
the module is built, not at its first forward (or never: ``checkpoint='x'`` would read as
true). What a layer fixes (its pattern, causality, sliding window) is held; what changes
with every batch, the packed documents ``cu_seqlens``, is an argument of ``forward``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.utils.checkpoint
from torch import nn

from . import layout as _layout
from . import pattern as _pattern
from .checks import check_flag, check_optional_scale, check_positive_int, check_window
from .entry import attend


class _Held(nn.Module):
    """What every attention module holds, checked once: its pattern, causality, scale,
    checkpointing and sliding window."""

    def __init__(self, pattern: _pattern.DilatedPattern, causal: bool, scale: float | None, checkpoint: bool,
                 window: tuple[int, int] | None) -> None:
        super().__init__()
        self.pattern = _pattern.as_pattern(pattern)
        self.causal = check_flag(causal, "causal")
        self.scale = check_optional_scale(scale)
        self.checkpoint = check_flag(checkpoint, "checkpoint")
        self.window = check_window(window)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
        cu_seqlens: torch.Tensor | Sequence[int] | None = None,
    ) -> torch.Tensor:
        """The held attention of ``q [B, n, H, D]``, ``k``, ``v [B, n, Hkv, D]``; packed documents'
        ``cu_seqlens``, as the functional API takes them."""
        return attend(
            q, k, v, self.pattern, causal=self.causal, scale=self.scale, checkpoint=self.checkpoint,
            window=self.window, cu_seqlens=cu_seqlens, **self._ring(),
        )

    def _ring(self) -> dict[str, Any]:
        """Where the attention runs: one device (a ring of one)."""
        return {"ring_size": 1}


class DilatedAttention(_Held):
    """:func:`~ring_attention.dilated_attention` with its pattern and options held.

    ``forward(q, k, v, *, cu_seqlens=None)`` takes ``[B, N, H, D]`` / ``[B, N, Hkv, D]``
    tensors and, for packed documents, their ``cu_seqlens`` (SEMANTICS.md).

    :param pattern: the :class:`~ring_attention.DilatedPattern`.
    :param causal: keep only keys at or before the query.
    :param scale: score scale, ``1/sqrt(D)`` by default.
    :param checkpoint: recompute the forward in backward instead of storing activations.
    :param window: ``(left, right)``, a sliding window as in
        :func:`~ring_attention.dilated_attention`; ``None``: none.
    :raises TypeError, ValueError: at construction for a bad ``pattern``, ``causal``,
        ``scale``, ``checkpoint`` or ``window``, with the messages of the functional API.
    """

    def __init__(
        self, pattern: _pattern.DilatedPattern, *, causal: bool = False, scale: float | None = None,
        checkpoint: bool = False, window: tuple[int, int] | None = None,
    ) -> None:
        super().__init__(pattern, causal, scale, checkpoint, window)

    def extra_repr(self) -> str:
        window = "" if self.window is None else f", window={self.window}"
        return f"pattern={self.pattern}, causal={self.causal}{window}, checkpoint={self.checkpoint}"


def _check_group(group: dist.ProcessGroup | None, ring_size: int | None) -> dist.ProcessGroup | None:
    """``group`` must be a process group or ``None``; a given ``ring_size`` must be its size."""
    if group is None:
        return None
    if dist.is_available() and not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"group must be a torch.distributed ProcessGroup or None, got {type(group).__name__}"
        )
    if ring_size is not None and ring_size != group.size():
        raise ValueError(
            f"ring_size={ring_size} does not match the process group's size {group.size()}; "
            "pass one or the other"
        )
    return group


class RingDilatedAttention(_Held):
    """:func:`~ring_attention.ring_dilated_attention` holding its process group or ring size.

    With ``group`` set, ``forward`` takes and returns this rank's shard; with
    ``ring_size`` alone it simulates the ring on the whole sequence. ``forward(q, k, v, *,
    cu_seqlens=None)`` takes packed documents' ``cu_seqlens`` in global positions.

    :param pattern: the :class:`~ring_attention.DilatedPattern`.
    :param group: a ``torch.distributed`` process group, or ``None`` to simulate the ring.
    :param ring_size: ``R`` for the simulation; with ``group``, ``None`` or the group's size.
    :param causal: keep only keys at or before the query, in global positions.
    :param scale: score scale, ``1/sqrt(D)`` by default.
    :param layout: a :class:`~ring_attention.Layout`, or its name.
    :param checkpoint: recompute the forward in backward instead of storing activations.
    :param window: ``(left, right)``, a sliding window; ``None``: none.
    :raises TypeError, ValueError: at construction for a bad ``pattern``, ``group``,
        ``ring_size``, ``causal``, ``scale``, ``layout``, ``checkpoint`` or ``window``, with
        the messages of the functional API.
    """

    def __init__(
        self, pattern: _pattern.DilatedPattern, *, group: dist.ProcessGroup | None = None,
        ring_size: int | None = None, causal: bool = False, scale: float | None = None,
        layout: _layout.Layout | str = "contiguous", checkpoint: bool = False,
        window: tuple[int, int] | None = None,
    ) -> None:
        super().__init__(pattern, causal, scale, checkpoint, window)
        self.ring_size = None if ring_size is None else _layout.check_ring_size(ring_size)
        self.group = _check_group(group, self.ring_size)
        self.layout = _layout.check_layout(layout)

    def _ring(self) -> dict[str, Any]:
        return {"group": self.group, "ring_size": self.ring_size, "layout": self.layout}

    def extra_repr(self) -> str:
        size = "group" if self.group is not None else f"ring_size={self.ring_size}"
        window = "" if self.window is None else f", window={self.window}"
        return f"pattern={self.pattern}, {size}, layout={self.layout.value!r}, causal={self.causal}{window}"


class MultiheadDilatedAttention(nn.Module):
    """Multi-head dilated attention with input and output projections.

    Shaped like :class:`torch.nn.MultiheadAttention`: ``embed_dim``, ``num_heads``,
    ``bias``, ``batch_first``, and ``forward(query, key, value)`` returning
    ``(output, None)``. Attention weights are never materialized, so
    ``need_weights=True``, ``key_padding_mask`` and ``attn_mask`` are rejected with a
    ``ValueError`` rather than silently ignored; use ``causal=True`` for causal masking.

    ``batch_first`` has no default, on purpose: ``nn.MultiheadAttention`` defaults to
    ``False`` (``[N, B, E]``) while most long-context code is ``[B, N, E]``, and either
    default would silently misread the other layout whenever the shapes allow it. Say
    which one your tensors use.

    :param embed_dim: model width ``E``; must be divisible by ``num_heads``.
    :param num_heads: query heads ``H``.
    :param pattern: the :class:`~ring_attention.DilatedPattern`; a ``head_groups`` pattern
        needs at least as many heads as pairs.
    :param batch_first: required, keyword-only. ``True``: tensors are ``[B, N, E]``;
        ``False``: ``[N, B, E]`` (``nn.MultiheadAttention``'s default).
    :param num_kv_heads: key/value heads (grouped-query attention); ``num_heads`` by default.
    :param bias: projections with biases.
    :param causal: as in :func:`~ring_attention.dilated_attention`.
    :param window: ``(left, right)``, a sliding window, as in
        :func:`~ring_attention.dilated_attention` (transformers' ``sliding_window=S`` is
        ``window=(S - 1, 0)`` with ``causal=True``).
    :param checkpoint: checkpoint the whole layer (projections and attention): backward
        recomputes it from the layer's inputs instead of storing its activations.
    :param group: with ``ring_size`` and ``layout``, run as ring dilated attention (see
        :func:`~ring_attention.ring_dilated_attention`); a plain single-device dilated
        attention when ``group`` and ``ring_size`` are both ``None``, except inside a
        torch.distributed job of several processes, where that raises (pass ``ring_size=1``
        to mean it).
    :param ring_size: see ``group``.
    :param layout: see ``group``.
    :param device: of the projections' parameters.
    :param dtype: of the projections' parameters.
    :raises TypeError, ValueError: at construction for any bad argument, naming it.
    """

    def __init__(
        self, embed_dim: int, num_heads: int, pattern: _pattern.DilatedPattern, *, batch_first: bool,
        num_kv_heads: int | None = None, bias: bool = True, causal: bool = False, checkpoint: bool = False,
        window: tuple[int, int] | None = None, group: dist.ProcessGroup | None = None, ring_size: int | None = None,
        layout: _layout.Layout | str = "contiguous", device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        embed_dim = check_positive_int(embed_dim, "embed_dim")
        num_heads = check_positive_int(num_heads, "num_heads")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        num_kv_heads = num_heads if num_kv_heads is None else check_positive_int(num_kv_heads, "num_kv_heads")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        self.batch_first = check_flag(batch_first, "batch_first")
        bias = check_flag(bias, "bias")
        self.checkpoint = check_flag(checkpoint, "checkpoint")
        # The head count is known here, so a head_groups pattern with more pairs than
        # heads fails now rather than at the first forward.
        _pattern.as_pattern(pattern).heads_of_pair(num_heads)
        self.attention = RingDilatedAttention(
            pattern, group=group, ring_size=ring_size, causal=causal, layout=layout, window=window
        )
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        kv_dim = num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(embed_dim, kv_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(embed_dim, kv_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)

    def forward(
        self, query: torch.Tensor, key: torch.Tensor | None = None, value: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None, need_weights: bool = False, attn_mask: torch.Tensor | None = None,
        *, cu_seqlens: torch.Tensor | Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, None]:
        """``(output, None)``; ``key`` defaults to ``query`` and ``value`` to ``key``.

        ``cu_seqlens``: packed documents along the sequence dimension (SEMANTICS.md), or
        ``None``; with a ring, in global positions.

        ``query``, ``key`` and ``value`` are ``[B, N, E]`` (``batch_first=True``) or
        ``[N, B, E]``, with one batch size and one length: dilated attention selects keys
        by their positions in the query's sequence, so a key/value sequence of another
        length (cross-attention) is refused.
        """
        if key_padding_mask is not None:
            raise ValueError("key_padding_mask is not supported: dilated attention takes no padding mask")
        if attn_mask is not None:
            raise ValueError("attn_mask is not supported: the pattern (and causal=True) define the mask")
        if need_weights:
            raise ValueError("need_weights=True is not supported: attention weights are never materialized")
        key = query if key is None else key
        value = key if value is None else value
        self._check_inputs(query, key, value)
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        if self.checkpoint and torch.is_grad_enabled():
            # Checkpoint the whole layer: only its inputs are stored, and the projections
            # as well as the attention are recomputed in backward.
            out = cast(torch.Tensor, torch.utils.checkpoint.checkpoint(
                self._layer, query, key, value, cu_seqlens, use_reentrant=False))
        else:
            out = self._layer(query, key, value, cu_seqlens)
        return (out if self.batch_first else out.transpose(0, 1)), None

    def _check_inputs(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """Shapes against each other in the user's terms: batch, length, embed_dim."""
        dims = "[B, N, E]" if self.batch_first else "[N, B, E]"
        where = f"(batch_first={self.batch_first}: {dims})"
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 3 or t.shape[-1] != self.embed_dim:
                raise ValueError(
                    f"{name} must be a 3-d tensor {dims} with embed_dim={self.embed_dim} features "
                    f"{where}, got shape {tuple(t.shape)}"
                )
        if not (query.dtype == key.dtype == value.dtype):
            raise TypeError(f"query, key, value must share one dtype, got {query.dtype}, {key.dtype}, {value.dtype}")
        b_dim, n_dim = (0, 1) if self.batch_first else (1, 0)
        for name, t in (("key", key), ("value", value)):
            if t.shape[b_dim] != query.shape[b_dim]:
                raise ValueError(
                    f"{name} has batch size {t.shape[b_dim]} but query has {query.shape[b_dim]} {where}"
                )
        if value.shape[n_dim] != key.shape[n_dim]:
            raise ValueError(
                f"key and value must have the same length, got {key.shape[n_dim]} and "
                f"{value.shape[n_dim]} {where}"
            )
        if key.shape[n_dim] != query.shape[n_dim]:
            raise ValueError(
                f"key has length {key.shape[n_dim]} but query has length {query.shape[n_dim]} {where}: "
                "dilated attention needs keys of the query's length (cross-attention over a "
                "key/value sequence of another length is not supported)"
            )

    def _layer(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
        cu_seqlens: torch.Tensor | Sequence[int] | None,
    ) -> torch.Tensor:
        b, n, _ = query.shape
        q = self.q_proj(query).view(b, n, self.num_heads, self.head_dim)
        k = self.k_proj(key).view(b, n, self.num_kv_heads, self.head_dim)
        v = self.v_proj(value).view(b, n, self.num_kv_heads, self.head_dim)
        a = self.attention(q, k, v, cu_seqlens=cu_seqlens)
        out: torch.Tensor = self.out_proj(a.reshape(b, n, self.embed_dim))
        return out
