"""One rank of a real-rank benchmark row, started by :func:`perf.real_ranks.launch`.

    RANK=r WORLD_SIZE=R MASTER_ADDR=127.0.0.1 MASTER_PORT=p python -m perf.rank_worker CASE.json OUT

Every rank builds the same seeded global inputs (:func:`perf.counters.inputs`, the suite's),
takes its shard, and in order: warms up (rank 0 warms the simulation too); counts the bytes
its send ops carry in one call (rank 0: the counters' prediction from the simulation);
gathers its output (and gradients) to rank 0 for the error; measures its peak memory; then
times the warm-up and timed rounds. A round: rank 0 times the simulation while the others
wait at a barrier, a barrier, every rank times one call, ``all_reduce(MAX)`` gives the
slowest. Results go to ``OUT/rank{r}.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from perf import counters, measure
from perf.real_ranks import Case
from ring_attention import layout as _layout
from ring_attention import ring_attention, ring_dilated_attention


@contextlib.contextmanager
def p2p_traffic():
    """Yields a one-item list: bytes of the tensors handed to send ops of ``batch_isend_irecv``.

    ``ProcessGroupRing.exchange`` sends through it; the ranks' agreement collectives
    (``all_gather``) are checks, not the ring's exchange, and are not counted.
    """
    sent = [0]
    original = dist.batch_isend_irecv

    def counting(ops):
        sent[0] += sum(op.tensor.numel() * op.tensor.element_size() for op in ops if op.op is dist.isend)
        return original(ops)

    dist.batch_isend_irecv = counting
    try:
        yield sent
    finally:
        dist.batch_isend_irecv = original


def ring_fn(case: Case, group):
    """The public call of this rank: ``ring_attention`` / ``ring_dilated_attention`` with ``group``."""
    pattern = case.variant().pattern_for(case.n)
    kw = dict(group=group, causal=case.causal, layout=case.layout)
    if pattern is None:
        return lambda q, k, v: ring_attention(q, k, v, **kw)
    return lambda q, k, v: ring_dilated_attention(q, k, v, pattern, **kw)


def outputs(fn, q, k, v, g, backward: bool) -> list[torch.Tensor]:
    """``[out]``, or ``[out, dq, dk, dv]`` of ``sum(out * g)``."""
    if not backward:
        with torch.no_grad():
            return [fn(q, k, v)]
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = fn(*leaves)
    return [out.detach(), *torch.autograd.grad(out, leaves, g)]


def _max_abs(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def error(case: Case, mine: list[torch.Tensor], full, rank: int, world: int) -> float | None:
    """Max error of every rank's shards, gathered and joined on rank 0 (``None`` elsewhere)."""
    joined = []
    for t in mine:
        parts = [torch.empty_like(t) for _ in range(world)] if rank == 0 else None
        dist.gather(t.contiguous(), parts, dst=0)
        if rank == 0:
            joined.append(_layout.unshard(parts, case.layout))
    if rank != 0:
        return None
    variant, (q, k, v, g) = case.variant(), full
    backward = case.mode == "fwd+bwd"
    rdt = measure.reference_dtype(case.device)
    if case.n <= case.full_reference_max_n:
        oracle = outputs(variant.reference, *(x.to(rdt) for x in (q, k, v, g)), backward)
        return max(_max_abs(a, b) for a, b in zip(joined, oracle))
    oracle = outputs(variant, q, k, v, g, backward)
    errs = [_max_abs(a, b) for a, b in zip(joined, oracle)]
    rows = torch.linspace(0, case.n - 1, 32).round().long().unique()
    with torch.no_grad():
        ref = variant.reference(q.to(rdt), k.to(rdt), v.to(rdt), query_rows=rows)
    errs.append(_max_abs(joined[0][:, rows.to(joined[0].device)], ref))
    return max(errs)


def run(case: Case, rank: int, world: int) -> dict:
    dev = case.device
    full = counters.inputs(case.batch, case.n, case.heads, case.dim, case.dtype, dev)
    q, k, v, g = (_layout.shard(t, world, case.layout)[rank].contiguous() for t in full)
    backward = case.mode == "fwd+bwd"
    fn = ring_fn(case, dist.group.WORLD)
    call = counters.call_of(fn, q, k, v, g, backward)
    sim = counters.call_of(case.variant(), *full, backward) if rank == 0 else None

    call()  # plans built, agreement checked: every later call sees what the rounds see
    predicted = []
    if rank == 0:
        sim()
        with counters.ring_traffic() as by_rank:
            sim()
        predicted = [by_rank[r] for r in range(world)]
    dist.barrier()
    with p2p_traffic() as sent:
        call()
    max_error = error(case, outputs(fn, q, k, v, g, backward), full, rank, world)
    peak = measure.peak_memory_bytes(call, dev)

    timer = measure.timer_for(dev)
    own, slowest, simulated = [], [], []
    for i in range(case.warmup + case.rounds):
        if rank == 0:  # the pair's anchor, right before the round; the other ranks wait below
            sim_s = measure.round_seconds(sim, 1, timer)
        dist.barrier()  # every rank starts the round together
        t = measure.round_seconds(call, 1, timer)
        worst = torch.tensor([t], dtype=torch.float64, device=dev)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        if i >= case.warmup:
            own.append(t)
            slowest.append(worst.item())
            if rank == 0:
                simulated.append(sim_s)
    return {"rank": rank, "round_s": own, "slowest_s": slowest, "simulation_s": simulated,
            "bytes_sent": sent[0], "bytes_predicted": predicted, "peak_memory_bytes": peak,
            "max_error": max_error, "threads": torch.get_num_threads()}


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    timeout_s = spec.pop("timeout_s")
    case = Case(**{f.name: spec[f.name] for f in dataclasses.fields(Case)})
    out = Path(argv[1])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)  # one thread per rank: the ranks share the cores, never a pool
    if case.device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if case.device == "cuda" else "gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        result = run(case, rank, world)
    finally:
        dist.destroy_process_group()
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
