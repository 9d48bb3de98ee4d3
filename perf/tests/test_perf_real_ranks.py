"""Real-rank rows (perf/real_ranks.py): a tiny row end to end, the slowest-rank reduction, the
hang deadline, and the gate and report reading the rows.

The launches spawn gloo ranks on this CPU (two processes each, a few seconds); the gate and
report tests use synthetic rows.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from perf import __main__ as runner
from perf import device, gate, real_ranks, report, report_ranks
from perf.tests.conftest import make_bench, make_run

ROOT = Path(__file__).resolve().parents[2]
TINY = real_ranks.Case("RingAttention", "zigzag", True, 2, 256, rounds=2, warmup=0)
ROW = f"test_real_ranks[{TINY.name}]"


def test_a_real_rank_row_end_to_end(tmp_path):
    """``python -m perf --real-ranks`` on one tiny row: saved as the first baseline, every field
    the gate reads, bytes measured = predicted, the error within tolerance, the report section."""
    cmd = [sys.executable, "-m", "perf", "--device=cpu", "--real-ranks", f"--baselines-dir={tmp_path / 'b'}",
           f"--reports-dir={tmp_path / 'r'}", "--n=256", "--ranks=2", "--pass=fwd", "--rounds=2", "--warmup=0",
           "--", "-k", "RingAttention-zigzag-causal"]
    env = dict(os.environ, PERF_HISTORY_DIR=str(tmp_path / "h"))
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    slug = device.device_slug("cpu")
    saved = gate.load_baseline(tmp_path / "b" / slug / "0001_baseline.json")  # valid for the gate
    (row,) = saved["benchmarks"]
    assert row["name"] == ROW
    e = row["extra_info"]
    assert e["real_ranks"] and e["ranks"] == 2 and e["threads"] == 1 and e["backend"] == "gloo"
    assert e["bytes_sent_per_rank"] == e["bytes_predicted_per_rank"] and min(e["bytes_sent_per_rank"]) > 0
    assert e["counters"] == {"bytes_sent": max(e["bytes_sent_per_rank"]),
                             "bytes_sent_rank0": e["bytes_sent_per_rank"][0],
                             "bytes_sent_rank1": e["bytes_sent_per_rank"][1]}
    assert 0 <= e["max_error"] < 1e-4 and "full dense reference" in e["max_error_note"]
    assert e["ratio_to_simulation"] > 0 and e["peak_memory_bytes"] > 0 and e["exchange"] in ("hidden", "exposed")
    assert row["stats"]["median"] == pytest.approx(e["median_s"])
    md = (tmp_path / "r" / slug / "report.md").read_text()
    assert "## Real ranks" in md and "| RingAttention-zigzag-causal | 2 |" in md and "(= predicted)" in md


def test_the_row_time_is_the_slowest_rank(tmp_path, monkeypatch):
    """Rank 1 planted 0.25 s slower per call: every round's time is rank 1's, at least 0.25 s."""
    monkeypatch.setenv("PERF_RANK_PLANT", "slow:0.25")
    result = real_ranks.run(TINY, tmp_path, timeout_s=120, worker="perf.tests.planted_rank")
    assert result.slowest_s == result.rank_s[1]
    assert all(t >= 0.25 for t in result.slowest_s)
    assert all(t < 0.25 for t in result.rank_s[0])  # rank 0 is not held up: the plant sleeps after the ring
    assert result.bytes_sent == result.bytes_predicted


def test_a_rank_that_never_joins_fails_fast_with_a_message(tmp_path, monkeypatch):
    monkeypatch.setenv("PERF_RANK_PLANT", "never-join")
    start = time.monotonic()
    with pytest.raises(real_ranks.RankError, match=r"rank\(s\) \[0, 1\] of 2 still running after 4 s"):
        real_ranks.run(TINY, tmp_path, timeout_s=4, worker="perf.tests.planted_rank")
    assert time.monotonic() - start < 20


def _rank_dicts(slowest, rank_times):
    return [{"slowest_s": slowest, "round_s": times, "simulation_s": [0.2] * len(slowest),
             "bytes_sent": 10, "bytes_predicted": [10, 10], "peak_memory_bytes": 1, "max_error": 0.0,
             "threads": 1} for times in rank_times]


def test_merge_refuses_a_slowest_time_that_is_not_the_largest():
    ok = real_ranks.merge(TINY, _rank_dicts([0.3, 0.4], [[0.3, 0.1], [0.2, 0.4]]))
    assert ok.slowest_s == [0.3, 0.4]
    with pytest.raises(real_ranks.RankError, match="round 1"):
        real_ranks.merge(TINY, _rank_dicts([0.3, 0.1], [[0.3, 0.1], [0.2, 0.4]]))  # a MIN, not a MAX


def make_real_bench(variant="RingAttention-zigzag-causal", ranks=2, *, median=0.5, ratio=1.1, sent=(100, 100)):
    """A real-rank row as perf.real_ranks.extra_info records it (no ratio_to_sdpa)."""
    b = make_bench(variant, 4096, "fwd", median=median, counters=False)
    e = b["extra_info"]
    for key in ("ratio_to_sdpa", "sdpa_median_s", "sdpa_tflops"):
        del e[key]
    b["name"] = f"test_real_ranks[{variant}-R{ranks}-N4096-float32-fwd]"
    e.update(real_ranks=True, ranks=ranks, backend="gloo", threads=1, cores=2, ratio_to_simulation=ratio,
             simulation_median_s=median * ranks / ratio, simulation_share_s=median / ratio,
             oversubscription=max(1, ranks / 2), ratio_to_expected=ratio / max(1, ranks / 2),
             exchange="hidden" if ratio / max(1, ranks / 2) <= real_ranks.HIDDEN_MAX else "exposed",
             bytes_sent_per_rank=list(sent), bytes_predicted_per_rank=list(sent),
             counters={"bytes_sent": max(sent), **{f"bytes_sent_rank{i}": s for i, s in enumerate(sent)}})
    return b


def test_the_gate_reads_real_rank_rows():
    base = make_run([make_real_bench(), make_real_bench(ranks=4, ratio=2.1)])
    gate.validate(base)  # ratio_to_simulation stands in for ratio_to_sdpa
    assert gate.check(copy.deepcopy(base), base).ok
    now = copy.deepcopy(base)
    now["benchmarks"][0]["extra_info"]["counters"]["bytes_sent_rank1"] += 1  # one byte more on one rank
    now["benchmarks"][1]["extra_info"]["ratio_to_simulation"] *= 1.5
    now["benchmarks"][1]["stats"]["median"] *= 1.5
    failed = {(f.arm, f.name) for f in gate.check(now, base).failures}
    assert failed == {("counters", base["benchmarks"][0]["name"]), ("ratio", base["benchmarks"][1]["name"])}
    broken = copy.deepcopy(base)
    del broken["benchmarks"][0]["extra_info"]["ratio_to_simulation"]
    with pytest.raises(gate.BaselineError, match="ratio_to_sdpa"):
        gate.validate(broken)


def test_each_bench_file_is_gated_and_covered_against_its_own_rows():
    suite = make_bench("Production")
    both = make_run([suite, make_real_bench()])
    assert [b["name"] for b in runner.rows_of(both, runner.BENCH_FILE)["benchmarks"]] == [suite["name"]]
    assert runner.rows_of(both, runner.REAL_RANKS_FILE)["benchmarks"][0]["extra_info"]["real_ranks"]
    assert runner.rows_of(make_run([suite]), runner.REAL_RANKS_FILE) is None
    # a full run of the suite is not failed by the baseline's real-rank rows it never generates
    assert gate.check(make_run([suite]), runner.rows_of(both, runner.BENCH_FILE), full_run=True).ok


def test_the_report_says_where_the_exchange_hides():
    hidden, exposed = make_real_bench(ratio=1.1), make_real_bench(ranks=4, ratio=3.0)
    wrong = make_real_bench("RingDilated-contiguous-full")
    wrong["extra_info"]["bytes_predicted_per_rank"] = [100, 99]
    md = report.markdown(make_run([hidden, exposed, wrong]))
    lines = {line.split(" | ")[0] + " " + line.split(" | ")[1]: line for line in md.splitlines()
             if line.startswith("| Ring")}
    assert lines["| RingAttention-zigzag-causal 2"].endswith("| hidden |")
    assert lines["| RingAttention-zigzag-causal 4"].endswith("| exposed |")
    assert "1.50x" in lines["| RingAttention-zigzag-causal 4"]  # real / expected: 3.0 / (4 / 2 cores)
    assert "!= predicted" in lines["| RingDilated-contiguous-full 2"]
    assert "## Results by sequence length" not in md  # a real-ranks run: its section only
    assert report_ranks.section(make_run([make_bench()])) == []


def test_cases_cover_both_kinds_layouts_and_masks():
    found = real_ranks.cases(device.CPU_PROFILE, (2, 4), ("fwd", "fwd+bwd"))
    assert len(found) == 2 * 2 * 2 * 2 * 2 and {c.n for c in found} == {4096}
    assert json.loads(json.dumps([c.name for c in found])) == [c.name for c in found]
