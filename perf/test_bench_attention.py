"""Benchmarks: every registry variant x sequence length x dtype x pass (fwd, fwd+bwd).

Each benchmark times the variant with ``benchmark.pedantic`` (fixed rounds, warm-up rounds,
synchronized region), then fills ``extra_info`` from separate, untimed runs: peak memory,
error against the dense reference, and the SDPA median of the same shape / dtype / causal
flag / pass, from which ``ratio_to_sdpa`` (variant time / SDPA time) follows.
"""

from __future__ import annotations

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


def test_attention(benchmark, case, profile, rounds, sdpa_cache, error_cache, warm_process):
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

        # SDPA of the same shape / dtype / causal flag / pass, once per run.
        key = (n, dtype, variant.causal, mode)
        if key not in sdpa_cache and not (variant.kind == "dense"):
            sdpa = lambda q_, k_, v_: dense_attention(q_, k_, v_, causal=variant.causal)  # noqa: E731
            s_setup, s_target = _runner(sdpa, q, k, v, grad_out, backward, dev)
            sdpa_cache[key] = measure.median_seconds(
                s_target, dev, rounds(n), profile.warmup_rounds, setup=s_setup)

        benchmark.group = f"N={n} {dtype} {mode}"
        benchmark.pedantic(target, setup=setup, rounds=rounds(n),
                           warmup_rounds=profile.warmup_rounds, iterations=1)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        pytest.skip(f"{name} N={n} {dtype} {mode}: out of device memory")

    if benchmark.stats is None:  # --benchmark-disable: a smoke run, nothing to record
        return
    median = benchmark.stats.stats.median
    if variant.kind == "dense":
        sdpa_cache.setdefault(key, median)
    sdpa_median = sdpa_cache[key]
    flops = variant.flops(b, n, h, d, backward=backward)
    sdpa_flops = registry.VARIANTS["dense"].flops(b, n, h, d, backward=backward) if not variant.causal else (
        registry.Variant("sdpa-causal", "", "dense", causal=True).flops(b, n, h, d, backward=backward))
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
        "median_s": median,
        "peak_memory_bytes": peak,
        "tokens_per_s": b * n / median,
        "flops": flops,
        "tflops": flops / median / 1e12,
        "sdpa_median_s": sdpa_median,
        "sdpa_tflops": sdpa_flops / sdpa_median / 1e12,
        "ratio_to_sdpa": median / sdpa_median,
        "max_error": max_error,
        "max_error_note": error_note,
        "rounds": rounds(n),
        "warmup_rounds": profile.warmup_rounds,
    })
