"""Measurements: per-round device time, real peak memory, error against the reference.

Timing (what a benchmark round measures):

* a round runs one call ``repeats`` times and reports the time per call. ``repeats`` is
  chosen once per benchmark (:func:`repeats_for`) so that a round lasts at least
  ``MIN_ROUND_S`` of device time: a single call of a few microseconds on a GPU would
  otherwise measure launch overhead and timer resolution (triton's ``do_bench`` sizes its
  loops the same way). The CPU profile's calls take milliseconds: one call per round.
* the clock: CUDA events recorded on the stream around the round (:class:`CudaEventTimer`),
  or on CPU ``time.perf_counter`` after a synchronize at both ends (:class:`HostTimer`).
* on CUDA the L2 cache is flushed before every round (:class:`L2Flush`), so a round does not
  start with the previous round's inputs cached.
* pytest-benchmark records what the round measured through :func:`round_clock`, a clock
  that advances by exactly the measured time, set as its timer by ``perf/conftest.py``.

The ratio to SDPA pairs each round of a variant with an SDPA round just before it
(:func:`paired_ratio`); SDPA's backend is pinned (:func:`sdpa_anchor_backend`).

Memory: the extra bytes a call needs beyond what was allocated before it (inputs excluded).
CUDA reads the caching allocator's peak; CPU replays the allocation events recorded by
``torch.profiler`` (``profile_memory=True``) and takes the peak of their running sum.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable

import torch

# A round measures at least this much device time (calls shorter than it are repeated).
MIN_ROUND_S = 1e-3
# ... but never more calls than this per round (a call of a few nanoseconds is a bug).
MAX_REPEATS = 10_000
# Bytes written to flush the L2 cache: above any current GPU's L2 (H100: 50 MB), as triton's
# do_bench does with 256 MB.
L2_FLUSH_BYTES = 256 << 20


def sync(device: str) -> None:
    """Wait for queued device work (no-op on CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()


class HostTimer:
    """Host clock around device work: synchronize, ``perf_counter``, ..., synchronize.

    ``sync`` waits for the device; the one at :meth:`stop` is what makes the reading
    include the work the timed calls queued (CUDA kernels return before they run).
    """

    def __init__(self, sync_fn: Callable[[], None], clock: Callable[[], float] = time.perf_counter):
        self._sync = sync_fn
        self._clock = clock
        self._t0 = None

    def start(self) -> None:
        self._sync()
        self._t0 = self._clock()

    def stop(self) -> float:
        """Seconds since :meth:`start`, the queued work included."""
        self._sync()
        return self._clock() - self._t0


class CudaEventTimer:
    """CUDA events recorded around the round on the current stream: device time, not host time."""

    def __init__(self):
        self._start = torch.cuda.Event(enable_timing=True)
        self._end = torch.cuda.Event(enable_timing=True)

    def start(self) -> None:
        self._start.record()

    def stop(self) -> float:
        self._end.record()
        self._end.synchronize()
        return self._start.elapsed_time(self._end) / 1e3  # elapsed_time is in ms


def timer_for(device: str):
    """The round timer of ``device``: CUDA events on CUDA, a synchronized host clock on CPU."""
    return CudaEventTimer() if device == "cuda" else HostTimer(lambda: sync(device))


def repeats_for(call_s: float, min_round_s: float = MIN_ROUND_S, max_repeats: int = MAX_REPEATS) -> int:
    """Calls per round so that a round lasts at least ``min_round_s``: ``ceil(min_round_s / call_s)``.

    ``call_s`` is an estimate of one call's time; one call when it alone lasts ``min_round_s``.
    """
    if not call_s > 0:  # zero, negative or NaN: the timer saw nothing; repeat as much as allowed
        return max_repeats
    return max(1, min(max_repeats, math.ceil(min_round_s / call_s)))


def round_seconds(fn: Callable[[], object], repeats: int, timer) -> float:
    """Time per call of ``repeats`` back-to-back calls of ``fn``, one timer reading around them all."""
    timer.start()
    for _ in range(repeats):
        fn()
    return timer.stop() / repeats


def seconds(fn: Callable[[], object], device: str, setup: Callable[[], object] | None = None) -> float:
    """Time of one call of ``fn`` on ``device``'s round timer (``setup`` runs first, untimed)."""
    if setup is not None:
        setup()
    return round_seconds(fn, 1, timer_for(device))


class L2Flush:
    """Evicts the GPU's L2 cache by writing a buffer larger than it (nothing to do on CPU)."""

    def __init__(self, device: str, nbytes: int = L2_FLUSH_BYTES):
        self.device = device
        self._buffer = torch.empty(nbytes, dtype=torch.int8, device=device) if device == "cuda" else None

    @property
    def active(self) -> bool:
        return self._buffer is not None

    def __call__(self) -> None:
        if self._buffer is not None:
            self._buffer.zero_()


class RoundClock:
    """A clock for pytest-benchmark that advances by the time each round measured.

    pytest-benchmark times a round as ``timer()`` after the round minus ``timer()`` before it.
    With this clock as its timer and the round adding what it measured (:meth:`advance`),
    that difference is exactly the device time per call, whichever timer measured it.
    """

    def __init__(self):
        self.now = 0.0

    def advance(self, seconds_: float) -> None:
        self.now += seconds_


ROUND_CLOCK = RoundClock()


def round_clock() -> float:
    """pytest-benchmark's timer for the perf suite (``--benchmark-timer=perf.measure.round_clock``)."""
    return ROUND_CLOCK.now


def sdpa_anchor_backend(device: str, dtype: torch.dtype) -> str | None:
    """The SDPA backend the anchor is pinned to, or ``None`` (CPU: one fused kernel, no choice).

    On CUDA the variants call the flash kernel, so the anchor must too: newer PyTorch prefers
    cuDNN attention on sm90, and an unpinned anchor would compare with another kernel. Flash
    takes float16 / bfloat16 only; float32 gets the memory-efficient kernel.
    """
    if device != "cuda":
        return None
    return "flash" if dtype in (torch.float16, torch.bfloat16) else "efficient"


def sdpa_backend(name: str | None):
    """Context manager pinning SDPA to the backend called ``name`` (no-op for ``None``)."""
    if name is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    return sdpa_kernel(backends[name])


def paired_ratio(times, anchor_times) -> float:
    """Median over rounds of ``times[i] / anchor_times[i]``.

    The anchor (SDPA) is timed right before each round of the variant, so a machine whose
    speed drifts during the run (a neighbour's load, clock changes) moves both sides of
    each pair alike; one SDPA median per group, taken at another moment, does not cancel
    it (seen here: +30% on a whole group of benchmarks). The median, not the mean: one
    round disturbed by a burst of load must not move it.
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
    """Max abs error of the forward output on ``num_rows`` query rows spread over ``N``.

    The reference computes those rows only (``query_rows=``: ``H * num_rows * N`` memory).
    """
    n = q.shape[1]
    rows = torch.linspace(0, n - 1, num_rows).round().long().unique()
    with torch.no_grad():
        out = variant(q, k, v)
        rdt = reference_dtype(q.device.type)
        ref = variant.reference(q.to(rdt), k.to(rdt), v.to(rdt), query_rows=rows)
    return float((out[:, rows.to(out.device)].double() - ref.double()).abs().max().item())
