"""Masks as data: which keys a query may see, and what that makes of a block of the plan.

Two levels, as ``flex_attention`` separates a ``mask_mod`` from its ``BlockMask``:

- the **sequence mask** (:class:`SequenceMask`) is a predicate on global positions
  ``(i, j)``, multiplied into the pattern's weights ``W`` (SEMANTICS.md). Today it is
  full or causal (``j <= i``), with or without a band (a sliding window), within packed
  documents or not (a query sees only keys of its own document).
- a **block mask** (:class:`BlockMask`, or a :class:`Band`) is what one kernel call applies
  inside a block of packed rows: every key (``FULL``), the block-local lower triangle of a
  square block (``CAUSAL``), or the diagonal band a sliding window cuts (:class:`Band`,
  on packed indices). :meth:`SequenceMask.block` classifies a pair of runs: the
  block mask it needs, or ``None`` where the sequence mask hides every key (the block is
  never computed, and on a ring its keys are never sent).

The planner (:mod:`ring_attention.plans`) asks only :meth:`SequenceMask.block`, the oracle
(:func:`ring_attention.pattern.weights`) only :meth:`SequenceMask.keeps`: a new mask is
one change here, checked against the oracle by the same tests. :func:`band_keeps` spells a
band out as a dense boolean block for the kernels that take a mask (the CPU op, math).
"""

from __future__ import annotations

import bisect
import dataclasses
import enum

import torch


class BlockMask(enum.Enum):
    """The mask a kernel call applies inside its block."""

    FULL = "full"  # every key of the block
    # block-local key j <= query i + Lk - Lq: the lower triangle aligned bottom-right. The plan's
    # diagonal blocks are square; the forward runs a long one in row chunks against the keys up
    # to each chunk's last row (schedule.causal_chunks), which is why it aligns bottom-right.
    CAUSAL = "causal"


@dataclasses.dataclass(frozen=True)
class Band:
    """A block cut by a sliding window: packed query ``a`` sees packed key ``b`` when
    ``lo <= b - a <= hi`` (causal folded in). ``lo``/``hi`` are clamped to the block
    (``-(Lq - 1) <= lo <= hi <= Lk - 1``), so equal blocks carry equal bands. Rows with no
    key in the band (at either end of the block) give out 0 and LSE ``-inf``."""

    lo: int
    hi: int


# What one kernel call applies inside its block.
KernelMask = BlockMask | Band


def kept_cells(mask: KernelMask, q_len: int, k_len: int) -> int:
    """How many (query, key) cells of a ``q_len x k_len`` block ``mask`` keeps: all of them
    (``FULL``), the lower triangle of a square block (``CAUSAL``), a band's diagonal stripe."""
    if mask is BlockMask.FULL:
        return q_len * k_len
    if mask is BlockMask.CAUSAL:
        return q_len * (q_len + 1) // 2 + q_len * (k_len - q_len)
    assert isinstance(mask, Band)
    # row a keeps keys max(0, a + lo) .. min(k_len - 1, a + hi)
    return sum(max(0, min(k_len - 1, a + mask.hi) - max(0, a + mask.lo) + 1) for a in range(q_len))


def band_bounds(mask: KernelMask) -> tuple[int, int] | None:
    """A block mask's band as the kernels take it (``band=(lo, hi)``), or ``None``."""
    return (mask.lo, mask.hi) if isinstance(mask, Band) else None


@dataclasses.dataclass(frozen=True)
class SequenceMask:
    """Which keys each query may see, on global positions (before the pattern's weights).

    :param causal: keep only keys at or before the query (``j <= i``).
    :param window: ``(left, right)``, flash-attn's sliding window: keep key ``j`` for query
        ``i`` when ``i - left <= j <= i + right``, a side of ``-1`` unbounded; ``None``: no
        window.
    :param documents: ``cu_seqlens``, the document starts ``0 = c_0 < ... < c_D = N``: keep
        key ``j`` for query ``i`` only in the same document; ``None``: one document. (A
        dilated pattern also restarts at every start: the planner's segments and the oracle's
        weights take that from here, :meth:`DilatedPattern.segment_bounds`.)
    """

    causal: bool = False
    window: tuple[int, int] | None = None
    documents: tuple[int, ...] | None = None

    @staticmethod
    def of(mask: SequenceMask | bool) -> SequenceMask:
        """``mask`` itself, or for a bool the causal (``True``) or full mask."""
        return mask if isinstance(mask, SequenceMask) else SequenceMask(causal=bool(mask))

    @property
    def keeps_all(self) -> bool:
        """Whether every query sees every key (the mask changes nothing)."""
        return not self.causal and self.window is None and self.documents is None

    @property
    def reach(self) -> tuple[int, int]:
        """How far from a query its keys may lie, ``(left, right)`` (``-1``: unbounded), with
        causality folded in: the right side is 0 under a causal mask."""
        left, right = self.window if self.window is not None else (-1, -1)
        return left, 0 if self.causal else right

    def document(self, position: int) -> int:
        """The index ``d`` of the document holding ``position`` (``c_d <= position < c_{d+1}``)."""
        return 0 if self.documents is None else bisect.bisect_right(self.documents, position) - 1

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
        if self.documents is not None:
            keep &= self.document_ids(q_pos)[:, None] == self.document_ids(k_pos)[None, :]
        return keep

    def document_ids(self, positions: torch.Tensor) -> torch.Tensor:
        """The index ``d`` of each position's document (:meth:`document` for a tensor): 0 for all
        without documents."""
        if self.documents is None:
            return torch.zeros_like(positions)
        starts = torch.tensor(self.documents[1:-1], dtype=positions.dtype, device=positions.device)
        return torch.searchsorted(starts, positions, right=True)

    def block(
        self, q_first: int, q_last: int, k_first: int, k_last: int, rate: int, *, diagonal: bool
    ) -> KernelMask | None:
        """The block mask of query run against key run, or ``None``: no key is seen.

        Runs are increasing positions of one segment, ``first, first + rate, ..., last``
        (``rate`` is the pair's dilation rate, 1 for full attention). ``diagonal``: the key
        run is the query run itself (a square block); otherwise the two runs share no
        position, so one lies wholly before the other. Without a window only the firsts
        matter (a causal diagonal block may then be two joined runs, see the planner).
        Runs of different documents never meet (``None``); the planner's segments never
        cross a document start, so each run lies in one document.

        With a window ``(left, right)``, positions ``i = q_first + rate * a`` and
        ``j = k_first + rate * b`` give ``j - i = k_first - q_first + rate * (b - a)``: each
        bound of the band (and causal's ``j <= i``) is a bound on ``b - a``. Every pair kept:
        ``FULL``; the lower triangle of a square block: ``CAUSAL``; none: ``None``; else a
        :class:`Band`.
        """
        if self.documents is not None and self.document(q_first) != self.document(k_first):
            return None
        if self.window is None:
            if diagonal:
                return BlockMask.CAUSAL if self.causal else BlockMask.FULL
            if not self.causal or k_first < q_first:
                return BlockMask.FULL
            return None
        left, right = self.window
        q_len, k_len = (q_last - q_first) // rate + 1, (k_last - k_first) // rate + 1
        d = k_first - q_first
        lo, hi = -(q_len - 1), k_len - 1  # b - a over the whole block
        if left >= 0:  # d + rate * (b - a) >= -left
            lo = max(lo, -((left + d) // rate))
        if right >= 0:  # d + rate * (b - a) <= right
            hi = min(hi, (right - d) // rate)
        if self.causal:  # d + rate * (b - a) <= 0
            hi = min(hi, -d // rate)
        if lo > hi:
            return None
        if lo == -(q_len - 1) and hi == k_len - 1:
            return BlockMask.FULL
        if q_len == k_len and lo == -(q_len - 1) and hi == 0:
            return BlockMask.CAUSAL
        return Band(lo, hi)


def band_rows(q_len: int, k_len: int, band: tuple[int, int]) -> tuple[int, int]:
    """``(first, stop)``: the query rows of a ``q_len x k_len`` block that have a key in ``band``
    (``i + lo <= j <= i + hi`` for some ``0 <= j < k_len``), both within ``[0, q_len]``; the rows
    before ``-hi`` and from ``k_len - lo`` on have none (``first >= stop``: no row has one)."""
    lo, hi = band
    return min(max(-hi, 0), q_len), max(min(k_len - lo, q_len), 0)


def band_keeps(q_len: int, k_len: int, band: tuple[int, int], device: torch.device) -> torch.Tensor:
    """``[q_len, k_len]`` bool: block-local key ``j`` kept for query ``i`` (``lo <= j - i <= hi``)."""
    d = torch.arange(k_len, device=device)[None, :] - torch.arange(q_len, device=device)[:, None]
    return (d >= band[0]) & (d <= band[1])
