"""Plans run as a differentiable function: the autograd function and the eager ring entry."""

from __future__ import annotations

from typing import Any, cast

import torch

from .backward import run_backward
from .comm import Ring
from .executable import ExecutablePlan
from .forward import run_forward


class PackedAttention(torch.autograd.Function):
    """Differentiable :func:`run_forward` for the ranks ``ring.ranks``.

    Inputs are the executable plan of the ranks, the ring, the scale, whether a
    backward may follow (``need_lse``), then their q shards, k shards and v shards; outputs
    are the ranks' output shards in the input dtype. Double backward is refused: the
    backward runs fused kernels that have no derivative.
    """

    @staticmethod
    def forward(
        ctx: Any, plan: ExecutablePlan, ring: Ring, scale: float, need_lse: bool, *tensors: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        n = len(ring.ranks)
        qs = dict(zip(ring.ranks, tensors[:n]))
        ks = dict(zip(ring.ranks, tensors[n : 2 * n]))
        vs = dict(zip(ring.ranks, tensors[2 * n :]))
        # a narrow band's received K/V stays for the backward: not sent a second time
        received: list[dict[int, list[torch.Tensor]]] | None = [] if need_lse and plan.keeps_received else None
        state = run_forward(plan, ring, qs, ks, vs, scale, need_lse, received)
        outs = tuple(cast(torch.Tensor, state[r][0]).to(qs[r].dtype) for r in ring.ranks)  # every rank's out
        lses = tuple(state[r][1] for r in ring.ranks)
        ctx.plan, ctx.ring, ctx.scale = plan, ring, scale
        # saved like the rest, so checkpointing and saved-tensor hooks treat them alike
        ctx.received_counts = None if received is None else [{r: len(t) for r, t in step.items()} for step in received]
        kept = [t for step in received or () for r in sorted(step) for t in step[r]]
        ctx.save_for_backward(*tensors, *outs, *lses, *kept)
        return outs

    @staticmethod
    def backward(ctx: Any, *douts: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        if torch.is_grad_enabled():
            raise RuntimeError(
                "ring_attention does not support double backward (create_graph=True): its "
                "backward runs fused attention kernels that have no derivative"
            )
        ring = ctx.ring
        n = len(ring.ranks)
        saved = ctx.saved_tensors
        qs, ks, vs, outs, lses = (dict(zip(ring.ranks, saved[i * n : (i + 1) * n])) for i in range(5))
        filled = {r: (d if d is not None else torch.zeros_like(outs[r])) for r, d in zip(ring.ranks, douts)}
        received = None
        if ctx.received_counts is not None:  # rebuilt as the forward received it, shift by shift
            kept, received = iter(saved[5 * n :]), []
            for counts in ctx.received_counts:
                received.append({r: [next(kept) for _ in range(counts[r])] for r in sorted(counts)})
        grads = run_backward(ctx.plan, ring, qs, ks, vs, outs, lses, filled, ctx.scale, received)
        results: list[torch.Tensor] = []
        for i, inputs in enumerate((qs, ks, vs)):
            for r in ring.ranks:
                results.append(cast(torch.Tensor, grads[r][i]).to(inputs[r].dtype))  # not yet freed
                grads[r][i] = None  # a float32 accumulator is freed once converted
        return (None, None, None, None, *results)


# Never traced: under torch.compile the custom ops run plans (ops.py). This runs only
# eagerly, also where Dynamo falls back to eager around a call (a graph break, or an
# error it reports that way), whose per-block frames it must not compile one by one.
@torch.compiler.disable  # type: ignore[untyped-decorator]  # unannotated in torch
def run_on_ring(plan: ExecutablePlan, ring: Ring, scale: float, q: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor) -> torch.Tensor:
    """Run the plan of ``ring.ranks``: one rank's shard, or every rank's in turn.

    With one rank in this process, ``q, k, v`` are its shard; with several (a simulated
    ring), they are the whole sequence in natural order, split into the ranks' shards
    here and joined back.
    """
    need_lse = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))  # for a backward
    if len(ring.ranks) == 1:
        out: torch.Tensor = PackedAttention.apply(  # type: ignore[no-untyped-call]  # torch's Function.apply is unannotated
            plan, ring, scale, need_lse, q, k, v
        )[0]
        return out
    shards = [plan.shard(t) for t in (q, k, v)]
    outs: tuple[torch.Tensor, ...] = PackedAttention.apply(  # type: ignore[no-untyped-call]  # as above
        plan, ring, scale, need_lse, *shards[0], *shards[1], *shards[2]
    )
    return plan.unshard(list(outs))
