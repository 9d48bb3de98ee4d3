"""How a global sequence is laid out over the ranks of a ring.

- ``contiguous``: rank ``r`` holds positions ``[r*N/R, (r+1)*N/R)``.
- ``zigzag``: the sequence is cut into ``2R`` chunks; rank ``r`` holds chunk ``r`` then
  chunk ``2R-1-r``, which balances causal work across ranks.
- ``documents``: the sequence is cut into ``8R`` chunks, dealt to the ranks by their
  causal work within packed documents (``cu_seqlens``), so that each rank attends about
  as many pairs as any other, whatever the documents' lengths (SEMANTICS.md).

A shard is described by its *intervals* of global positions, in the order the rank
stores them. Within a shard, positions increase with the local row index in every
layout, which the causal block logic relies on.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from .checks import NamedEnum, check_documents, check_positive_int


class Layout(NamedEnum):
    """How a ring's ranks hold the sequence. Public functions also take the plain strings."""

    CONTIGUOUS = "contiguous"
    ZIGZAG = "zigzag"
    DOCUMENTS = "documents"


# Chunks per rank of the documents layout: 8 balance 64 long-tailed documents to within
# 1.2% on rings of 2 to 8 (4 chunks: 12%; zigzag's 2: a factor 2 to 4), while every
# chunk is one more interval, so one more run per segment, for the planner.
DOCUMENT_CHUNKS = 8


def check_layout(layout: object) -> Layout:
    """``layout`` (a :class:`Layout` or its name) as a :class:`Layout`; ``ValueError``
    listing the layouts for anything else."""
    return Layout.named(layout, "layout")


def check_ring_size(ring_size: object) -> int:
    """``ring_size`` as an int (``None`` means 1).

    Accepts a Python int, a numpy integer or a 0-d integer tensor; ``TypeError`` for
    anything else (a float, a bool), ``ValueError`` below 1.
    """
    if ring_size is None:
        return 1
    return check_positive_int(ring_size, "ring_size")


def chunks_per_rank(layout: Layout | str) -> int:
    return {Layout.CONTIGUOUS: 1, Layout.ZIGZAG: 2, Layout.DOCUMENTS: DOCUMENT_CHUNKS}[check_layout(layout)]


def check_divisible(seq_len: int, ring_size: int, layout: Layout | str) -> None:
    """``ValueError`` naming ``N``, ``R`` and the layout unless the layout can shard ``N``."""
    layout = check_layout(layout)
    per = chunks_per_rank(layout)
    if seq_len % (ring_size * per):
        raise ValueError(
            f"sequence length N={seq_len} must be divisible by {ring_size * per} "
            f"({'' if per == 1 else per}R) for ring size R={ring_size} "
            f"with the {layout} layout"
        )


def shard_intervals(
    seq_len: int, ring_size: int, rank: int, layout: Layout | str, documents: tuple[int, ...] | None = None,
) -> tuple[tuple[int, int], ...]:
    """The ``(start, stop)`` global position ranges rank ``rank`` holds, in storage order.

    ``documents``: the checked ``cu_seqlens`` the ``documents`` layout deals chunks by
    (``None``: one document); the other layouts ignore them.

    Raises:
        ValueError unless ``seq_len`` divides into the layout's equal chunks.
    """
    layout = check_layout(layout)
    check_divisible(seq_len, ring_size, layout)
    if not 0 <= rank < ring_size:
        raise ValueError(f"rank {rank} is outside a ring of size R={ring_size}")
    c = seq_len // (ring_size * chunks_per_rank(layout))
    return tuple((ch * c, (ch + 1) * c) for ch in _chunks(seq_len, ring_size, layout, _dealt_by(layout, documents))[rank])


def holders(seq_len: int, ring_size: int, layout: Layout, start: int, stop: int,
            documents: tuple[int, ...] | None = None) -> set[int]:
    """The ranks holding any of the global positions ``[start, stop)`` (arguments checked by
    the caller: the planner asks this for every segment of every rank)."""
    c = seq_len // (ring_size * chunks_per_rank(layout))
    owner = _owners(seq_len, ring_size, layout, _dealt_by(layout, documents))
    return {owner[ch] for ch in range(start // c, (stop - 1) // c + 1)}


def _dealt_by(layout: Layout, documents: tuple[int, ...] | None) -> tuple[int, ...] | None:
    """The documents a layout deals its chunks by: only the documents layout's (so the other
    layouts' cached chunks serve every packing)."""
    return documents if layout is Layout.DOCUMENTS else None


def clear() -> None:
    """Drop the cached chunks of each rank (:func:`ring_attention.executable.clear` calls this)."""
    _chunks.cache_clear()
    _owners.cache_clear()


@functools.lru_cache(maxsize=256)
def _chunks(seq_len: int, ring_size: int, layout: Layout,
            documents: tuple[int, ...] | None) -> tuple[tuple[int, ...], ...]:
    """Per rank, the indices of the equal chunks it holds, ascending."""
    if layout is Layout.CONTIGUOUS:
        return tuple((r,) for r in range(ring_size))
    if layout is Layout.ZIGZAG:
        return tuple((r, 2 * ring_size - 1 - r) for r in range(ring_size))
    return _deal_by_work(seq_len, ring_size, documents or (0, seq_len))


@functools.lru_cache(maxsize=256)
def _owners(seq_len: int, ring_size: int, layout: Layout, documents: tuple[int, ...] | None) -> tuple[int, ...]:
    """The rank holding each chunk."""
    per_rank = _chunks(seq_len, ring_size, layout, documents)
    owner = [0] * sum(len(chunks) for chunks in per_rank)
    for rank, chunks in enumerate(per_rank):
        for ch in chunks:
            owner[ch] = rank
    return tuple(owner)


def _deal_by_work(seq_len: int, ring_size: int, documents: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """The documents layout (SEMANTICS.md): ``8R`` chunks, heaviest first, each to the rank
    with the least work so far among those holding fewer than 8 (ties: the lower chunk,
    the lower rank). A chunk's work is its causal pairs within documents:
    ``sum over its positions i of i - c_doc(i) + 1``."""
    count = ring_size * DOCUMENT_CHUNKS
    c = seq_len // count
    work = [0] * count
    d = 0
    for ch in range(count):
        i, stop = ch * c, (ch + 1) * c
        while i < stop:
            while documents[d + 1] <= i:
                d += 1
            m = min(stop, documents[d + 1]) - i  # positions i .. i+m-1 of document d
            work[ch] += m * (i - documents[d] + 1) + m * (m - 1) // 2
            i += m
    totals = [0] * ring_size
    held: list[list[int]] = [[] for _ in range(ring_size)]
    for ch in sorted(range(count), key=lambda ch: (-work[ch], ch)):
        rank = min((r for r in range(ring_size) if len(held[r]) < DOCUMENT_CHUNKS), key=lambda r: (totals[r], r))
        totals[rank] += work[ch]
        held[rank].append(ch)
    return tuple(tuple(sorted(chunks)) for chunks in held)


def shard(x: torch.Tensor, ring_size: int, layout: Layout | str, dim: int = 1, *,
          cu_seqlens: torch.Tensor | Sequence[int] | None = None) -> list[torch.Tensor]:
    """Natural-order tensor -> the shard of every rank (differentiable).

    :param x: the whole sequence along ``dim``.
    :param ring_size: ``R``.
    :param layout: a :class:`Layout` or its name.
    :param dim: the sequence dimension (``1`` for ``[B, N, H, D]``).
    :param cu_seqlens: the packed documents the ``documents`` layout balances (the same
        the attention call takes); ignored by the other layouts.
    :raises ValueError: naming ``N``, ``R`` and the layout when ``x.shape[dim]`` does not
        divide into the layout's equal chunks: no trailing token is ever dropped.
    """
    ring_size = check_ring_size(ring_size)
    n = x.shape[dim]
    documents = check_documents(cu_seqlens, n)
    out = []  # shard_intervals checks the layout and that N divides into equal shards
    for r in range(ring_size):
        pieces = [x.narrow(dim, a, b - a) for a, b in shard_intervals(n, ring_size, r, layout, documents)]
        out.append(pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim))
    return out


def unshard(shards: list[torch.Tensor], layout: Layout | str, dim: int = 1, *,
         cu_seqlens: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
    """Every rank's shard -> the natural-order tensor (differentiable). Inverse of :func:`shard`,
    with the same ``cu_seqlens``.

    :raises ValueError: unless the shards have one length that the layout's chunks divide.
    """
    layout = check_layout(layout)
    if len(shards) == 0:
        raise ValueError("unshard needs at least one shard")
    lengths = [s.shape[dim] for s in shards]
    if len(set(lengths)) != 1:
        raise ValueError(f"shards of a ring have one length, got lengths {lengths}")
    if layout is Layout.CONTIGUOUS:
        return torch.cat(shards, dim=dim)
    per = chunks_per_rank(layout)
    if lengths[0] % per:
        raise ValueError(f"{layout} shards hold {per} equal chunks: shard length {lengths[0]} is not divisible by {per}")
    ring_size, n = len(shards), lengths[0] * len(shards)
    chunks = _chunks(n, ring_size, layout, _dealt_by(layout, check_documents(cu_seqlens, n)))
    pieces: list[torch.Tensor] = [shards[0]] * (ring_size * per)
    for rank, held in enumerate(chunks):
        for ch, piece in zip(held, shards[rank].chunk(per, dim=dim)):
            pieces[ch] = piece
    return torch.cat(pieces, dim=dim)
