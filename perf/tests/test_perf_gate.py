"""Each arm of the gate passes on the baseline and fails on a planted regression."""

from __future__ import annotations

import json
import math

import pytest

from perf import gate
from perf.tests.conftest import make_bench, make_counters, make_run


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


def _set_iqr(bench, iqr):
    bench["stats"]["iqr"] = iqr


def test_ratio_arm_ignores_moves_within_the_rounds_spread_and_dense(baseline_run, current_run):
    b = _bench(current_run, "Production", n=1024)  # median 15 ms
    for run in (baseline_run, current_run):
        _set_iqr(_bench(run, "Production", n=1024), 2e-3)
    b["stats"]["median"] += 1.5e-3  # moved less than the rounds' spread (2 ms): SDPA's rounds moved
    b["extra_info"]["ratio_to_sdpa"] *= 2
    _bench(current_run, "dense")["extra_info"]["ratio_to_sdpa"] = 5.0
    assert gate.check(current_run, baseline_run).ok


def test_ratio_guard_is_relative_to_the_spread_not_one_millisecond():
    """GPU-sized times: a 0.3 ms move is 30 times the rounds' spread, so the ratio arm judges it."""
    base = make_run([make_bench("Production", median=1.0e-3, ratio=1.5)])
    now = make_run([make_bench("Production", median=1.3e-3, ratio=2.0)])
    for run in (base, now):
        _set_iqr(run["benchmarks"][0], 1e-5)
    result = gate.check(now, base, gate.Thresholds(time_pct=75))
    assert _arms(result) == {"ratio"}


def test_ratio_guard_takes_the_size_of_the_move_faster_or_slower():
    """A machine twice as fast: the raw median dropped far beyond the spread, the ratio still grew 50%."""
    base = make_run([make_bench("Production", median=20e-3, ratio=1.5)])
    now = make_run([make_bench("Production", median=10e-3, ratio=2.25)])
    for run in (base, now):
        _set_iqr(run["benchmarks"][0], 0.5e-3)
    result = gate.check(now, base)
    assert _arms(result) == {"ratio"}, gate.summary(result)


def test_correctness_floor_ignores_tiny_errors_far_above_a_tiny_baseline():
    base = make_run([make_bench("longnet", error=1e-9)])
    under_floor = make_run([make_bench("longnet", error=5e-6)])  # 5000x the baseline, under 1e-5
    over_floor = make_run([make_bench("longnet", error=2e-5)])
    assert gate.check(under_floor, base).ok
    assert _arms(gate.check(over_floor, base)) == {"correctness"}


@pytest.mark.parametrize("dtype, error, ok", [
    ("bfloat16", 0.1, True),   # above float32's 1e-3, within bfloat16's 0.25
    ("float16", 0.04, True),   # within float16's 5e-2
    ("float16", 0.06, False),  # above it
    ("float64", 1e-6, False),  # within float32's 1e-3, above float64's 1e-8
])
def test_correctness_tolerance_is_the_run_dtypes(dtype, error, ok):
    tol = {"float32": 1e-3, "float64": 1e-8, "float16": 5e-2, "bfloat16": 2.5e-1}[dtype]
    assert (error <= tol) == ok  # the table above, independently
    base = make_run([make_bench("longnet", dtype=dtype, error=error)])
    now = make_run([make_bench("longnet", dtype=dtype, error=error)])
    assert gate.check(now, base).ok == ok


def test_new_benchmarks_get_the_absolute_error_check(baseline_run, current_run):
    wrong = make_bench("brand-new", n=1024, error=0.5)
    nan = make_bench("brand-new", n=2048, error=math.nan)
    current_run["benchmarks"] += [wrong, nan]
    result = gate.check(current_run, baseline_run)
    assert {(f.arm, f.name) for f in result.failures} == {("correctness", wrong["name"]),
                                                          ("correctness", nan["name"])}
    assert {n.name for n in result.notes if n.arm == "new"} == {wrong["name"], nan["name"]}


def test_nan_baseline_error_does_not_turn_the_check_off():
    base = make_run([make_bench("longnet", error=math.nan)])
    now = make_run([make_bench("longnet", error=5e-4)])  # within float32's 1e-3, above the 1e-5 floor
    assert _arms(gate.check(now, base)) == {"correctness"}


def test_missing_benchmarks_are_notes_in_a_subset_and_failures_in_a_full_run(baseline_run, current_run):
    gone = current_run["benchmarks"].pop()
    extra = dict(_bench(current_run, "dense"), name="test_attention[new-N1-float32-fwd]")
    current_run["benchmarks"].append(extra)
    subset = gate.check(current_run, baseline_run)
    assert subset.ok
    assert {n.arm for n in subset.notes} == {"new", "missing"}
    text = gate.summary(subset)
    assert "not in the baseline" in text and "not selected" in text
    full = gate.check(current_run, baseline_run, full_run=True)
    assert [(f.arm, f.name) for f in full.failures] == [("coverage", gone["name"])]


def test_a_run_that_compares_nothing_fails(baseline_run):
    other = make_run([make_bench("longnet", n=4096)])
    result = gate.check(other, baseline_run)
    assert result.compared == 0 and not result.ok
    assert _arms(result) == {"coverage"}
    assert "FAIL" in gate.summary(result)


@pytest.mark.parametrize("counter", list(make_counters()))
def test_counter_arm_fails_on_a_rise_of_one_and_passes_equal(baseline_run, current_run, counter):
    assert gate.check(current_run, baseline_run).ok  # equal counters pass
    _bench(current_run, "longnet", mode="fwd+bwd")["extra_info"]["counters"][counter] += 1
    result = gate.check(current_run, baseline_run)
    assert [(f.arm, f.name) for f in result.failures] == [
        ("counters", "test_attention[longnet-N2048-float32-fwd+bwd]")], gate.summary(result)
    assert f"{counter} " in result.failures[0].message and "(+1)" in result.failures[0].message
    # no allowance anywhere: the loosest thresholds leave the rise failing, and no re-run drops it
    loose = gate.Thresholds(time_pct=1e6, memory_pct=1e6, ratio_pct=1e6, error_factor=1e6)
    assert not gate.confirmed(gate.check(current_run, baseline_run, loose), gate.GateResult([], [], 1)).ok


def test_counter_fall_is_an_improvement_not_a_failure(baseline_run, current_run):
    counters = _bench(current_run, "Production")["extra_info"]["counters"]
    counters["launches"] -= 20
    counters["peak_bytes"] -= 1
    result = gate.check(current_run, baseline_run)
    assert result.ok
    improved = [n for n in result.notes if n.arm == "improved"]
    assert [n.name for n in improved] == ["test_attention[Production-N2048-float32-fwd]"]
    assert "launches 40 vs baseline 60 (-20)" in improved[0].message and "peak_bytes" in improved[0].message
    assert "improved [improved] test_attention[Production-N2048" in gate.summary(result)


def test_counters_missing_from_a_side_are_not_compared(baseline_run, current_run):
    for b in baseline_run["benchmarks"]:  # a baseline saved before the counters existed
        del b["extra_info"]["counters"]
    for c in _bench(current_run, "longnet")["extra_info"]["counters"], \
            _bench(current_run, "Production", 1024)["extra_info"]["counters"]:
        c["launches"] += 1000
    result = gate.check(current_run, baseline_run)
    assert result.ok, gate.summary(result)
    skipped = [n for n in result.notes if n.arm == "counters-not-compared"]
    assert len(skipped) == len(baseline_run["benchmarks"]) and "baseline" in skipped[0].message
    assert f"cost counters not compared for {len(skipped)} benchmark(s)" in gate.summary(result)
    # a run without counters against a baseline with them: not compared either, never a crash
    fresh = make_run([make_bench("dense", 1024, "fwd", ratio=1.0), make_bench("longnet", counters=make_counters())])
    bare = make_run([make_bench("dense", 1024, "fwd", ratio=1.0, counters=False), make_bench("longnet")])
    result = gate.check(bare, fresh)
    assert result.ok and [n.message for n in result.notes if n.arm == "counters-not-compared"] == [
        "no cost counters in the run"]


def test_counters_only_on_one_side_are_noted_and_the_shared_ones_gated(baseline_run, current_run):
    counters = _bench(current_run, "longnet")["extra_info"]["counters"]
    counters["graph_breaks"] = 3
    counters["fused_calls"] += 1
    result = gate.check(current_run, baseline_run)
    assert [f.arm for f in result.failures] == ["counters"] and "fused_calls" in result.failures[0].message
    assert any(n.arm == "counters-not-compared" and "graph_breaks" in n.message for n in result.notes)


def test_confirmed_keeps_deterministic_failures_and_timing_failures_seen_twice():
    F = gate.Finding
    first = gate.GateResult([
        F("memory", "a", "m"), F("correctness", "b", "c"), F("coverage", "c", "x"),
        F("time", "d", "t"), F("ratio", "e", "r"), F("time", "f", "t"),
    ], notes=[], compared=6)
    # The re-run covers d, e, f only; it flags d's time again, and e on another arm.
    rerun = gate.GateResult([F("time", "d", "t2"), F("time", "e", "t2")], notes=[], compared=3)
    kept = gate.confirmed(first, rerun)
    assert {(f.arm, f.name) for f in kept.failures} == {
        ("memory", "a"), ("correctness", "b"), ("coverage", "c"), ("time", "d")}
    assert gate.confirmed(first, None).failures == first.failures  # no re-run: nothing dropped


def _write(tmp_path, data):
    path = tmp_path / "0001_baseline.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


@pytest.mark.parametrize("mutate, field, problem", [
    (lambda d: d["benchmarks"][1]["extra_info"].pop("max_error"), "benchmarks[1]", "missing"),
    (lambda d: d["benchmarks"][0]["stats"].update(median="0.01"), "stats.median", "not a number"),
    (lambda d: d["benchmarks"][0]["stats"].update(median=0.0), "stats.median", "> 0"),
    (lambda d: d["benchmarks"][2]["extra_info"].update(max_error=math.nan), "extra_info.max_error", "finite"),
    (lambda d: d["benchmarks"][0]["extra_info"].update(ratio_to_sdpa=math.inf), "ratio_to_sdpa", "finite"),
    (lambda d: d["benchmarks"][0]["extra_info"].update(peak_memory_bytes=True), "peak_memory_bytes",
     "not a number"),
    (lambda d: d["benchmarks"][0].pop("stats"), "benchmarks[0]", "stats"),
    (lambda d: d["benchmarks"].append(dict(d["benchmarks"][0])), "name", "duplicate"),
    (lambda d: d.update(benchmarks=[]), "benchmarks", "empty"),
    (lambda d: d.pop("benchmarks"), "benchmarks", "missing"),
    (lambda d: d["benchmarks"][3]["extra_info"].update(counters=[1]), "extra_info.counters", "not a JSON object"),
    (lambda d: d["benchmarks"][3]["extra_info"]["counters"].update(launches="5"), "counters.launches",
     "not a number"),
    (lambda d: d["benchmarks"][3]["extra_info"]["counters"].update(bytes_sent=-1), "counters.bytes_sent", ">= 0"),
])
def test_validate_names_file_and_field(tmp_path, baseline_run, mutate, field, problem):
    for b in baseline_run["benchmarks"]:
        b["stats"]["iqr"] = 1e-4
    assert gate.load_baseline(_write(tmp_path, baseline_run)) == baseline_run  # valid as made
    mutate(baseline_run)
    path = _write(tmp_path, baseline_run)
    with pytest.raises(gate.BaselineError) as info:
        gate.load_baseline(path)
    message = str(info.value)
    assert str(path) in message and field in message and problem in message, message


def test_validate_truncated_file(tmp_path, baseline_run):
    text = json.dumps(baseline_run)
    path = _write(tmp_path, text[: len(text) // 2])
    with pytest.raises(gate.BaselineError, match="not valid JSON") as info:
        gate.load_baseline(path)
    assert info.value.path == str(path)
