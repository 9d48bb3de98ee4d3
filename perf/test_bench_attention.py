"""Benchmarks: every registry variant x sequence length x dtype x pass (fwd, fwd+bwd).

Each benchmark times rounds of the variant with ``benchmark.pedantic`` (fixed rounds and
warm-up rounds) and fills ``extra_info`` with separate, untimed measurements: peak memory,
error against the dense reference, and the deterministic cost counters of :mod:`perf.counters`
(``extra_info["counters"]``, gated exactly). A round is timed by :mod:`perf.measure` (CUDA
events on CUDA, a synchronized ``perf_counter`` on CPU), repeats calls shorter than
``measure.MIN_ROUND_S`` until it lasts that long, starts with a flushed L2 on CUDA, and
reports the time per call to pytest-benchmark through ``measure.round_clock``.

SDPA of the same shape / dtype / causal flag / pass, pinned to the backend of
``measure.sdpa_anchor_backend`` (flash on CUDA), is timed in pedantic's untimed setup,
right before each round of the variant; ``ratio_to_sdpa`` is the median of the per-round
ratios (variant time / SDPA time). A window or packed-documents row is also timed against
FlexAttention with the same block mask where it runs (perf/flex.py; ``flex_median_s``, not
gated).
"""

from __future__ import annotations

import statistics

import pytest
import torch
import torch.nn.functional as F

from perf import compiled, counters, flex, measure
from perf import device as _device
from ring_attention import registry
from ring_attention.dense import dense_attention

# The longest N whose masked anchor (SDPA with an [N, N] boolean mask) is built: 256 MiB.
MASKED_ANCHOR_MAX_N = 16384


def _anchor(variant, n, device, backend):
    """``(fn, backend, name)``: SDPA of the variant's causal flag; for a window or packed
    documents, SDPA with the equivalent boolean mask (up to MASKED_ANCHOR_MAX_N), on the
    backend that takes a mask (flash takes none), for finite inputs as the benchmarks'."""
    if not variant.masked or n > MASKED_ANCHOR_MAX_N:
        return lambda q_, k_, v_: dense_attention(q_, k_, v_, causal=variant.causal), backend, "sdpa"
    pos = torch.arange(n, device=device)
    keep = variant.mask(n).keeps(pos, pos)

    def masked(q_, k_, v_):
        out = F.scaled_dot_product_attention(q_.transpose(1, 2), k_.transpose(1, 2), v_.transpose(1, 2),
                                             attn_mask=keep, enable_gqa=q_.shape[2] != k_.shape[2])
        return out.transpose(1, 2)

    return masked, None, "sdpa+mask"


# Rounds of a masked row's FlexAttention anchor, timed after the row's own (not gated).
FLEX_ROUNDS = 3


def _flex(variant, n, device, backward, q, k, v, grad_out, timer, flush) -> dict:
    """A masked row's FlexAttention anchor (perf/flex.py): ``flex_median_s``, or why it has none."""
    if n > MASKED_ANCHOR_MAX_N:  # create_block_mask evaluates the mask on all N x N pairs
        return {"flex_anchor": f"not built past N={MASKED_ANCHOR_MAX_N}"}
    attend, note = flex.anchor(variant.mask(n), n, device, backward)
    if attend is None:
        return {"flex_anchor": note}
    call = _call(attend, q, k, v, grad_out, backward)
    call()  # compiles
    repeats = _repeats(call, timer)
    times = []
    for _ in range(FLEX_ROUNDS):
        flush()
        times.append(measure.round_seconds(call, repeats, timer))
    return {"flex_anchor": note, "flex_median_s": statistics.median(times)}


def _inputs(profile, n, dtype):
    gen = torch.Generator(device="cpu").manual_seed(1234 + n)
    shape = (profile.batch, n, profile.heads, profile.head_dim)
    q, k, v, g = (torch.randn(shape, generator=gen) for _ in range(4))
    return [x.to(device=profile.device, dtype=getattr(torch, dtype)) for x in (q, k, v, g)]


def _call(fn, q, k, v, grad_out, backward, backend=None):
    """One call of ``fn``: the forward (no autograd), or forward and backward.

    The backward is ``torch.autograd.grad``: nothing accumulates into ``.grad``, so a round
    can repeat the call with no reset between calls. ``backend`` pins SDPA (the anchor).
    """
    if not backward:
        def call():
            with measure.sdpa_backend(backend), torch.no_grad():
                fn(q, k, v)

        return call

    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]

    def call():
        with measure.sdpa_backend(backend):
            torch.autograd.grad(fn(*leaves), leaves, grad_out)

    return call


def _repeats(call, timer) -> int:
    """Calls per round: one warm call, then one timed call sizes the round."""
    call()
    return measure.repeats_for(measure.round_seconds(call, 1, timer))


def _error(variant, n, dtype, q, k, v, grad_out, backward, profile, error_cache):
    if n <= profile.full_reference_max_n:
        what = "output and dq/dk/dv" if backward else "output"
        return measure.full_error(variant, q, k, v, grad_out, backward, profile.device), (
            f"{what} vs full dense reference")
    key = (variant.name, n, dtype)
    if key not in error_cache:
        error_cache[key] = measure.sampled_error(variant, q, k, v)
    return error_cache[key], (
        f"forward output on 32 sampled query rows (N > {profile.full_reference_max_n}: "
        f"the full reference is O(H N^2))")


def test_attention(benchmark, case, profile, rounds, error_cache, warm_process):
    name, n, dtype, mode = case
    variant = registry.VARIANTS[compiled.base_name(name)]
    if compiled.is_compiled(name):
        variant = compiled.CompiledVariant(variant, profile.compile_mode)
    if not variant.supports(n, profile.heads):
        pytest.skip(f"{name} does not support N={n}, H={profile.heads}")
    backward = mode == "fwd+bwd"
    dev, b, h, d = profile.device, profile.batch, profile.heads, profile.head_dim
    anchor_backend = measure.sdpa_anchor_backend(dev, getattr(torch, dtype))
    anchor_name = "sdpa"
    is_anchor = variant.kind is registry.Kind.DENSE
    timer, flush = measure.timer_for(dev), measure.L2Flush(dev)
    try:
        q, k, v, grad_out = _inputs(profile, n, dtype)
        call = _call(variant, q, k, v, grad_out, backward, anchor_backend if is_anchor else None)

        # Untimed: correctness, then memory, the cost counters, then the round sizes.
        max_error, error_note = _error(variant, n, dtype, q, k, v, grad_out, backward, profile, error_cache)
        peak = measure.peak_memory_bytes(call, dev)
        # the memory run above called this shape: plan caches are warm, no extra warm call
        cost = None if compiled.is_compiled(name) else counters.count(
            variant, q, k, v, grad_out, backward=backward, warm=False)
        repeats = _repeats(call, timer)

        # SDPA of the same shape / dtype / causal flag / pass, timed in pedantic's (untimed)
        # setup right before each round of the variant: the pairs give ratio_to_sdpa.
        sdpa_times = []
        if is_anchor:
            anchor_repeats = repeats

            def round_setup():
                flush()
        else:
            sdpa, anchor_backend, anchor_name = _anchor(variant, n, dev, anchor_backend)
            anchor_call = _call(sdpa, q, k, v, grad_out, backward, anchor_backend)
            anchor_repeats = _repeats(anchor_call, timer)

            def round_setup():
                flush()
                sdpa_times.append(measure.round_seconds(anchor_call, anchor_repeats, timer))
                flush()

        def timed_round():
            measure.ROUND_CLOCK.advance(measure.round_seconds(call, repeats, timer))

        benchmark.group = f"N={n} {dtype} {mode}"
        benchmark.pedantic(timed_round, setup=round_setup, rounds=rounds(n),
                           warmup_rounds=profile.warmup_rounds, iterations=1)
        flex_info = _flex(variant, n, dev, backward, q, k, v, grad_out, timer, flush) if variant.masked else {}
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        pytest.skip(f"{name} N={n} {dtype} {mode}: out of device memory")

    if benchmark.stats is None:  # --benchmark-disable: a smoke run, nothing to record
        return
    stats = benchmark.stats.stats
    median, times = stats.median, list(stats.data)
    sdpa_times = sdpa_times[-len(times):] if sdpa_times else times  # less warm-up; dense is its own anchor
    sdpa_median = statistics.median(sdpa_times)
    flops = variant.flops(b, n, h, d, backward=backward)
    anchor = registry.Variant("sdpa", "The SDPA anchor of this benchmark.", registry.Kind.DENSE,
                              causal=variant.causal)
    # a masked anchor does the variant's useful work (and more, which its TFLOP/s hide)
    sdpa_flops = flops if anchor_name == "sdpa+mask" else anchor.flops(b, n, h, d, backward=backward)
    benchmark.extra_info.update({
        "variant": name,
        "kind": variant.kind.value,
        "from_earlier_project": variant.from_earlier_project,
        "aliases": registry.aliases_of(name),
        "causal": variant.causal,
        "N": n, "B": b, "H": h, "D": d,
        "dtype": dtype,
        "pass": mode,
        "device": dev,
        "device_name": _device.device_name(dev),
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "median_s": median,
        "peak_memory_bytes": peak,
        "tokens_per_s": b * n / median,
        "flops": flops,
        "tflops": flops / median / 1e12,
        "sdpa_median_s": sdpa_median,
        "sdpa_tflops": sdpa_flops / sdpa_median / 1e12,
        "sdpa_backend": anchor_backend or "default",
        "sdpa_anchor": anchor_name,  # "sdpa+mask": SDPA with the variant's boolean mask
        "ratio_to_sdpa": measure.paired_ratio(times, sdpa_times),
        "sdpa_round_s": sdpa_times,  # round i's anchor: the history's per-round ratios (perf.history)
        **flex_info,  # a masked row's FlexAttention anchor: flex_median_s, or why it has none
        **({} if cost is None else {"counters": cost.as_dict()}),
        "compiled": profile.compile_mode if compiled.is_compiled(name) else None,
        "max_error": max_error,
        "max_error_note": error_note,
        "rounds": rounds(n),
        "warmup_rounds": profile.warmup_rounds,
        "repeats_per_round": repeats,
        "sdpa_repeats_per_round": anchor_repeats,
        "round_timer": "cuda-events" if dev == "cuda" else "perf_counter",
        "l2_flush": flush.active,
    })
