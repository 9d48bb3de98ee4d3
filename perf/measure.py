"""Measurements outside the timed region: synchronized timing, peak memory, error.

Timing: the timed callables end with :func:`sync` and the untimed setup calls it too, so a
``time.perf_counter`` pair brackets exactly the device work (CUDA kernels are asynchronous).
The ratio to SDPA pairs each timed round with an SDPA round just before it
(:func:`paired_ratio`).

Memory: the extra bytes a call needs beyond what was allocated before it (inputs excluded).
CUDA reads the caching allocator's peak; CPU replays the allocation events recorded by
``torch.profiler`` (``profile_memory=True``) and takes the peak of their running sum.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

import torch

from ring_attention import pattern as _pattern


def sync(device: str) -> None:
    """Wait for queued device work (no-op on CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()


def seconds(fn: Callable[[], object], device: str, setup: Callable[[], object] | None = None) -> float:
    """Wall time of one synchronized call of ``fn`` (``setup`` runs first, untimed)."""
    if setup is not None:
        setup()
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def paired_ratio(times, anchor_times) -> float:
    """Median over rounds of ``times[i] / anchor_times[i]``.

    The anchor (SDPA) is timed right before each round of the variant, so a machine whose
    speed drifts during the run (a neighbour's load, clock changes) moves both sides of
    each pair alike; one SDPA median per group, taken at another moment, does not cancel
    it (seen here: +30% on a whole group of benchmarks).
    """
    if len(times) != len(anchor_times) or not times:
        raise ValueError(f"need one anchor time per round: {len(times)} rounds, {len(anchor_times)} anchors")
    return statistics.median(t / a for t, a in zip(times, anchor_times))


def _cpu_peak_bytes(fn: Callable[[], object]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = prof.profiler.kineto_results.events()
    allocs = sorted(
        (e.start_ns(), e.nbytes())
        for e in events
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    current = peak = 0
    for _, nbytes in allocs:
        current += nbytes
        peak = max(peak, current)
    return int(peak)


def _cuda_peak_bytes(fn: Callable[[], object]) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - before)


def peak_memory_bytes(fn: Callable[[], object], device: str) -> int:
    """Peak bytes allocated while ``fn`` runs, beyond what was allocated before it."""
    return _cuda_peak_bytes(fn) if device == "cuda" else _cpu_peak_bytes(fn)


def sampled_reference(variant, q, k, v, rows: torch.Tensor) -> torch.Tensor:
    """SEMANTICS.md's output for the query positions ``rows`` only: ``[B, len(rows), H, D]``.

    Builds ``W[h, rows, :]`` with the same pair masks as :func:`ring_attention.pattern.weights`
    (memory ``H * len(rows) * N`` instead of ``H * N * N``), computed in float32 / float64.
    """
    n, h, d = q.shape[1], q.shape[2], q.shape[3]
    acc = torch.promote_types(q.dtype, torch.float32)
    qpos = rows.to(q.device)
    kpos = torch.arange(n, device=q.device)
    pat = variant.pattern_for(n)
    if pat is None:
        w = torch.ones(h, len(rows), n, dtype=acc, device=q.device)
    else:
        w = torch.zeros(h, len(rows), n, dtype=acc, device=q.device)
        segments = pat.effective_segment_lengths(n)
        for seg, rate, heads in zip(segments, pat.dilation_rates, pat.heads_of_pair(h)):
            for head in heads:
                w[head] += _pattern.pair_mask(qpos, kpos, seg, rate, _pattern.head_offset(head, rate)).to(acc)
    if variant.causal:
        w = w * _pattern.causal(qpos, kpos).to(acc)
    scores = torch.einsum("bihd,bjhd->bhij", q[:, qpos].to(acc), k.to(acc)) / math.sqrt(d)
    scores = scores.masked_fill(w == 0, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    p = w * torch.exp(scores - row_max)
    denom = p.sum(dim=-1, keepdim=True)
    p = p / torch.where(denom > 0, denom, torch.ones_like(denom))
    return torch.einsum("bhij,bjhd->bihd", p, v.to(acc))


def reference_dtype(device: str) -> torch.dtype:
    """The oracle's precision: float64 on CPU, float32 on CUDA."""
    return torch.float64 if device == "cpu" else torch.float32


def full_error(variant, q, k, v, grad_out, backward: bool, device: str) -> float:
    """Max abs error of the output (and of dq, dk, dv with ``backward``) vs the dense reference."""
    rdt = reference_dtype(device)
    ins = [x.detach().clone().requires_grad_(backward) for x in (q, k, v)]
    refs = [x.detach().to(rdt).requires_grad_(backward) for x in (q, k, v)]
    out = variant(*ins)
    ref = variant.reference(*refs)
    errs = [(out.double() - ref.double()).abs().max().item()]
    if backward:
        out.backward(grad_out)
        ref.backward(grad_out.to(rdt))
        errs += [(a.grad.double() - b.grad.double()).abs().max().item() for a, b in zip(ins, refs)]
    return float(max(errs))


def sampled_error(variant, q, k, v, num_rows: int = 32) -> float:
    """Max abs error of the forward output on ``num_rows`` query rows spread over ``N``."""
    n = q.shape[1]
    rows = torch.linspace(0, n - 1, num_rows).round().long().unique()
    with torch.no_grad():
        out = variant(q, k, v)
        rdt = reference_dtype(q.device.type)
        ref = sampled_reference(variant, q.to(rdt), k.to(rdt), v.to(rdt), rows)
    return float((out[:, rows.to(out.device)].double() - ref.double()).abs().max().item())
