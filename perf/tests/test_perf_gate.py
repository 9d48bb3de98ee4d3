"""Each arm of the gate passes on the baseline and fails on a planted regression."""

from __future__ import annotations

import math

from perf import gate


def _bench(run, variant, n=2048, mode="fwd"):
    return next(b for b in run["benchmarks"]
                if b["extra_info"]["variant"] == variant and b["extra_info"]["N"] == n
                and b["extra_info"]["pass"] == mode)


def _arms(result):
    return {f.arm for f in result.failures}


def test_baseline_against_itself_passes(baseline_run, current_run):
    result = gate.check(current_run, baseline_run)
    assert result.ok, gate.summary(result)
    assert result.compared == len(baseline_run["benchmarks"])
    assert "PASS" in gate.summary(result)


def test_noise_within_thresholds_passes(baseline_run, current_run):
    for b in current_run["benchmarks"]:  # machine 40% slower across the board, SDPA included
        b["stats"]["median"] *= 1.4
        b["extra_info"]["peak_memory_bytes"] += 1000
        b["extra_info"]["max_error"] *= 3
    assert gate.check(current_run, baseline_run).ok


def test_time_arm(baseline_run, current_run):
    _bench(current_run, "longnet")["stats"]["median"] *= 2.0
    result = gate.check(current_run, baseline_run)
    assert "time" in _arms(result)
    assert any("longnet-N2048" in f.name for f in result.failures)
    assert gate.check(current_run, baseline_run, gate.Thresholds(time_pct=150, ratio_pct=200)).ok


def test_memory_arm(baseline_run, current_run):
    _bench(current_run, "Production", mode="fwd+bwd")["extra_info"]["peak_memory_bytes"] *= 2
    result = gate.check(current_run, baseline_run)
    assert _arms(result) == {"memory"}
    assert "MiB" in str(result.failures[0])


def test_memory_slack_ignores_tiny_growth(baseline_run, current_run):
    _bench(current_run, "Production")["extra_info"]["peak_memory_bytes"] += 128 * 1024 + (8 << 20) // 10
    assert gate.check(current_run, baseline_run).ok


def test_correctness_arm_relative(baseline_run, current_run):
    _bench(current_run, "longnet")["extra_info"]["max_error"] = 5e-4  # < 1e-3 tol, but 500x baseline
    result = gate.check(current_run, baseline_run)
    assert _arms(result) == {"correctness"}
    assert "baseline" in result.failures[0].message


def test_correctness_arm_absolute_and_nan(baseline_run, current_run):
    _bench(current_run, "longnet")["extra_info"]["max_error"] = 0.5
    _bench(current_run, "Production")["extra_info"]["max_error"] = math.nan
    result = gate.check(current_run, baseline_run)
    messages = " ".join(f.message for f in result.failures)
    assert _arms(result) == {"correctness"} and len(result.failures) == 2
    assert "tolerance" in messages and "nan" in messages


def test_correctness_dtype_tolerance(baseline_run, current_run):
    b = _bench(current_run, "longnet")
    b["extra_info"]["dtype"] = "bfloat16"
    b["extra_info"]["max_error"] = 5e-6  # well within bf16 tolerance and floor
    assert gate.check(current_run, baseline_run).ok


def test_ratio_arm(baseline_run, current_run):
    # The variant got 40% slower relative to SDPA while the raw time stays under the time threshold.
    b = _bench(current_run, "Production")
    b["stats"]["median"] *= 1.4
    b["extra_info"]["ratio_to_sdpa"] *= 1.4
    result = gate.check(current_run, baseline_run)
    assert _arms(result) == {"ratio"}
    assert gate.check(current_run, baseline_run, gate.Thresholds(ratio_pct=50)).ok


def test_ratio_arm_ignores_timer_noise_and_dense(baseline_run, current_run):
    tiny = _bench(current_run, "Production", n=1024)
    tiny["stats"]["median"] += 1e-4  # 0.1 ms apart: below min_time_s
    tiny["extra_info"]["ratio_to_sdpa"] *= 2
    _bench(current_run, "dense")["extra_info"]["ratio_to_sdpa"] = 5.0
    assert gate.check(current_run, baseline_run).ok


def test_new_and_missing_benchmarks_are_notes(baseline_run, current_run):
    current_run["benchmarks"].pop()
    extra = dict(_bench(current_run, "dense"), name="test_attention[new-N1-float32-fwd]")
    current_run["benchmarks"].append(extra)
    result = gate.check(current_run, baseline_run)
    assert result.ok
    assert {n.arm for n in result.notes} == {"new", "missing"}
    text = gate.summary(result)
    assert "not in the baseline" in text and "not run" in text
