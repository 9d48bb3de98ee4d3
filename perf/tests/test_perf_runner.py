"""The runner's pure parts: option parsing, selection, full-run detection, baseline merging."""

from __future__ import annotations

import pytest

from perf import __main__ as runner
from perf.tests.conftest import make_bench, make_run


def test_runner_options_become_pytest_options():
    args, pytest_args = runner.parse(["--variants", "Production_CP,RingDilatedV2_Ring4", "--n", "1024,2048",
                                      "--pass", "fwd", "--dtype", "float32", "--time-pct", "7.5",
                                      "--rounds", "3", "--", "-x"])
    assert args.time_pct == 7.5 and pytest_args == ["-x"]
    assert runner.selection_args(args) == [
        "--perf-variants=Production-checkpoint,RingDilatedV2-ring4", "--perf-n=1024,2048", "--perf-pass=fwd",
        "--perf-dtype=float32", "--perf-rounds=3"]
    smoke, _ = runner.parse(["--smoke"])
    assert runner.selection_args(smoke) == ["--perf-rounds=1", "--perf-warmup=0"]


@pytest.mark.parametrize("argv", [["--time-pct", "nan"], ["--memory-pct", "-3"], ["--n", "0"], ["--n", ","],
                                  ["--pass", "bwd"], ["--dtype", "float8"], ["--replace"],
                                  ["--smoke", "--save-baseline"], ["--warmup", "-1"], ["--", "--perf-device=cuda"]])
def test_bad_runner_options_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as info:
        runner.parse(argv)
    assert info.value.code == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("pytest_args, full", [
    ([], True), (["-x", "--perf-rounds=2", "-p", "perf.tests.planted_regression"], True),
    (["-k", "dense"], False), (["-kdense"], False), (["--perf-n=1024"], False),
    (["--perf-variants=dense"], False), (["perf/test_bench_attention.py::test_attention[dense-N1-float32-fwd]"], False),
    (["-m", "slow"], False), (["--deselect", "x"], False),
])
def test_full_run_detection(pytest_args, full):
    assert runner.is_full_run(pytest_args) is full


def test_merged_baseline_keeps_other_benchmarks_and_drops_raw_data():
    old = make_run([make_bench("dense", median=1.0), make_bench("longnet", median=2.0)])
    fresh = make_bench("longnet", median=3.0)
    fresh["stats"]["data"] = [3.0, 3.1]
    new = make_bench("Production", median=4.0)
    run = make_run([fresh, new])
    merged = runner.merged_baseline(old, run, replace=False)
    assert [(b["extra_info"]["variant"], b["stats"]["median"]) for b in merged["benchmarks"]] == [
        ("dense", 1.0), ("longnet", 3.0), ("Production", 4.0)]
    assert "data" not in merged["benchmarks"][1]["stats"] and "data" in fresh["stats"]  # a copy
    replaced = runner.merged_baseline(old, run, replace=True)
    assert [b["extra_info"]["variant"] for b in replaced["benchmarks"]] == ["longnet", "Production"]
    assert runner.merged_baseline(None, run, replace=False)["benchmarks"] == replaced["benchmarks"]


def test_load_run_refuses_empty_and_broken_files(tmp_path):
    empty = tmp_path / "latest.json"
    empty.write_text("")  # what pytest-benchmark leaves when pytest refuses its arguments
    assert runner.load_run(empty) is None
    (tmp_path / "half.json").write_text('{"benchmarks": [')
    assert runner.load_run(tmp_path / "half.json") is None
    assert runner.load_run(tmp_path / "absent.json") is None
