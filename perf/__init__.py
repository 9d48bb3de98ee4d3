"""Benchmark regression suite for ``ring_attention``.

Run it with ``python -m perf`` (or ``nox -s perf``); see ``perf/README.md``.

Modules:
    device: device detection, the device slug and the CPU / CUDA benchmark profiles.
    measure: per-round device timing (CUDA events / synchronized clock, repeated short calls,
        L2 flush, pinned SDPA anchor), real peak-memory measurement, error against the reference.
    counters: deterministic cost counters of one call (launches, fused calls, live-bytes peak,
        bytes sent per rank, FLOPs), untimed; ``python -m perf.counters`` prints them.
    gate: baseline validation and the pure regression gate over pytest-benchmark JSON dicts.
    report: per-length markdown tables, key findings, full table and PNG plot from a benchmark JSON.
    options: argparse types shared by the runner and the pytest options.
"""
