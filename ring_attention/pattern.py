"""Dilated attention patterns (LongNet) as data, plus the pure mask functions they define.

A :class:`DilatedPattern` is a list of ``(segment_length, dilation_rate)`` pairs and a
mode saying how the pairs combine. Everything here is plain index arithmetic on global
positions: the mask functions are small, pure and composable (in the spirit of
attention-gym), and both the dense reference and the fast kernels derive their
selections from them, so the two cannot drift apart.

See ``SEMANTICS.md`` for the contract; in short, for pair ``k`` with effective segment
length ``w' = min(w, N)`` and rate ``r``, head ``h`` keeps position ``p`` when
``(p mod w') mod r == h mod r``, and a query attends to a key when both are kept and lie
in the same segment.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping
from collections.abc import Set as AbstractSet

import torch

from .checks import NamedEnum, check_positive_int
from .masks import SequenceMask


class Mode(NamedEnum):
    """How a pattern's pairs share the heads. Patterns also take the plain strings."""

    MIXTURE = "mixture"  # every head runs every pair; their results mix by softmax denominators
    HEAD_GROUPS = "head_groups"  # heads split into K contiguous groups, group k runs pair k


def _int_sequence(value: object, name: str) -> tuple[object, ...]:
    """A tuple, list, range, 1-d integer tensor or 1-d array as a tuple of its elements.

    Mappings and sets are refused: their iteration order says nothing about which
    segment length pairs with which dilation rate (a dict would silently give its keys).
    """
    if (
        isinstance(value, (str, bytes, Mapping, AbstractSet))
        or not hasattr(value, "__iter__")
        or getattr(value, "ndim", 1) != 1  # tensors and arrays: 1-d only
    ):
        raise TypeError(
            f"{name} must be a sequence of integers (tuple, list, or 1-d tensor), "
            f"got {value!r} ({type(value).__name__})"
        )
    return tuple(value)


@dataclasses.dataclass(frozen=True)
class DilatedPattern:
    """Segment lengths and dilation rates of LongNet dilated attention.

    :param segment_lengths: ``w_k``, positive integers, one per pair: a tuple, list, range or
        1-d integer tensor of Python ints, numpy integers or 0-d integer tensors
        (stored as a tuple of ints). Mappings and sets are refused.
    :param dilation_rates: ``r_k``, positive integers with ``r_k <= w_k``, one per pair, in
        the same forms. ``r_k`` need not divide ``w_k``.
    :param mode: a :class:`Mode` or its name: ``"mixture"`` (every head runs every pair; the
        pairs' results are mixed by their softmax denominators, as in the LongNet paper)
        or ``"head_groups"`` (heads are split into ``K`` contiguous groups and group
        ``k`` runs pair ``k``). Stored as a :class:`Mode`.
    :raises TypeError: naming the offending field for a wrong type (a float or bool entry, a
        dict, a 2-d tensor).
    :raises ValueError: for a wrong value (and an unknown mode).
    """

    segment_lengths: tuple[int, ...]
    dilation_rates: tuple[int, ...]
    mode: Mode | str = Mode.MIXTURE

    def __post_init__(self) -> None:
        given_ws = _int_sequence(self.segment_lengths, "segment_lengths")
        given_rs = _int_sequence(self.dilation_rates, "dilation_rates")
        if len(given_ws) == 0:
            raise ValueError("segment_lengths is empty: a pattern needs at least one (w, r) pair")
        if len(given_ws) != len(given_rs):
            raise ValueError(
                f"segment_lengths has {len(given_ws)} entries but dilation_rates has {len(given_rs)}: "
                "they must pair up one to one"
            )
        ws = tuple(check_positive_int(w, f"segment_lengths[{i}]") for i, w in enumerate(given_ws))
        rs = tuple(check_positive_int(r, f"dilation_rates[{i}]") for i, r in enumerate(given_rs))
        for i, (w, r) in enumerate(zip(ws, rs)):
            if r > w:
                raise ValueError(f"dilation_rates[{i}] = {r} exceeds segment_lengths[{i}] = {w}")
        object.__setattr__(self, "mode", Mode.named(self.mode, "mode"))
        object.__setattr__(self, "segment_lengths", ws)
        object.__setattr__(self, "dilation_rates", rs)

    @property
    def num_pairs(self) -> int:
        return len(self.segment_lengths)

    def effective_segment_lengths(self, seq_len: int) -> tuple[int, ...]:
        """``w'_k = min(w_k, N)``; raises ``ValueError`` unless ``N % w'_k == 0`` for every ``k``."""
        out = []
        for w in self.segment_lengths:
            w_eff = min(w, seq_len)
            if seq_len % w_eff:
                raise ValueError(
                    f"sequence length N={seq_len} is not divisible by segment length w={w}: "
                    "every effective segment length min(w, N) must divide N"
                )
            out.append(w_eff)
        return tuple(out)

    def segment_bounds(self, seq_len: int, documents: tuple[int, ...] | None = None) -> tuple[tuple[int, ...], ...]:
        """Per pair, where its segments start, followed by ``N``: segment ``m`` of pair ``k`` is
        ``[bounds[k][m], bounds[k][m + 1])``.

        Without documents the segments are ``w'_k = min(w_k, N)`` long. With ``documents``
        (``cu_seqlens``, SEMANTICS.md) the pattern restarts at every document start: document
        ``d`` of length ``L_d`` is cut into segments of ``min(w_k, L_d)``.

        :raises ValueError: unless every effective segment length divides its sequence
            (``N``, or the document it cuts, which is then named).
        """
        if documents is None:
            return tuple(tuple(range(0, seq_len + 1, w)) for w in self.effective_segment_lengths(seq_len))
        out = []
        for w in self.segment_lengths:
            bounds: list[int] = []
            for d, (start, stop) in enumerate(zip(documents, documents[1:])):
                length = stop - start
                w_eff = min(w, length)
                if length % w_eff:
                    raise ValueError(
                        f"document {d} (positions [{start}, {stop}) of cu_seqlens, length {length}) is not "
                        f"divisible by segment length w={w}: the pattern restarts at every document, so "
                        "min(w, document length) must divide each document's length"
                    )
                bounds.extend(range(start, stop, w_eff))
            bounds.append(seq_len)
            out.append(tuple(bounds))
        return tuple(out)

    def heads_of_pair(self, num_heads: int) -> tuple[range, ...]:
        """The query heads that run each pair: all of them (mixture) or pair ``k``'s group."""
        if self.mode is Mode.MIXTURE:
            return tuple(range(num_heads) for _ in self.segment_lengths)
        k = self.num_pairs
        if num_heads < k:
            raise ValueError(
                f"head_groups mode needs at least as many heads as pairs: H={num_heads} < K={k}"
            )
        return tuple(range(i * num_heads // k, (i + 1) * num_heads // k) for i in range(k))

    def check(self, seq_len: int, num_heads: int, documents: tuple[int, ...] | None = None) -> None:
        """Validate this pattern against a sequence length, a head count and documents."""
        # With documents, segments restart per document and the per-document rule replaces N % w.
        self.segment_bounds(seq_len, documents)
        self.heads_of_pair(num_heads)


def as_pattern(pattern: object) -> DilatedPattern:
    if not isinstance(pattern, DilatedPattern):
        raise TypeError(f"pattern must be a ring_attention.DilatedPattern, got {type(pattern).__name__}")
    return pattern


# --- mask functions: pure, on global positions --------------------------------------------


def head_offset(head: int, rate: int) -> int:
    """The paper's rule: head ``h`` keeps the positions congruent to ``h mod r``."""
    return head % rate


def selected(positions: torch.Tensor, segment: int, rate: int, offset: int) -> torch.Tensor:
    """``sel(h, p)``: whether positions are kept by a head with this offset."""
    return (positions % segment) % rate == offset


def kept_positions(segment_start: int, segment_stop: int, rate: int, offset: int, start: int, stop: int) -> range:
    """The positions of the segment ``[segment_start, segment_stop)`` within ``[start, stop)``
    that a head with this offset keeps (:func:`selected`, on positions local to the segment),
    as the progression the planner packs."""
    first = segment_start + offset
    if first < start:
        first += -(-(start - first) // rate) * rate
    end = min(segment_stop, stop)
    return range(first, max(first, end), rate)


def same_segment(q_pos: torch.Tensor, k_pos: torch.Tensor, segment: int) -> torch.Tensor:
    return (q_pos[:, None] // segment) == (k_pos[None, :] // segment)


def pair_mask(
    q_pos: torch.Tensor, k_pos: torch.Tensor, segment: int, rate: int, offset: int
) -> torch.Tensor:
    """``M_k[h]`` without causality: both positions kept and in the same segment."""
    keep_q = selected(q_pos, segment, rate, offset)
    keep_k = selected(k_pos, segment, rate, offset)
    return same_segment(q_pos, k_pos, segment) & keep_q[:, None] & keep_k[None, :]


def weights(
    pattern: DilatedPattern | None,
    seq_len: int,
    num_heads: int,
    *,
    is_causal: bool = False,
    rows: torch.Tensor | None = None,
    window: tuple[int, int] | None = None,
    documents: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """The explicit integer weights ``W[h, i, j]`` of SEMANTICS.md, shape ``[H, N, N]``.

    ``is_causal`` and ``window`` (``(left, right)``, see
    :class:`~ring_attention.masks.SequenceMask`) restrict the pattern's weights to the keys
    they keep. ``documents`` (``cu_seqlens``): built literally as the contract says, each
    document's weights those of the pattern on that document alone, zero across documents.

    ``rows``: the query positions ``i`` to build (a 1-d integer tensor), giving
    ``[H, len(rows), N]``: a sample of rows of a long sequence costs ``H * len(rows) * N``.

    Memory is ``H * N * N``: for the reference and tests only.
    """
    pos = torch.arange(seq_len)
    q_pos = pos if rows is None else rows.to(pos.device)
    if documents is not None:
        w = torch.zeros(num_heads, len(q_pos), seq_len, dtype=torch.int64)
        for start, stop in zip(documents, documents[1:]):
            inside = ((q_pos >= start) & (q_pos < stop)).nonzero().flatten()
            # a window or causality is on differences of positions: the same on local ones
            w[:, inside, start:stop] = weights(pattern, stop - start, num_heads, is_causal=is_causal,
                                               rows=q_pos[inside] - start, window=window)
        return w
    if pattern is None:
        w = torch.ones(num_heads, len(q_pos), seq_len, dtype=torch.int64)
    else:
        w = torch.zeros(num_heads, len(q_pos), seq_len, dtype=torch.int64)
        segments = pattern.effective_segment_lengths(seq_len)
        for seg, rate, heads in zip(segments, pattern.dilation_rates, pattern.heads_of_pair(num_heads)):
            for h in heads:
                w[h] += pair_mask(q_pos, pos, seg, rate, head_offset(h, rate))
    mask = SequenceMask(causal=is_causal, window=window)
    return w if mask.keeps_all else w * mask.keeps(q_pos, pos)


def computed_pairs(
    pattern: DilatedPattern | None, seq_len: int, num_heads: int, *, is_causal: bool = False,
    window: tuple[int, int] | None = None, documents: tuple[int, ...] | None = None,
) -> int:
    """How many (head, query, key) score entries a kernel computes, summed over pairs.

    This is the effective work of the fast path (a key covered by two pairs is computed
    twice in mixture mode), counted in closed form without building ``W``: the sum of
    ``W``. Causal blocks count their lower triangle including the diagonal. With a
    ``window`` or ``documents``, the pairs they keep: full attention row by row; a pattern
    per segment (restarting at every document), whose kept rows ``r`` apart see the window
    ``(left // r, right // r)`` in kept rows.
    """
    if window is not None or documents is not None:
        if pattern is None:
            return num_heads * _kept_pairs(seq_len, is_causal, window, documents)
        return _masked_pattern_pairs(pattern, seq_len, num_heads, is_causal, window, documents)
    if pattern is None:
        per = seq_len * (seq_len + 1) // 2 if is_causal else seq_len * seq_len
        return num_heads * per
    total = 0
    segments = pattern.effective_segment_lengths(seq_len)
    for seg, rate, heads in zip(segments, pattern.dilation_rates, pattern.heads_of_pair(num_heads)):
        for h in heads:
            o = head_offset(h, rate)
            m = len(range(o, seg, rate))  # rows kept per segment
            per = m * (m + 1) // 2 if is_causal else m * m
            total += (seq_len // seg) * per
    return total


def _masked_pattern_pairs(pattern: DilatedPattern, seq_len: int, num_heads: int, causal: bool,
                          window: tuple[int, int] | None, documents: tuple[int, ...] | None) -> int:
    """:func:`computed_pairs` of a pattern under a window or documents: per pair, head and
    segment, the kept rows ``o, o + r, ...`` of the segment pair up as full attention on
    ``m`` rows does under the window in kept rows (``-1`` stays unbounded)."""
    left, right = window or (-1, -1)
    in_rows = (left // rate if left >= 0 else -1 for rate in pattern.dilation_rates)
    total = 0
    for bounds, rate, heads, row_left in zip(pattern.segment_bounds(seq_len, documents), pattern.dilation_rates,
                                             pattern.heads_of_pair(num_heads), in_rows):
        row_window = (row_left, right // rate if right >= 0 else -1)
        lengths = collections.Counter(b - a for a, b in zip(bounds, bounds[1:]))
        for h in heads:
            o = head_offset(h, rate)
            for length, count in lengths.items():
                m = len(range(o, length, rate))
                total += count * _kept_pairs(m, causal, row_window, None) if m else 0
    return total


def _kept_pairs(seq_len: int, causal: bool, window: tuple[int, int] | None, documents: tuple[int, ...] | None) -> int:
    """The (query, key) pairs full attention keeps under causality, a window and documents,
    row by row: keys ``[max(start, i - left), min(stop - 1, i + right, i if causal)]`` of the
    query's document ``[start, stop)``."""
    bounds = documents or (0, seq_len)
    left, right = window or (-1, -1)
    total = 0
    for start, stop in zip(bounds, bounds[1:]):
        i = torch.arange(start, stop, dtype=torch.int64)
        lo = torch.full_like(i, start) if left < 0 else (i - left).clamp(min=start)
        hi = torch.full_like(i, stop - 1)
        if right >= 0:
            hi = torch.minimum(hi, i + right)
        if causal:
            hi = torch.minimum(hi, i)
        total += int((hi - lo + 1).clamp(min=0).sum())
    return total
