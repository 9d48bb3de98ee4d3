"""pytest glue for the benchmarks: options, device / profile fixtures, baseline storage.

* ``--perf-device auto|cpu|cuda`` picks the profile (``auto``: CUDA when available).
* ``--perf-n 256,512`` / ``--perf-dtype float32`` / ``--perf-rounds 1`` override the profile
  (tests and smoke runs use them).
* Baselines live in ``perf/baselines/<device-slug>/``: pytest-benchmark's storage is set to
  ``perf/baselines`` and its machine id (normally ``Linux-CPython-3.11-64bit``, which names no
  GPU) is replaced by the device slug, so ``pytest perf/test_bench_attention.py
  --benchmark-compare`` compares with this device's baseline directly.
"""

from __future__ import annotations

import dataclasses
import platform
import time
from pathlib import Path

import pytest
import torch

from perf import device as _device
from perf import measure

BASELINES = Path(__file__).resolve().parent / "baselines"
DEFAULT_STORAGE = "file://./.benchmarks"


def pytest_addoption(parser):
    group = parser.getgroup("perf", "ring_attention benchmark profile")
    group.addoption("--perf-device", default="auto", choices=("auto", "cpu", "cuda"),
                    help="device profile to run (auto: cuda when available)")
    group.addoption("--perf-n", default=None, help="comma-separated sequence lengths (overrides the profile)")
    group.addoption("--perf-dtype", default=None, help="comma-separated dtypes (overrides the profile)")
    group.addoption("--perf-rounds", type=int, default=None, help="timed rounds (overrides the profile)")
    group.addoption("--perf-warmup", type=int, default=None, help="warm-up rounds (overrides the profile)")
    group.addoption("--perf-threads", type=int, default=None,
                    help="torch.set_num_threads for the run (overrides the profile; the CPU profile uses 1)")


def _profile(config) -> _device.Profile:
    cached = getattr(config, "_perf_profile", None)
    if cached is not None:
        return cached
    dev = _device.pick_device(config.getoption("--perf-device"))
    prof = _device.profile_for(dev)
    if config.getoption("--perf-n"):
        prof = dataclasses.replace(prof, seq_lens=tuple(int(x) for x in config.getoption("--perf-n").split(",")))
    if config.getoption("--perf-dtype"):
        prof = dataclasses.replace(prof, dtypes=tuple(config.getoption("--perf-dtype").split(",")))
    if config.getoption("--perf-warmup") is not None:
        prof = dataclasses.replace(prof, warmup_rounds=config.getoption("--perf-warmup"))
    if config.getoption("--perf-threads") is not None:
        prof = dataclasses.replace(prof, threads=config.getoption("--perf-threads"))
    config._perf_profile = prof
    return prof


def pytest_configure(config):
    """Point pytest-benchmark at ``perf/baselines/<device-slug>/`` (runs before its own configure)."""
    try:
        import pytest_benchmark.session as bench_session
    except ImportError:  # pragma: no cover - pytest-benchmark is in the test and perf extras
        return
    slug = _device.device_slug(_profile(config).device)
    config._perf_slug = slug
    # The storage key: pytest-benchmark reads it from this module-level function.
    bench_session.get_machine_id = lambda: slug
    if config.getoption("benchmark_storage", DEFAULT_STORAGE) == DEFAULT_STORAGE:
        config.option.benchmark_storage = f"file://{BASELINES}"


def pytest_benchmark_update_machine_info(config, machine_info):
    """Add the accelerator (absent from pytest-benchmark's machine info) and torch's version."""
    prof = _profile(config)
    machine_info["perf_device"] = getattr(config, "_perf_slug", _device.device_slug(prof.device))
    machine_info["device_name"] = _device.device_name(prof.device)
    machine_info["torch"] = torch.__version__
    machine_info["cuda"] = torch.version.cuda
    machine_info["python_version"] = platform.python_version()
    machine_info["torch_threads"] = prof.threads or torch.get_num_threads()


@pytest.fixture(scope="session")
def profile(request) -> _device.Profile:
    return _profile(request.config)


@pytest.fixture(scope="session")
def warm_process(profile):
    """Set the profile's thread count, then warm the process: thread pools, kernels, the profiler.

    Without it the first benchmark of a session reads tens of percent slow. About a second.
    """
    if profile.threads is not None:
        torch.set_num_threads(profile.threads)
    shape = (profile.batch, min(profile.seq_lens), profile.heads, profile.head_dim)
    dtype = getattr(torch, profile.dtypes[0])
    leaves = [torch.randn(shape, device=profile.device, dtype=dtype).requires_grad_() for _ in range(3)]

    def step():
        out = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in leaves))
        out.sum().backward()

    measure.peak_memory_bytes(step, profile.device)
    deadline = time.perf_counter() + 1.0
    while time.perf_counter() < deadline:
        step()
    measure.sync(profile.device)


@pytest.fixture(scope="session")
def error_cache() -> dict:
    """Sampled-row errors per ``(variant, N, dtype)`` (shared by both passes)."""
    return {}


@pytest.fixture
def rounds(request, profile):
    """``seq_len -> timed rounds`` (the profile's, or ``--perf-rounds``)."""
    fixed = request.config.getoption("--perf-rounds")
    return (lambda n: fixed) if fixed else profile.rounds


@pytest.fixture
def device_sync(profile):
    """Call to wait for the device (CUDA synchronize; nothing on CPU)."""
    return lambda: measure.sync(profile.device)


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    from ring_attention import registry

    prof = _profile(metafunc.config)
    cases, ids = [], []
    for n in prof.seq_lens:
        for dtype in prof.dtypes:
            for mode in _device.PASSES:
                for name in prof.variants_at(n, registry.VARIANTS):
                    cases.append((name, n, dtype, mode))
                    ids.append(f"{name}-N{n}-{dtype}-{mode}")
    metafunc.parametrize("case", cases, ids=ids)
