"""End to end: ``python -m perf`` on a tiny real benchmark: first run, gate, planted regressions.

Runs the real benchmark file (dense and Production forward at N=512, 2 rounds) in
subprocesses with temporary baseline and report folders, so nothing under ``perf/`` changes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from perf import device

ROOT = Path(__file__).resolve().parents[2]
N = 512
TINY = ["--variants=dense,Production_NoCP", f"--n={N}", "--pass=fwd", "--rounds=2", "--warmup=1"]
NAMES = {f"test_attention[dense-N{N}-float32-fwd]", f"test_attention[Production-N{N}-float32-fwd]"}


def _perf(tmp_path, *args, timeout=300):
    cmd = [sys.executable, "-m", "perf", "--device=cpu", f"--baselines-dir={tmp_path / 'baselines'}",
           f"--reports-dir={tmp_path / 'reports'}", *args]
    # the CPU profile pins one thread itself; the history goes to the run's folder, not perf/history
    env = dict(os.environ, OMP_NUM_THREADS="2", PERF_HISTORY_DIR=str(tmp_path / "history"))
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The first run on a device with no baseline: it passes and saves the baseline."""
    tmp = tmp_path_factory.mktemp("perf_e2e")
    rc, out = _perf(tmp, *TINY)
    assert rc == 0, out
    slug = device.device_slug("cpu")
    path = tmp / "baselines" / slug / "0001_baseline.json"
    assert path.exists(), out
    assert f"no baseline for device '{slug}' yet" in out and "git add" in out and "saved baseline" in out
    return tmp, path


def test_first_run_saves_baseline_and_report(saved):
    tmp, path = saved
    run = json.loads(path.read_text())
    assert {b["name"] for b in run["benchmarks"]} == NAMES
    for b in run["benchmarks"]:
        e = b["extra_info"]
        assert e["peak_memory_bytes"] > 0 and 0 < e["max_error"] < 1e-4 and e["ratio_to_sdpa"] > 0
        assert e["tflops"] > 0 and e["tokens_per_s"] > 0 and e["N"] == N and e["pass"] == "fwd"
        assert e["threads"] == device.CPU_PROFILE.threads == 1
        assert e["repeats_per_round"] >= 1 and e["sdpa_backend"] == "default" and "data" not in b["stats"]
        assert b["options"]["timer"] == "round_clock"  # the perf rounds clock, not perf_counter
        c = e["counters"]
        assert c["launches"] >= c["fused_calls"] >= 1 and c["peak_bytes"] > 0 and c["bytes_sent"] == 0
        assert c["flops"] == e["flops"]
    assert run["machine_info"]["perf_device"] == device.device_slug("cpu")
    report = tmp / "reports" / device.device_slug("cpu")
    assert f"### N = {N} (float32, fwd)" in (report / "report.md").read_text()
    assert (report / "report.png").stat().st_size > 0
    lines = (tmp / "history" / f"{device.device_slug('cpu')}.jsonl").read_text().splitlines()
    recorded = json.loads(lines[0])  # this first run's
    assert {b["name"] for b in recorded["benchmarks"]} == NAMES and len(recorded["commit"]) == 40
    for b in recorded["benchmarks"]:
        assert len(b["round_s"]) == len(b["sdpa_round_s"]) == 2 and b["counters"] and b["peak_memory_bytes"] > 0
        assert "sdpa_round_s" not in next(x for x in run["benchmarks"] if x["name"] == b["name"])["extra_info"]


def test_require_baseline_exits_3_before_running(tmp_path):
    rc, out = _perf(tmp_path, "--require-baseline", *TINY, timeout=60)
    assert rc == 3, out
    assert "benchmarks took" not in out  # nothing ran
    assert not (tmp_path / "baselines").exists()


def test_second_run_gates_against_the_saved_baseline(saved):
    tmp, path = saved
    before = path.read_text()
    rc, out = _perf(tmp, "--time-pct=1000", "--ratio-pct=1000", *TINY)
    assert rc == 0, out
    assert "perf gate: 2 benchmarks compared" in out and "perf gate: PASS" in out
    assert path.read_text() == before  # a gated run never writes the baseline


def test_a_baseline_from_another_machine_of_the_device_says_so_in_one_line(saved, tmp_path):
    """pytest-benchmark dumps both machine infos whole when a field differs: one line instead,
    naming the fields; and each benchmark shows a progress line as it starts."""
    _, path = saved
    moved = json.loads(path.read_text())
    moved["machine_info"].update(node="another-host", release="0.0-planted")
    moved["machine_info"]["cpu"]["hz_actual_friendly"] = "9.9 GHz"
    target = tmp_path / "baselines" / path.parent.name / path.name
    target.parent.mkdir(parents=True)
    target.write_text(json.dumps(moved))
    rc, out = _perf(tmp_path, "--time-pct=1000", "--ratio-pct=1000", *TINY)
    assert rc == 0, out
    assert "machine_info is different" not in out and '"flags"' not in out, out
    lines = [line for line in out.splitlines() if "the baseline's machine differs in" in line]
    assert len(lines) == 1 and all(f in lines[0] for f in ("cpu.hz_actual_friendly", "node", "release")), out
    assert device.device_slug("cpu") in lines[0]
    assert f"perf: [1/2] Production N={N} float32 fwd" in out or f"perf: [1/2] dense N={N} float32 fwd" in out, out
    assert "perf: [2/2] " in out
    assert json.loads(target.read_text()) == moved  # the baseline file is untouched


def test_gate_fails_against_planted_better_baseline(saved, tmp_path):
    tmp, path = saved
    planted = json.loads(path.read_text())
    for b in planted["benchmarks"]:
        b["stats"]["median"] /= 10  # the baseline was 10x faster ...
        for key in ("min", "max", "mean", "iqr"):
            b["stats"][key] /= 10
        b["extra_info"]["peak_memory_bytes"] //= 8  # ... used 8x less memory ...
        b["extra_info"]["ratio_to_sdpa"] /= 10  # ... relative to SDPA too
    (tmp_path / "baselines" / path.parent.name).mkdir(parents=True)
    (tmp_path / "baselines" / path.parent.name / path.name).write_text(json.dumps(planted))
    rc, out = _perf(tmp_path, "--time-pct=50", *TINY)
    assert rc == 1, out
    assert "confirming 2 timing regression(s)" in out  # re-run of the flagged benchmarks
    assert "not confirmed" not in out
    for arm in ("[time]", "[memory]", "[ratio]"):  # correctness: see test_perf_gate.py
        assert arm in out, out
    assert "perf gate: FAIL" in out


def test_gate_fails_on_planted_code_regression(saved):
    """A slower (sleeping), bigger, wrong block kernel with more launches (perf/tests/planted_regression.py)
    fails every arm.

    Deterministic: memory and error do not depend on timing, and the planted 50 ms sleep per
    block is over ten times the forward's own few milliseconds, which load can only lengthen.
    """
    tmp, _ = saved
    rc, out = _perf(tmp, *TINY, "--", "-p", "perf.tests.planted_regression")
    assert rc == 1, out
    failures = [line for line in out.splitlines() if line.strip().startswith("FAIL [")]
    for arm in ("time", "memory", "correctness", "ratio", "counters"):
        assert any(f"[{arm}] test_attention[Production-N{N}-" in line for line in failures), out
    assert not any("dense" in line for line in failures), out  # SDPA does not call the kernel
    assert "perf gate: FAIL" in out


def test_invalid_baseline_exits_4_before_running(saved, tmp_path):
    _, path = saved
    broken = json.loads(path.read_text())
    broken["benchmarks"][1]["stats"]["median"] = "fast"
    target = tmp_path / "baselines" / path.parent.name / path.name
    target.parent.mkdir(parents=True)
    target.write_text(json.dumps(broken))
    rc, out = _perf(tmp_path, *TINY, timeout=60)
    assert rc == 4, out
    assert str(target) in out and "benchmarks[1]" in out and "stats.median" in out
    assert "benchmarks took" not in out and "Traceback" not in out


@pytest.mark.parametrize("args, says", [
    (["--save-basline"], "unrecognized arguments: --save-basline"),
    (["--rounds=0"], "--rounds: 0 < 1"),
    (["--time-pct=-1"], "--time-pct"),
    (["--n=abc"], "--n: 'abc' is not an integer"),
    (["--variants=NoSuch"], "unknown variant 'NoSuch'"),
    (["--", "--perf-n=abc"], "--perf-n: 'abc' is not an integer"),
    (["--", "--perf-rounds=0"], "--perf-rounds: 0 < 1"),
    (["--", "--benchmark-json=x.json"], "the runner sets it itself"),
])
def test_usage_errors_exit_2_with_a_message(tmp_path, args, says):
    rc, out = _perf(tmp_path, *args, timeout=120)
    assert rc == 2, out
    assert says in out and "Traceback" not in out and "JSONDecodeError" not in out


def test_saving_a_subset_merges_into_the_baseline(saved, tmp_path):
    _, path = saved
    target = tmp_path / "baselines" / path.parent.name / path.name
    target.parent.mkdir(parents=True)
    target.write_text(path.read_text())
    one = ["--variants=longnet", f"--n={N}", "--pass=fwd", "--rounds=1", "--warmup=0"]
    rc, out = _perf(tmp_path, "--save-baseline", *one)
    assert rc == 0, out
    merged = {b["name"] for b in json.loads(target.read_text())["benchmarks"]}
    assert merged == NAMES | {f"test_attention[longnet-N{N}-float32-fwd]"}
    rc, out = _perf(tmp_path, "--save-baseline", "--replace", *one)
    assert rc == 0, out
    assert {b["name"] for b in json.loads(target.read_text())["benchmarks"]} == {
        f"test_attention[longnet-N{N}-float32-fwd]"}


def test_pytest_benchmark_saves_never_touch_the_baseline_but_compare_finds_it(saved, tmp_path):
    _, path = saved
    baselines = path.parent.parent
    before = sorted(p.name for p in path.parent.iterdir())
    cmd = [sys.executable, "-m", "pytest", str(ROOT / "perf" / "test_bench_attention.py"), "-q",
           "-p", "no:cacheprovider", "--perf-device=cpu", f"--perf-baselines={baselines}",
           "--perf-variants=dense", f"--perf-n={N}", "--perf-pass=fwd", "--perf-rounds=1",
           "--benchmark-save=mine", "--benchmark-compare", "--benchmark-autosave"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "Comparing against benchmarks from:" in out and "0001_baseline.json" in out
    assert sorted(p.name for p in path.parent.iterdir()) == before  # nothing written beside it
    saved_runs = sorted(p.name for p in (tmp_path / ".benchmarks" / path.parent.name).iterdir())
    assert saved_runs and all(name != "0001_baseline.json" for name in saved_runs)
