"""Masks as data: which keys a query may see, and what that makes of a block of the plan.

Two levels, as ``flex_attention`` separates a ``mask_mod`` from its ``BlockMask``:

- the **sequence mask** (:class:`SequenceMask`) is a predicate on global positions
  ``(i, j)``, multiplied into the pattern's weights ``W`` (SEMANTICS.md). Today it is
  full or causal (``j <= i``); a band (sliding window) and document boundaries are the
  fields it will grow (see docs/ARCHITECTURE.md).
- a **block mask** (:class:`BlockMask`) is what one kernel call applies inside a block of
  packed rows: every key (``FULL``) or the block-local lower triangle of a square
  diagonal block (``CAUSAL``). :meth:`SequenceMask.block` classifies a pair of runs: the
  block mask it needs, or ``None`` where the sequence mask hides every key (the block is
  never computed, and on a ring its keys are never sent).

The planner (:mod:`ring_attention.plans`) asks only :meth:`SequenceMask.block`, the oracle
(:func:`ring_attention.pattern.weights`) only :meth:`SequenceMask.keeps`: a new mask is
one change here, checked against the oracle by the same tests.
"""

from __future__ import annotations

import dataclasses
import enum

import torch


class BlockMask(enum.Enum):
    """The mask a kernel call applies inside its block."""

    FULL = "full"  # every key of the block
    CAUSAL = "causal"  # a square diagonal block: block-local key j <= query i


@dataclasses.dataclass(frozen=True)
class SequenceMask:
    """Which keys each query may see, on global positions (before the pattern's weights).

    :param causal: keep only keys at or before the query (``j <= i``).
    :param window: ``(left, right)``, flash-attn's sliding window: keep key ``j`` for query
        ``i`` when ``i - left <= j <= i + right``, a side of ``-1`` unbounded; ``None``: no
        window. The oracle honours it; the planner does not yet (:meth:`block` refuses it).
    """

    causal: bool = False
    window: tuple[int, int] | None = None

    @staticmethod
    def of(mask: SequenceMask | bool) -> SequenceMask:
        """``mask`` itself, or for a bool the causal (``True``) or full mask."""
        return mask if isinstance(mask, SequenceMask) else SequenceMask(causal=bool(mask))

    @property
    def keeps_all(self) -> bool:
        """Whether every query sees every key (the mask changes nothing)."""
        return not self.causal and self.window is None

    def keeps(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """``[len(q_pos), len(k_pos)]`` bool: whether query position ``i`` may see key ``j``."""
        keep = torch.ones(len(q_pos), len(k_pos), dtype=torch.bool, device=q_pos.device)
        if self.causal:
            keep &= k_pos[None, :] <= q_pos[:, None]
        if self.window is not None:
            left, right = self.window
            if left >= 0:
                keep &= k_pos[None, :] >= q_pos[:, None] - left
            if right >= 0:
                keep &= k_pos[None, :] <= q_pos[:, None] + right
        return keep

    def block(self, q_first: int, k_first: int, *, diagonal: bool) -> BlockMask | None:
        """The block mask of query run against key run, or ``None``: no key is seen.

        Runs are increasing positions of one segment. ``diagonal``: the key run is the query
        run itself (a square block); otherwise the two runs share no position, so one lies
        wholly before the other and ``q_first``/``k_first`` say which.
        """
        if self.window is not None:
            raise NotImplementedError("the planner does not plan sliding windows yet")
        if diagonal:
            return BlockMask.CAUSAL if self.causal else BlockMask.FULL
        if not self.causal or k_first < q_first:
            return BlockMask.FULL
        return None
