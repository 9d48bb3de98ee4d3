"""The ring's messages: K/V rows out at each shift, their dK/dV back.

Every rank walks the shifts ``1 .. R-1`` in the same order, posting the exchange of
shift ``s + 1`` before computing shift ``s`` (and, in backward, returning the dK/dV of
shift ``s`` after computing it). A rank with nothing to send or receive at a shift posts
nothing, so between any two ranks the messages are posted in the same order on both
sides.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import cast

import torch

from . import views
from .blocks import Index, Message, RankPlan, Rows
from .comm import Pending, Ring, Spec

# dK/dV on their way back: the shift they belong to and the exchange in flight.
Returning = tuple[int, Pending]
# A row set as a slice or index tensor on a tensor's device: the executable plan's index.
Indexer = Callable[[Rows, torch.Tensor], Index]


def _message_tensors(msgs: tuple[Message, ...], k: torch.Tensor, v: torch.Tensor, index: Indexer) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for m in msgs:
        rows, heads = index(m.rows, k), index(m.kv_heads, k)
        if m.offsets > 1:  # progressions: one strided [B, O, M, h, D] view each
            out += [views.packed(k, rows, heads, m.offsets), views.packed(v, rows, heads, m.offsets)]
        else:
            out += [views.take(k, rows, heads), views.take(v, rows, heads)]
    return out


def _sizes(msgs: tuple[Message, ...]) -> list[tuple[int, int, int]]:
    return [(len(m.rows), len(m.kv_heads), m.offsets) for m in msgs]


def _shapes(
    k: torch.Tensor, sizes: Iterable[tuple[int, int, int]], dtype: torch.dtype
) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """What arrives for messages of ``sizes`` ``(rows, kv heads, offsets)``: K and V each."""
    b, _, _, d = k.shape
    spec: list[tuple[tuple[int, ...], torch.dtype]] = []
    for rows, kv_heads, offsets in sizes:
        shape = (b, rows, kv_heads, d) if offsets == 1 else (b, offsets, rows, kv_heads, d)
        spec += [(shape, dtype)] * 2
    return spec


def post_kv(
    ring: Ring, plans: Mapping[int, RankPlan], shift: int, ks: Mapping[int, torch.Tensor],
    vs: Mapping[int, torch.Tensor], index: Indexer, held: Mapping[int, list[torch.Tensor]] | None = None,
) -> Pending | None:
    """Post shift ``shift``'s exchange of k/v rows for every rank this process runs.

    A relay plan passes on ``held[r]`` (what arrived at the shift before) from shift 2 on.
    """
    relay = plans[ring.ranks[0]].relay
    sends: dict[int, Sequence[torch.Tensor]] = {}
    specs: dict[int, Spec] = {}
    for r in ring.ranks:
        step = plans[r].step(shift)
        if step.sends:  # a relay passes on from shift 2 on: held is given then
            sends[r] = cast(Mapping[int, list[torch.Tensor]], held)[r] if relay and shift > 1 else _message_tensors(step.sends, ks[r], vs[r], index)
        if step.receives:
            specs[r] = _shapes(ks[r], step.receives, ks[r].dtype)
    if not sends and not specs:
        return None
    return ring.exchange(1 if relay else shift, sends, specs, ks[ring.ranks[0]].device)


def wait(pending: Pending | None) -> dict[int, list[torch.Tensor]]:
    return {} if pending is None else pending.wait()


def post_returns(
    ring: Ring, plans: Mapping[int, RankPlan], shift: int, back: Mapping[int, Sequence[torch.Tensor]],
    ks: Mapping[int, torch.Tensor], acc: torch.dtype, hop: int,
) -> Returning | None:
    """Send the dK/dV of rows received at ``shift`` ``hop`` ranks on: back to their owners
    (``-shift``), or to the neighbour that holds their K/V next (relay)."""
    specs: dict[int, Spec] = {}
    for r in ring.ranks:
        step = plans[r].step(shift)
        if step.sends:  # direct: the gradients of the rows r sent; relay: of the rows r passed on
            specs[r] = _shapes(ks[r], _sizes(step.sends), acc)
    if not back and not specs:
        return None
    return shift, ring.exchange(hop, back, specs, ks[ring.ranks[0]].device)


def add_returned(
    returning: Returning | None, plans: Mapping[int, RankPlan], grads: Mapping[int, list[torch.Tensor | None]],
    index: Indexer,
) -> None:
    if returning is None:
        return
    shift, pending = returning
    for r, tensors in pending.wait().items():
        _, dk, dv = cast(list[torch.Tensor], grads[r])  # a rank receiving dK/dV has its accumulators
        for m, dk_rows, dv_rows in zip(plans[r].step(shift).sends, tensors[0::2], tensors[1::2]):
            rows, heads = index(m.rows, dk), index(m.kv_heads, dk)
            if m.offsets > 1:  # [B, O, M, h, D]: into the strided view it was sent from
                views.packed(dk, rows, heads, m.offsets).add_(dk_rows)
                views.packed(dv, rows, heads, m.offsets).add_(dv_rows)
                continue
            views.scatter_add(dk, rows, heads, dk_rows)
            views.scatter_add(dv, rows, heads, dv_rows)
