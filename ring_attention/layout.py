"""How a global sequence is laid out over the ranks of a ring.

- ``contiguous``: rank ``r`` holds positions ``[r*N/R, (r+1)*N/R)``.
- ``zigzag``: the sequence is cut into ``2R`` chunks; rank ``r`` holds chunk ``r`` then
  chunk ``2R-1-r``, which balances causal work across ranks.

A shard is described by its *intervals* of global positions, in the order the rank
stores them. Within a shard, positions increase with the local row index in both
layouts, which the causal block logic relies on.
"""

from __future__ import annotations

import torch

from ._checks import NamedEnum, check_positive_int


class Layout(NamedEnum):
    """How a ring's ranks hold the sequence. Public functions also take the plain strings."""

    CONTIGUOUS = "contiguous"
    ZIGZAG = "zigzag"


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
    return 2 if check_layout(layout) is Layout.ZIGZAG else 1


def check_divisible(seq_len: int, ring_size: int, layout: Layout | str) -> None:
    """``ValueError`` naming ``N``, ``R`` and the layout unless the layout can shard ``N``."""
    layout = check_layout(layout)
    parts = ring_size * chunks_per_rank(layout)
    if seq_len % parts:
        raise ValueError(
            f"sequence length N={seq_len} must be divisible by {parts} "
            f"({'2R' if layout is Layout.ZIGZAG else 'R'}) for ring size R={ring_size} "
            f"with the {layout} layout"
        )


def shard_intervals(seq_len: int, ring_size: int, rank: int, layout: Layout | str) -> tuple[tuple[int, int], ...]:
    """The ``(start, stop)`` global position ranges rank ``rank`` holds, in storage order.

    Raises:
        ValueError unless ``seq_len`` divides into the layout's ``R`` (``2R``) equal chunks.
    """
    layout = check_layout(layout)
    check_divisible(seq_len, ring_size, layout)
    if not 0 <= rank < ring_size:
        raise ValueError(f"rank {rank} is outside a ring of size R={ring_size}")
    c = seq_len // (ring_size * chunks_per_rank(layout))
    chunks = (rank,) if layout is Layout.CONTIGUOUS else (rank, 2 * ring_size - 1 - rank)
    return tuple((ch * c, (ch + 1) * c) for ch in chunks)


def holders(seq_len: int, ring_size: int, layout: Layout, start: int, stop: int) -> set[int]:
    """The ranks holding any of the global positions ``[start, stop)`` (arguments checked by
    the caller: the planner asks this for every segment of every rank)."""
    c = seq_len // (ring_size * chunks_per_rank(layout))
    return {_owner(ch, ring_size, layout) for ch in range(start // c, (stop - 1) // c + 1)}


def _owner(chunk: int, ring_size: int, layout: Layout) -> int:
    """The rank holding chunk ``chunk`` of the sequence's ``R`` (zigzag: ``2R``) equal chunks."""
    if layout is Layout.CONTIGUOUS or chunk < ring_size:
        return chunk
    return 2 * ring_size - 1 - chunk


def split(x: torch.Tensor, ring_size: int, layout: Layout | str, dim: int = 1) -> list[torch.Tensor]:
    """Natural-order tensor -> the shard of every rank (differentiable).

    Raises:
        ValueError naming ``N``, ``R`` and the layout when ``x.shape[dim]`` does not divide
        into equal shards: no trailing token is ever dropped.
    """
    ring_size = check_ring_size(ring_size)
    n = x.shape[dim]
    out = []  # shard_intervals checks the layout and that N divides into equal shards
    for r in range(ring_size):
        pieces = [x.narrow(dim, a, b - a) for a, b in shard_intervals(n, ring_size, r, layout)]
        out.append(pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim))
    return out


def join(shards: list[torch.Tensor], layout: Layout | str, dim: int = 1) -> torch.Tensor:
    """Every rank's shard -> the natural-order tensor (differentiable). Inverse of :func:`split`.

    Raises:
        ValueError unless the shards have one length (even, for ``zigzag``).
    """
    layout = check_layout(layout)
    if len(shards) == 0:
        raise ValueError("join needs at least one shard")
    lengths = [s.shape[dim] for s in shards]
    if len(set(lengths)) != 1:
        raise ValueError(f"shards of a ring have one length, got lengths {lengths}")
    if layout is Layout.CONTIGUOUS:
        return torch.cat(shards, dim=dim)
    if lengths[0] % 2:
        raise ValueError(f"zigzag shards hold two equal chunks: shard length {lengths[0]} is odd")
    ring_size = len(shards)
    halves = [s.chunk(2, dim=dim) for s in shards]
    ordered = [halves[r][0] for r in range(ring_size)] + [halves[r][1] for r in reversed(range(ring_size))]
    return torch.cat(ordered, dim=dim)
