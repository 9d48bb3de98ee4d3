"""Benchmark regression suite for ``ring_attention``.

Run it with ``python -m perf`` (or ``nox -s perf``); see ``perf/README.md``.

Modules:
    device: device detection, the device slug and the CPU / CUDA benchmark profiles.
    measure: synchronized timing, real peak-memory measurement, error against the reference.
    gate: the pure regression gate over pytest-benchmark JSON dicts.
    report: markdown table and PNG plot from a benchmark JSON.
"""
