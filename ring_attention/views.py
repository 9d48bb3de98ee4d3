"""Strided views of a shard: how blocks of packed rows reach the kernels and back.

Launches are what a GPU pays for in eager mode (each op costs host time), so results
move through strided views, never through per-block buffers: a block's packed rows are
one strided view of the shard where its rows and heads are progressions, a kernel's
output is copied into (or merged with) a view of the accumulators, and its gradients
are added into views of the gradient accumulators. Rows that are no progression (a
dilated segment across zigzag chunks) are gathered and scattered by index instead.

Shapes: a shard is ``[B, n, H, ...]``; a block's packed rows are ``[B, O, M, h, ...]``
(``O`` head offsets, ``M`` packed rows, ``h`` heads); the kernels take
``[B*O*runs, h, L, ...]``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Literal, Union

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.utils._python_dispatch import _disable_current_modes

from .blocks import Block, Call, Index

# A view's recipe (size, stride, storage offset from its base's), or False: no view, build it.
Recipe = Union[tuple[tuple[int, ...], tuple[int, ...], Union[int, torch.SymInt]], Literal[False]]


def take(x: torch.Tensor, rows: Index, heads: Index) -> torch.Tensor:
    """``x[:, rows, heads]`` for ``x [B, N, H, ...]``; a view where both are slices."""
    x = x[:, rows] if isinstance(rows, slice) else x.index_select(1, rows)
    return x[:, :, heads] if isinstance(heads, slice) else x.index_select(2, heads)


def packed(x: torch.Tensor, rows: Index, heads: Index, offsets: int = 1) -> torch.Tensor:
    """A block's rows and heads of ``x [B, N, H, ...]`` as ``[B, O, M, h, ...]``.

    Offset ``o`` of the ``O = offsets`` is the block shifted by ``o`` rows and ``o``
    heads: one strided view (rows and heads are then slices). Index tensors gather a
    copy (``O = 1``).
    """
    if not (isinstance(rows, slice) and isinstance(heads, slice)):
        return take(x, rows, heads).unsqueeze(1)
    st = x.stride()
    size = (x.shape[0], offsets, len(range(rows.start, rows.stop, rows.step)),
            len(range(heads.start, heads.stop, heads.step)), *x.shape[3:])
    stride = (st[0], st[1] + st[2], st[1] * rows.step, st[2] * heads.step, *st[3:])
    return x.as_strided(size, stride, x.storage_offset() + rows.start * st[1] + heads.start * st[2])


def source_packed(blk: Block, t: torch.Tensor, rows: Index, heads: Index) -> torch.Tensor:
    """The block's key rows and heads of its source ``t`` as ``[B, O, M, h, ...]``: ``t``
    itself where it is a message of several head offsets, already so packed (:class:`Message`)."""
    stacked = blk.source is not None and blk.offsets > 1
    return t if stacked else packed(t, rows, heads, blk.offsets)


def run_view(x: torch.Tensor, start: int, runs: int, length: int) -> torch.Tensor:
    """Packed ``[B, O, M, h, ...]`` rows ``start .. start + runs*length`` as ``[B, O, runs, h, length, ...]``."""
    return torch.unflatten(x[:, :, start : start + runs * length], 2, (runs, length)).transpose(3, 4)


def runs(x: torch.Tensor, start: int, runs: int, length: int) -> torch.Tensor:
    """Packed ``[B, O, M, h, ...]`` rows -> ``[B*O*runs, h, length, ...]``: the kernel's layout."""
    return run_view(x, start, runs, length).flatten(0, 2)


def unpacked(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Kernel results ``[B, 1, runs, h, L, ...]`` -> ``[B, runs*L, h, ...]``: a copy in ``dtype``."""
    x = x.squeeze(1).transpose(2, 3)
    return x.to(dtype, memory_format=torch.contiguous_format).flatten(1, 2)


def view(
    recipes: dict[Hashable, Recipe], key: Hashable, x: torch.Tensor, build: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """``build(x)``, taken by the recipe kept in ``recipes`` under ``key`` where it is a view of ``x``.

    A call's kernel inputs and result cells take a dozen view ops to derive (slices,
    unflatten, transpose, flatten), and their host time is most of what a small call costs
    besides its kernel; their recipe, once known, is one ``as_strided``: ``(size, stride,
    storage offset from x's)`` by ``(key, x's shape and strides)``. An executable plan keeps
    its ranks' recipes (:class:`~ring_attention.executable.RankExecution`).

    The recipe is found by building the view of a meta tensor laid out as ``x``; where
    ``build`` copies (a flatten that strides cannot express), it runs as it is. A traced
    ``x`` (``torch.compile``, fake tensors) runs ``build`` too: host time is not spent there.
    """
    if torch.compiler.is_compiling() or is_fake(x):
        return build(x)
    layout = (key, x.shape, x.stride())  # view ops move the storage offset by a constant
    recipe = recipes.get(layout)
    if recipe is None:
        with _disable_current_modes():  # a meta probe is not the caller's to count or trace
            base = torch.empty(x.untyped_storage().nbytes() // x.element_size(), dtype=x.dtype, device="meta")
            probe = build(base.as_strided(x.shape, x.stride(), x.storage_offset()))
        recipe = recipes[layout] = (
            (tuple(probe.shape), probe.stride(), probe.storage_offset() - x.storage_offset())
            if probe._base is base else False
        )
    if not recipe:
        return build(x)
    size, stride, offset = recipe
    return x.as_strided(size, stride, x.storage_offset() + offset)


def rows_major(lse: torch.Tensor) -> torch.Tensor:
    """LSE ``[B, H, n]`` as a ``[B, n, H]`` view, indexed like the outputs."""
    return lse.transpose(1, 2)


def cells(x: torch.Tensor, rows: slice, blk: Block, g: slice, c: Call) -> torch.Tensor:
    """The cells of ``x [B, n, H, ...]`` that call ``c`` (head offsets ``g``) computes, shaped
    like its results ``[B, O, runs, h, L, ...]``: a strided view."""
    return run_view(packed(x, rows, blk.heads, blk.offsets)[:, g], c.q_start, c.runs, c.q_len)


def adopted_rows(x: torch.Tensor, batch: int) -> torch.Tensor | None:
    """A kernel result ``[B*runs, H, L, ...]`` of runs back to back as ``[B, runs*L, H, ...]``,
    a view; ``None`` where its layout has no such view (one run always has one; several
    need the rows of a run and the runs to follow each other in memory, as the CPU and
    CUDA kernels lay out their results, but not the CPU op's meta kernel)."""
    rows = torch.unflatten(x.transpose(1, 2), 0, (batch, -1))  # [B, runs, L, H, ...]
    if rows.shape[1] != 1 and rows.stride(1) != rows.shape[2] * rows.stride(2):
        return None
    return rows.flatten(1, 2)


def scatter_add(acc: torch.Tensor, rows: Index, heads: Index, grad: torch.Tensor) -> None:
    """``acc[:, rows, heads] += grad`` for packed ``grad [B, M, h, D]`` in ``acc``'s dtype.

    Rows never repeat; heads may (grouped-query heads sharing a kv head), and add up.
    """
    if isinstance(rows, slice):
        acc = acc[:, rows]
        if isinstance(heads, slice):
            acc[:, :, heads].add_(grad)
        else:
            acc.index_add_(2, heads, grad)
    elif isinstance(heads, slice):
        acc[:, :, heads].index_add_(1, rows, grad)
    else:
        b, m, _, d = grad.shape
        folded = torch.zeros(b, m, acc.shape[2], d, dtype=acc.dtype, device=acc.device)
        acc.index_add_(1, rows, folded.index_add_(2, heads, grad))
