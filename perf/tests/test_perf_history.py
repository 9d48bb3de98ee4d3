"""The history: the regression decision, the store, the runner's history options, the command."""

from __future__ import annotations

import random

import pytest

from perf import __main__ as runner
from perf import gate, history, trend
from perf.tests.conftest import make_bench, make_run

# The committed sample history: runs of `python -m perf --profile history` on this project's CPU.
SAMPLE = history.HERE / "history" / "sample"


def rounds(seed, n=15, scale=1.0, spread=0.03):
    """Per-round ratios as a machine gives them: log-normal spread, a few slow outliers."""
    rng = random.Random(seed)
    return [scale * 0.57 * rng.lognormvariate(0, spread) * (1.3 if rng.random() < 0.1 else 1.0) for _ in range(n)]


def test_planted_slowdown_is_flagged_and_the_same_code_is_not():
    assert trend.judge(rounds(1), rounds(2, scale=1.08)).regression
    assert trend.judge(rounds(1), rounds(2, scale=1.08), threshold_pct=10).significant
    assert not trend.judge(rounds(1), rounds(2, scale=1.08), threshold_pct=10).regression
    same = [trend.judge(rounds(s), rounds(s + 1000)) for s in range(60)]
    assert not any(v.regression for v in same)
    assert sum(v.significant for v in same) <= 3  # the test's own level: about 1 in 100


def test_both_arms_are_needed():
    base = [0.50 + 0.001 * i for i in range(15)]
    below = trend.judge(base, [x * 1.03 for x in base])  # significant, +3% < 5%
    assert below.significant and not below.above_threshold and not below.regression
    assert below.label == "significant, below threshold"
    noisy = trend.judge([0.5, 0.9, 0.4], [0.7, 0.55, 0.6])  # +20%, 3 rounds: cannot be significant
    assert noisy.above_threshold and not noisy.significant and not noisy.regression and not noisy.reachable
    above = trend.judge(base, [x * 1.08 for x in base])
    assert above.regression and above.label == "**REGRESSION**" and above.change_pct == pytest.approx(8)
    faster = trend.judge(base, [x * 0.9 for x in base])
    assert not faster.significant and not faster.regression
    assert trend.judge(base, base).threshold_pct == gate.Thresholds().trend_pct


def test_real_rounds_from_the_sample_history():
    """The committed sample: a clean rerun is not flagged, the planted 8% run and clean rounds x 1.08 are."""
    (sample,) = SAMPLE.glob("*.jsonl")  # one device's
    runs = history.load(sample)
    clean = [r for r in runs if not (r.get("note") or "").startswith("planted")]
    planted = [i for i, r in enumerate(runs) if (r.get("note") or "").startswith("planted")]
    name = "test_attention[longnet-N1024-float32-fwd]"
    ratios = [history.round_ratios(b) for r in clean for b in r["benchmarks"] if b["name"] == name]
    assert len(ratios) >= 3 and planted
    assert not trend.judge(ratios[0], ratios[1]).regression
    assert trend.judge(ratios[0], [x * 1.08 for x in ratios[1]]).regression
    found = {(v.name, v.runs[1]): v for v in trend.verdicts(runs, every=True)}
    assert found[(name, planted[0])].regression


def bench_with_rounds(variant, times, anchors):
    b = make_bench(variant, median=sorted(times)[len(times) // 2])
    b["stats"]["data"] = list(times)
    b["extra_info"]["sdpa_round_s"] = list(anchors)
    return b


def test_store_appends_runs_with_their_rounds(tmp_path):
    run = make_run([bench_with_rounds("longnet", [2.0, 4.0], [1.0, 2.0]), make_bench("dense")])  # dense: no data
    path = history.store_path(tmp_path / "h", "cpu-test")
    for note in (None, "planted"):
        history.append(path, history.entry(run, commit="a" * 40, dirty=note is not None, note=note))
    runs = history.load(path)
    assert [len(r["benchmarks"]) for r in runs] == [1, 1] and runs[0]["slug"] == "cpu-test"
    assert history.round_ratios(runs[0]["benchmarks"][0]) == [2.0, 2.0]
    assert [history.run_label(r) for r in runs] == ["aaaaaaa", "aaaaaaa* planted"]
    path.write_text(path.read_text() + "{broken\n")
    with pytest.raises(history.HistoryError, match=":3:"):
        history.load(path)


def test_git_state(tmp_path):
    commit, _ = history.git_state()
    assert len(commit) == 40
    assert history.git_state(tmp_path) == ("unknown", False)


def test_history_profile_fills_only_what_was_left_open():
    args, _ = runner.parse(["--profile", "history", "--variants", "dense"])
    history.apply_profile(args, "cpu")
    assert args.variants == ("dense",) and args.n == (1024,) and args.rounds == history.ROUNDS >= 15
    with pytest.raises(SystemExit):
        runner.parse(["--profile", "history", "--smoke"])


def test_merged_baseline_drops_the_sdpa_rounds():
    run = make_run([bench_with_rounds("longnet", [2.0, 4.0], [1.0, 2.0])])
    kept = runner.merged_baseline(None, run, replace=True)["benchmarks"][0]
    assert "sdpa_round_s" not in kept["extra_info"] and "data" not in kept["stats"]


def test_history_command_flags_the_planted_run(tmp_path, capsys):
    base = [0.5 + 0.001 * i for i in range(15)]
    path = tmp_path / "cpu-test.jsonl"
    for scale in (1.0, 1.0, 1.08):
        run = make_run([bench_with_rounds("longnet", [x * scale for x in base], [1.0] * 15),
                        bench_with_rounds("dense", base, base)])
        history.append(path, history.entry(run, commit="b" * 40, dirty=False))
    assert runner.main(["history", "--file", str(path), "--no-plots"]) == 1
    out = capsys.readouterr().out
    assert "**REGRESSION**" in out and "dense" not in out  # the anchor is not judged
    assert "REGRESSION" in (tmp_path / "cpu-test" / "regressions.md").read_text()
    assert trend.main(["--file", str(path), "--threshold-pct", "10", "--no-plots"]) == 0
    assert trend.main(["--file", str(tmp_path / "none.jsonl")]) == 2


def test_history_plots(tmp_path):
    pytest.importorskip("matplotlib")
    base = [0.5 + 0.001 * i for i in range(15)]
    runs = [history.entry(make_run([bench_with_rounds("longnet", [x * s for x in base], [1.0] * 15)]),
                          commit=c * 40, dirty=False) for c, s in (("a", 1.0), ("b", 1.08))]
    from perf import trend_plot

    written = trend_plot.write(runs, tmp_path, trend.verdicts(runs))
    assert [p.name for p in written] == ["longnet.png"] and written[0].stat().st_size > 1000
