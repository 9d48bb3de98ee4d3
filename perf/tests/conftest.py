"""Shared builders for the perf-suite tests: synthetic pytest-benchmark JSON dicts."""

from __future__ import annotations

import copy

import pytest


def make_counters(launches=60, fused_calls=3, peak_bytes=4 << 20, bytes_sent=0, flops=2e8,
                  busiest_rank_pairs=2_500_000):
    """``extra_info["counters"]`` as perf/counters.py records it."""
    return {"launches": launches, "fused_calls": fused_calls, "peak_bytes": peak_bytes,
            "bytes_sent": bytes_sent, "flops": flops, "busiest_rank_pairs": busiest_rank_pairs}


def make_bench(variant="Production", n=1024, mode="fwd", *, median=0.010, peak=8 << 20, error=1e-6,
               ratio=1.5, dtype="float32", counters=None):
    """One benchmark entry shaped like pytest-benchmark's JSON, with the suite's extra_info.

    ``counters``: ``extra_info["counters"]`` (default :func:`make_counters`; ``False``: none,
    as in baselines older than the counters).
    """
    sdpa = median / ratio
    return {
        "name": f"test_attention[{variant}-N{n}-{dtype}-{mode}]",
        "group": f"N={n} {dtype} {mode}",
        "stats": {"median": median, "min": median * 0.9, "max": median * 1.1, "mean": median, "rounds": 5,
                  "iqr": median * 0.02},
        "extra_info": {
            "variant": variant, "N": n, "B": 1, "H": 8, "D": 64, "dtype": dtype, "pass": mode,
            "median_s": median, "peak_memory_bytes": peak, "tokens_per_s": n / median,
            "tflops": 1e-3 / median, "sdpa_median_s": sdpa, "sdpa_tflops": 1e-3 / sdpa,
            "ratio_to_sdpa": ratio, "max_error": error, "max_error_note": "output vs full dense reference",
            **({} if counters is False else {"counters": counters or make_counters()}),
        },
    }


def make_run(benches):
    return {
        "machine_info": {"perf_device": "cpu-test", "device_name": "test cpu", "torch": "x"},
        "benchmarks": benches,
        "datetime": "2026-01-01T00:00:00",
    }


@pytest.fixture
def baseline_run():
    benches = []
    for n, scale in ((1024, 1.0), (2048, 4.0)):
        for mode in ("fwd", "fwd+bwd"):
            benches.append(make_bench("dense", n, mode, median=0.01 * scale, ratio=1.0))
            benches.append(make_bench("Production", n, mode, median=0.015 * scale, ratio=1.5))
            benches.append(make_bench("longnet", n, mode, median=0.02 * scale, ratio=2.0, peak=4 << 20))
    return make_run(benches)


@pytest.fixture
def current_run(baseline_run):
    """A fresh copy of the baseline (callers plant regressions in it)."""
    return copy.deepcopy(baseline_run)
