"""The one path from a public call to the executor, shared by every packed-plan function.

:func:`~ring_attention.dilated_attention`, :func:`~ring_attention.ring_attention` and
:func:`~ring_attention.ring_dilated_attention` differ only in what they pass here: a
pattern (:data:`FULL` is full attention), and a ring (a process group, or ``R`` ranks simulated
in this process; one device is the ring of one). :func:`attend` then

1. runs a process group's call eagerly under ``torch.compile`` (the ranks' agreement and
   P2P are a graph break, :func:`_eager`);
2. checks the arguments (on every rank of a group at once, :mod:`ring_attention.ring_checks`);
3. under tracing, hands the whole sequence to the custom ops (:mod:`ring_attention.ops`);
   eagerly, looks up the executable plan of the call (:mod:`ring_attention.executable`,
   built once per shape) and runs it (:func:`ring_attention.autograd.run_on_ring`, which
   shards, runs the autograd function, and joins);
4. checkpoints either path, the one place that does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.utils.checkpoint

from . import ops
from .autograd import run_on_ring
from .checks import check_documents_tensor
from .executable import PlanKey, executable_plan, resolved
from .layout import Layout
from .masks import SequenceMask
from .options import DEFAULT, Options
from .pattern import DilatedPattern, as_pattern
from .ring_checks import FULL, check_ring_inputs

__all__ = ["FULL", "attend"]


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: DilatedPattern | object,
    *,
    group: dist.ProcessGroup | None = None,
    ring_size: int | None = None,
    causal: bool = False,
    scale: float | None = None,
    layout: Layout | str = "contiguous",
    checkpoint: bool = False,
    options: Options = DEFAULT,
    window: tuple[int, int] | None = None,
    cu_seqlens: torch.Tensor | Sequence[int] | None = None,
) -> torch.Tensor:
    """Attention with ``pattern``'s weights (:data:`FULL`: full attention) over a ring.

    Arguments as the public functions take them, unchecked: they are checked here (a
    ``pattern`` that is not a :class:`~ring_attention.DilatedPattern`, ``None`` included,
    raises on every rank).

    :param q: queries ``[B, n, H, D]``: this rank's shard with ``group``, else the whole sequence.
    :param k: keys ``[B, n, Hkv, D]``, held as ``q``.
    :param v: values, shaped as ``k``.
    :param pattern: a :class:`~ring_attention.DilatedPattern`, or :data:`FULL`.
    :param group: a ``torch.distributed`` process group, or ``None`` to simulate the ring.
    :param ring_size: ``R`` for the simulation (``None`` means 1); with ``group``, ``None`` or its size.
    :param causal: keep only keys at or before the query, in global positions.
    :param scale: score scale, ``1/sqrt(D)`` by default.
    :param layout: a :class:`~ring_attention.Layout`, or its name.
    :param checkpoint: recompute the forward in backward instead of storing activations.
    :param options: the executor's limits (tests force paths with them).
    :param window: ``(left, right)``, a sliding window on global positions (SEMANTICS.md),
        or ``None``; checked with the rest, on every rank of a group (the ranks agree on it).
    :param cu_seqlens: packed documents: their cumulative starts in global positions
        (SEMANTICS.md), or ``None``; checked and agreed on as ``window``. Under
        ``torch.compile`` without a group a tensor is data of the graph: its dtype and shape
        are checked while tracing and its values where the op runs, so a new packing of the
        same number of documents runs the compiled graph again, without a recompile.
    :returns: this rank's output shard (with ``group``) or the whole output in natural order.
    :raises ValueError, TypeError: for malformed inputs, on every rank of a group.
    """
    if torch.compiler.is_compiling() and group is not None:
        eager: torch.Tensor = _eager(
            q, k, v, pattern, group=group, ring_size=ring_size, causal=causal, scale=scale, layout=layout,
            checkpoint=checkpoint, options=options, window=window, cu_seqlens=cu_seqlens,
        )
        return eager
    traced: torch.Tensor | None = None  # cu_seqlens as data of a compiled graph
    if torch.compiler.is_compiling() and isinstance(cu_seqlens, torch.Tensor):
        # Reading the values would bake them into the graph (a recompile per packing): the op
        # checks them where it runs, the pattern's per-document rule included.
        traced, cu_seqlens = check_documents_tensor(cu_seqlens), None
    ring, checked_args = check_ring_inputs(
        q, k, v, group=group, ring_size=ring_size, causal=causal, scale=scale, layout=layout,
        checkpoint=checkpoint, pattern=FULL if traced is not None else pattern, window=window, cu_seqlens=cu_seqlens,
    )
    shapes, scale, causal, layout, checkpoint, band, documents = checked_args
    if traced is not None and pattern is not FULL:
        as_pattern(pattern).heads_of_pair(shapes.heads)  # what can be checked without the documents
    # what plans and ops call full attention; a pattern check_ring_inputs accepted otherwise
    checked = None if pattern is FULL else cast(DilatedPattern, pattern)
    if torch.compiler.is_compiling():
        if documents is not None:  # a sequence of ints: constants of the graph
            traced = torch.tensor(documents, dtype=torch.int64)  # on the host, where the op reads it

        def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return ops.attention(q, k, v, checked, causal=causal, ring_size=ring.size, layout=layout, scale=scale,
                                 options=options, window=band, cu_seqlens=traced)
    else:
        mask = SequenceMask(causal=causal, window=band, documents=documents)
        key = PlanKey(checked, shapes.seq_len, shapes.heads, shapes.kv_heads, mask, ring.size, layout, ring.ranks,
                      q.shape[0], q.shape[3], q.dtype, resolved(options, q))
        plan = executable_plan(key)

        def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = run_on_ring(plan, ring, scale, q, k, v)
            return out

    # Only the inputs are stored; the forward runs again in backward. Under torch.compile
    # this is what keeps the custom op's outputs unsaved: a plain rerun of the op in its
    # backward formula would be merged with the forward's call as a common subexpression.
    if checkpoint and torch.is_grad_enabled():
        return cast(torch.Tensor, torch.utils.checkpoint.checkpoint(run, q, k, v, use_reentrant=False))
    return run(q, k, v)


@torch.compiler.disable  # type: ignore[untyped-decorator]  # unannotated in torch
def _eager(*args: Any, **kwargs: Any) -> torch.Tensor:
    """A process group's agreement and P2P run eagerly, outside a compiled graph (a graph break)."""
    return attend(*args, **kwargs)
