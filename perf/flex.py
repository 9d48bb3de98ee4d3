"""FlexAttention with a masked row's block mask: the second anchor of windows and documents.

PyTorch's own way to run a sliding window or packed documents is ``flex_attention`` with a
``BlockMask`` built from a ``mask_mod``: blocks the mask hides are skipped, as here. This
module builds that anchor for a registry row, written as users write it (``kv <= q`` for
causal, the band's two comparisons for a window, equal document ids for packed documents),
compiled as FlexAttention must be to run fused. Where it does not run it says why: torch has
no FlexAttention backward on CPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ring_attention.masks import SequenceMask

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def mask_mod(mask: SequenceMask, n: int, device: str | torch.device) -> Callable[..., torch.Tensor]:
    """The ``mask_mod(b, h, q_idx, kv_idx)`` of ``mask`` on ``n`` positions."""
    doc = None if mask.documents is None else mask.document_ids(torch.arange(n, device=device))
    left, right = mask.window if mask.window is not None else (-1, -1)

    def keep(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        kept = q_idx >= 0  # every key; a tensor of the indices' shape
        if mask.causal:
            kept = kept & (kv_idx <= q_idx)
        if left >= 0:
            kept = kept & (kv_idx >= q_idx - left)
        if right >= 0:
            kept = kept & (kv_idx <= q_idx + right)
        if doc is not None:
            kept = kept & (doc[q_idx] == doc[kv_idx])
        return kept

    return keep


def anchor(mask: SequenceMask, n: int, device: str, backward: bool) -> tuple[Attention | None, str]:
    """``(fn, note)``: compiled FlexAttention of ``[B, N, H, D]`` tensors under ``mask``, or
    ``(None, why)`` where it does not run."""
    if backward and device == "cpu":
        return None, "no FlexAttention backward on CPU"
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:  # pragma: no cover - torch < 2.5
        return None, "no torch.nn.attention.flex_attention in this torch"
    block_mask = create_block_mask(mask_mod(mask, n, device), None, None, n, n, device=device)
    compiled = torch.compile(flex_attention, dynamic=False)

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = compiled(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
                       enable_gqa=q.shape[2] != k.shape[2])
        return out.transpose(1, 2)

    return attend, "flex_attention+block_mask"
