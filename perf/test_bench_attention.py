"""Benchmarks: every registry variant x sequence length x dtype x pass (fwd, fwd+bwd).

Each benchmark times the variant with ``benchmark.pedantic`` (fixed rounds, warm-up rounds,
synchronized region) and fills ``extra_info`` with separate, untimed measurements: peak
memory and error against the dense reference. SDPA of the same shape / dtype / causal flag /
pass is timed in pedantic's setup, right before each round of the variant; ``ratio_to_sdpa``
is the median of the per-round ratios (variant time / SDPA time).
"""

from __future__ import annotations

import statistics

import pytest
import torch

from perf import device as _device
from perf import measure
from ring_attention import registry
from ring_attention.dense import dense_attention


def _inputs(profile, n, dtype):
    gen = torch.Generator(device="cpu").manual_seed(1234 + n)
    shape = (profile.batch, n, profile.heads, profile.head_dim)
    q, k, v, g = (torch.randn(shape, generator=gen) for _ in range(4))
    return [x.to(device=profile.device, dtype=getattr(torch, dtype)) for x in (q, k, v, g)]


def _runner(fn, q, k, v, grad_out, backward, device):
    """``(setup, target)`` for pedantic: target runs fn (and its backward) and synchronizes."""
    if not backward:
        def target():
            with torch.no_grad():
                fn(q, k, v)
            measure.sync(device)

        return (lambda: measure.sync(device)), target

    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]

    def setup():
        for x in leaves:
            x.grad = None
        measure.sync(device)

    def target():
        fn(*leaves).backward(grad_out)
        measure.sync(device)

    return setup, target


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
    variant = registry.VARIANTS[name]
    if not variant.supports(n, profile.heads):
        pytest.skip(f"{name} does not support N={n}, H={profile.heads}")
    backward = mode == "fwd+bwd"
    dev, b, h, d = profile.device, profile.batch, profile.heads, profile.head_dim
    try:
        q, k, v, grad_out = _inputs(profile, n, dtype)
        setup, target = _runner(variant, q, k, v, grad_out, backward, dev)

        # Untimed: correctness, then memory.
        max_error, error_note = _error(variant, n, dtype, q, k, v, grad_out, backward, profile, error_cache)
        setup()
        peak = measure.peak_memory_bytes(target, dev)

        # SDPA of the same shape / dtype / causal flag / pass, timed in pedantic's (untimed)
        # setup right before each round of the variant: the pairs give ratio_to_sdpa.
        sdpa_times = []
        round_setup = setup
        if variant.kind != "dense":
            sdpa = lambda q_, k_, v_: dense_attention(q_, k_, v_, causal=variant.causal)  # noqa: E731
            s_setup, s_target = _runner(sdpa, q, k, v, grad_out, backward, dev)

            def round_setup():
                sdpa_times.append(measure.seconds(s_target, dev, setup=s_setup))
                setup()

        benchmark.group = f"N={n} {dtype} {mode}"
        benchmark.pedantic(target, setup=round_setup, rounds=rounds(n),
                           warmup_rounds=profile.warmup_rounds, iterations=1)
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
    anchor = registry.Variant("sdpa", "The SDPA anchor of this benchmark.", "dense", causal=variant.causal)
    sdpa_flops = anchor.flops(b, n, h, d, backward=backward)
    benchmark.extra_info.update({
        "variant": name,
        "seed": variant.seed,
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
        "ratio_to_sdpa": measure.paired_ratio(times, sdpa_times),
        "max_error": max_error,
        "max_error_note": error_note,
        "rounds": rounds(n),
        "warmup_rounds": profile.warmup_rounds,
    })
