"""pytest glue for the benchmarks: options, device / profile fixtures, baseline storage, timer.

* ``--perf-device auto|cpu|cuda`` picks the profile (``auto``: CUDA when available).
* ``--perf-variants Production_CP,longnet`` (registry names or aliases), ``--perf-n 1024,2048``,
  ``--perf-dtype float32``, ``--perf-pass fwd``, ``--perf-rounds 3``, ``--perf-warmup 1``,
  ``--perf-threads 1``, ``--perf-compiled longnet`` and ``--perf-compile-mode default`` (the
  variants also benchmarked through ``torch.compile``) select and override the profile. Bad values are usage errors (exit 4
  from pytest, 2 from ``python -m perf``) that name the option.
* Baselines are read from ``perf/baselines/<device-slug>/``: pytest-benchmark's storage is set
  to ``perf/baselines`` and its machine id (normally ``Linux-CPython-3.11-64bit``, which names
  no GPU) is replaced by the device slug, so ``pytest perf/test_bench_attention.py
  --benchmark-compare`` compares with this device's baseline. Runs saved by pytest-benchmark
  itself (``--benchmark-save``, ``--benchmark-autosave``) go to its usual ``.benchmarks/<slug>/``
  instead, never next to the baseline: only ``python -m perf --save-baseline`` writes that.
* pytest-benchmark's timer is ``perf.measure.round_clock``: each round reports the device
  time it measured itself (CUDA events, or a synchronized host clock).
"""

from __future__ import annotations

import dataclasses
import platform
import re
import time
from pathlib import Path

import pytest
import torch

from perf import compiled, measure
from perf import device as _device
from perf.options import dtypes, non_negative_int, passes, positive_int, rank_counts, seq_lens, variant_names

BASELINES = Path(__file__).resolve().parent / "baselines"
DEFAULT_STORAGE = "file://./.benchmarks"
DEFAULT_TIMER = "time.perf_counter"
ROUND_TIMER = "perf.measure.round_clock"


def pytest_addoption(parser):
    group = parser.getgroup("perf", "ring_attention benchmark profile")
    group.addoption("--perf-device", default="auto", choices=("auto", "cpu", "cuda"),
                    help="device profile to run (auto: cuda when available)")
    group.addoption("--perf-baselines", default=str(BASELINES),
                    help="folder of the per-device baselines pytest-benchmark compares with (default perf/baselines)")
    group.addoption("--perf-variants", type=variant_names, default=None,
                    help="comma-separated registry names or aliases (default: every variant)")
    group.addoption("--perf-n", type=seq_lens, default=None,
                    help="comma-separated sequence lengths (overrides the profile)")
    group.addoption("--perf-dtype", type=dtypes, default=None, help="comma-separated dtypes (overrides the profile)")
    group.addoption("--perf-pass", type=passes, default=None, help="comma-separated passes: fwd, fwd+bwd")
    group.addoption("--perf-compiled", type=variant_names, default=None,
                    help="comma-separated variants also benchmarked through torch.compile (overrides the profile)")
    group.addoption("--perf-compile-mode", default=None,
                    choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
                    help="torch.compile mode of the compiled benchmarks (overrides the profile)")
    group.addoption("--perf-rounds", type=positive_int, default=None, help="timed rounds (overrides the profile)")
    group.addoption("--perf-warmup", type=non_negative_int, default=None,
                    help="warm-up rounds (overrides the profile)")
    group.addoption("--perf-threads", type=positive_int, default=None,
                    help="torch.set_num_threads for the run (overrides the profile; the CPU profile uses 1)")
    group.addoption("--perf-ranks", type=rank_counts, default=None,
                    help="comma-separated ring sizes R of the real-rank rows (test_bench_real_ranks.py; "
                         "overrides the profile)")


def _profile(config) -> _device.Profile:
    cached = getattr(config, "_perf_profile", None)
    if cached is not None:
        return cached
    dev = _device.pick_device(config.getoption("--perf-device"))
    prof = _device.profile_for(dev)
    if config.getoption("--perf-n"):
        prof = dataclasses.replace(prof, seq_lens=config.getoption("--perf-n"), real_ranks_n=config.getoption("--perf-n"))
    if config.getoption("--perf-ranks"):
        prof = dataclasses.replace(prof, real_ranks=config.getoption("--perf-ranks"))
    if config.getoption("--perf-rounds") is not None:
        prof = dataclasses.replace(prof, real_ranks_rounds=config.getoption("--perf-rounds"))
    if config.getoption("--perf-dtype"):
        prof = dataclasses.replace(prof, dtypes=config.getoption("--perf-dtype"))
    if config.getoption("--perf-warmup") is not None:
        prof = dataclasses.replace(prof, warmup_rounds=config.getoption("--perf-warmup"))
    if config.getoption("--perf-compiled"):
        prof = dataclasses.replace(prof, compiled=config.getoption("--perf-compiled"))
    if config.getoption("--perf-compile-mode"):
        prof = dataclasses.replace(prof, compile_mode=config.getoption("--perf-compile-mode"))
    if config.getoption("--perf-threads") is not None:
        prof = dataclasses.replace(prof, threads=config.getoption("--perf-threads"))
    config._perf_profile = prof
    return prof


def pytest_configure(config):
    """Baseline storage, machine id and timer for pytest-benchmark (runs before its own configure)."""
    try:
        import pytest_benchmark.session as bench_session
    except ImportError:  # pragma: no cover - pytest-benchmark is in the test and perf extras
        return
    try:
        slug = _device.device_slug(_profile(config).device)
    except RuntimeError as exc:  # --perf-device cuda without CUDA
        raise pytest.UsageError(str(exc)) from None
    config._perf_slug = slug
    # The storage key: pytest-benchmark reads it from this module-level function.
    bench_session.get_machine_id = lambda: slug
    if config.getoption("benchmark_storage", DEFAULT_STORAGE) == DEFAULT_STORAGE:
        config.option.benchmark_storage = f"file://{Path(config.getoption('--perf-baselines')).resolve()}"
        config._perf_divert_saves = True
    timer = config.getoption("benchmark_timer", DEFAULT_TIMER)
    if timer == DEFAULT_TIMER:
        config.option.benchmark_timer = ROUND_TIMER
    elif timer != ROUND_TIMER:
        raise pytest.UsageError(f"--benchmark-timer={timer}: the perf benchmarks time their own rounds "
                                f"(CUDA events or a synchronized clock); leave the timer option out")
    if config.getoption("benchmark_histogram", None):
        try:
            import pygal  # noqa: F401
            import pygaljs  # noqa: F401
        except ImportError:
            raise pytest.UsageError("--benchmark-histogram needs pygal and pygaljs: "
                                    "pip install -e .[perf] installs them") from None


def pytest_sessionstart(session):
    """Send pytest-benchmark's own saves to ``.benchmarks/<slug>/``, away from the baselines.

    Its configure has loaded the runs to compare with from ``perf/baselines`` by now; the
    storage is used again only to save (``--benchmark-save`` / ``--benchmark-autosave``).
    """
    config = session.config
    bench = getattr(config, "_benchmarksession", None)
    if bench is None or not getattr(config, "_perf_divert_saves", False):
        return
    if bench.save or bench.autosave:
        from pytest_benchmark.storage.file import FileStorage

        bench.storage = FileStorage(Path(DEFAULT_STORAGE[len("file://"):]), logger=bench.logger,
                                    default_machine_id=config._perf_slug)


def pytest_benchmark_update_machine_info(config, machine_info):
    """Add the accelerator (absent from pytest-benchmark's machine info) and torch's version."""
    prof = _profile(config)
    machine_info["perf_device"] = getattr(config, "_perf_slug", _device.device_slug(prof.device))
    machine_info["device_name"] = _device.device_name(prof.device)
    machine_info["torch"] = torch.__version__
    machine_info["cuda"] = torch.version.cuda
    machine_info["python_version"] = platform.python_version()
    machine_info["torch_threads"] = prof.threads or torch.get_num_threads()


@pytest.hookimpl(tryfirst=True)
def pytest_benchmark_compare_machine_info(config, benchmarksession, machine_info, compared_benchmark):
    """One line naming the machine-info fields that differ from the baseline's.

    pytest-benchmark's own check prints both machine infos whole (two JSON dumps, CPU flags
    and all) when any field differs, which on a per-device baseline is the rule: the clock
    reading, the kernel release or the host name move between runs of the same device class.
    Baselines are chosen by device slug, so what decides comparability (the slug) already
    matches. Its check runs after this one and compares what this hands it: the saved
    machine info, once described here, is replaced by the current one in memory (the file
    is untouched), so the dumps never print.
    """
    saved = compared_benchmark.get("machine_info") or {}
    differ = _differing_fields(machine_info, saved)
    if differ:
        benchmarksession.logger.info(
            f"perf: the baseline's machine differs in {', '.join(differ)}; baselines are per device "
            f"({machine_info.get('perf_device')}), so times still compare"
        )
    compared_benchmark["machine_info"] = machine_info


def _differing_fields(now: dict, saved: dict, prefix: str = "") -> list[str]:
    """Dotted names of the fields whose values differ (nested dicts compared field by field)."""
    out = []
    for key in sorted(set(now) | set(saved)):
        a, b = now.get(key), saved.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differing_fields(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}")
    return out


_BENCH_ID = re.compile(r"\[(?P<variant>.+?)(?:-R(?P<ranks>\d+))?-N(?P<n>\d+)-(?P<dtype>\w+)-(?P<pass>fwd\+bwd|fwd)\]$")
BENCH_FILES = ("test_bench_attention.py::", "test_bench_real_ranks.py::")


# Benchmarks started and collected, and the terminal they are reported on (one session per process).
_PROGRESS: dict = {}


def pytest_collection_finish(session):
    _PROGRESS.update(done=0, total=len(session.items),
                     reporter=session.config.pluginmanager.get_plugin("terminalreporter"))


def _bench_label(nodeid: str) -> str | None:
    """``"RingDilatedV2-ring4 N=1024 float32 fwd"`` for a benchmark of a bench file
    (``"RingAttention-zigzag-causal R=2 N=4096 float32 fwd"`` for a real-rank row)."""
    match = _BENCH_ID.search(nodeid) if any(f in nodeid for f in BENCH_FILES) else None
    if match is None:
        return None
    ranks = f" R={match['ranks']}" if match["ranks"] else ""
    return f"{match['variant']}{ranks} N={match['n']} {match['dtype']} {match['pass']}"


def pytest_runtest_logstart(nodeid, location):
    """A line per benchmark as it starts (variant, N, dtype, pass): a full run takes many
    minutes, and pytest's dots say nothing of where it is. (Called outside output capture.)"""
    label, reporter = _bench_label(nodeid), _PROGRESS.get("reporter")
    if label is None or reporter is None:
        return
    _PROGRESS["done"] += 1
    reporter.write_line(f"perf: [{_PROGRESS['done']}/{_PROGRESS['total']}] {label}")


def pytest_report_teststatus(report, config):
    """A passing benchmark prints no dot: its progress line stands for it (failures keep theirs)."""
    if report.when == "call" and report.passed and _bench_label(report.nodeid) is not None:
        return "passed", "", "PASSED"
    return None


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


def pytest_generate_tests(metafunc):
    if "real_case" in metafunc.fixturenames:
        from perf import real_ranks

        prof = _profile(metafunc.config)
        found = real_ranks.cases(prof, prof.real_ranks, metafunc.config.getoption("--perf-pass") or _device.PASSES)
        metafunc.parametrize("real_case", found, ids=[c.name for c in found])
    if "case" not in metafunc.fixturenames:
        return
    from ring_attention import registry

    prof = _profile(metafunc.config)
    chosen = metafunc.config.getoption("--perf-variants")
    variants = [v for v in registry.VARIANTS.values() if chosen is None or v.name in chosen]
    modes = metafunc.config.getoption("--perf-pass") or _device.PASSES
    cases, ids = [], []
    for n in prof.seq_lens:
        for dtype in prof.dtypes:
            for mode in modes:
                eager = prof.variants_at(n, variants)
                names = eager + [name + compiled.SUFFIX for name in prof.compiled if name in eager]
                for name in names:
                    cases.append((name, n, dtype, mode))
                    ids.append(f"{name}-N{n}-{dtype}-{mode}")
    metafunc.parametrize("case", cases, ids=ids)
