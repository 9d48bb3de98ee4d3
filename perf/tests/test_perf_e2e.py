"""End to end: ``python -m perf`` on a tiny real benchmark, then against planted baselines.

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
# N=512 keeps the medians (a few ms) clear of the ratio arm's 1 ms timer-noise guard, which a
# planted 10x faster baseline must not fall under.
N = 512
TINY = ["--", "-k", "(dense or Production-N) and not bwd", f"--perf-n={N}", "--perf-rounds=2", "--perf-warmup=1"]


def _perf(tmp_path, *args):
    cmd = [sys.executable, "-m", "perf", "--device=cpu", f"--baselines-dir={tmp_path / 'baselines'}",
           f"--reports-dir={tmp_path / 'reports'}", *args]
    env = dict(os.environ, OMP_NUM_THREADS="2")  # the CPU profile pins one thread itself
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny baseline saved by ``--save-baseline``, and the module's temp folder."""
    tmp = tmp_path_factory.mktemp("perf_e2e")
    rc, out = _perf(tmp, *TINY)  # no baseline yet
    assert rc == 3, out
    assert "nox -s perf -- --save-baseline" in out
    rc, out = _perf(tmp, "--save-baseline", *TINY)
    assert rc == 0, out
    slug = device.device_slug("cpu")
    path = tmp / "baselines" / slug / "0001_baseline.json"
    assert path.exists(), out
    return tmp, path


def test_saved_baseline_and_report(saved):
    tmp, path = saved
    run = json.loads(path.read_text())
    names = {b["name"] for b in run["benchmarks"]}
    assert names == {f"test_attention[dense-N{N}-float32-fwd]", f"test_attention[Production-N{N}-float32-fwd]"}
    for b in run["benchmarks"]:
        e = b["extra_info"]
        assert e["peak_memory_bytes"] > 0 and 0 < e["max_error"] < 1e-4 and e["ratio_to_sdpa"] > 0
        assert e["tflops"] > 0 and e["tokens_per_s"] > 0 and e["N"] == N and e["pass"] == "fwd"
        assert e["threads"] == device.CPU_PROFILE.threads == 1
    assert run["machine_info"]["perf_device"] == device.device_slug("cpu")
    assert run["machine_info"]["torch_threads"] == 1
    report = tmp / "reports" / device.device_slug("cpu")
    assert f"| Production | {N} |" in (report / "report.md").read_text()
    assert (report / "report.png").stat().st_size > 0


def test_gate_passes_against_own_baseline(saved):
    tmp, _ = saved
    rc, out = _perf(tmp, "--time-pct=1000", "--ratio-pct=1000", *TINY)
    assert rc == 0, out
    assert "perf gate: PASS" in out


def test_gate_fails_against_planted_better_baseline(saved, tmp_path):
    tmp, path = saved
    planted = json.loads(path.read_text())
    for b in planted["benchmarks"]:
        b["stats"]["median"] /= 10  # the baseline was 10x faster ...
        for key in ("min", "max", "mean"):
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
    """A slower, bigger, wrong block kernel (perf/tests/planted_regression.py) fails every arm."""
    tmp, _ = saved
    rc, out = _perf(tmp, *TINY, "-p", "perf.tests.planted_regression")
    assert rc == 1, out
    failures = [line for line in out.splitlines() if line.strip().startswith("FAIL [")]
    for arm in ("time", "memory", "correctness", "ratio"):
        assert any(f"[{arm}] test_attention[Production-N{N}-" in line for line in failures), out
    assert not any("dense" in line for line in failures), out  # SDPA does not call the kernel
    assert "perf gate: FAIL" in out
