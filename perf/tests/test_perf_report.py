"""The report: per-length tables shaped like the earlier project's, honest ranking, full table, plot."""

from __future__ import annotations

import math

from perf import report
from perf.tests.conftest import make_bench, make_run


def _cells(md, prefix):
    lines = [line for line in md.splitlines() if line.startswith(prefix)]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines]


def _section(md, heading):
    """The lines of ``md`` from ``heading`` to the next heading of any level."""
    lines = md.splitlines()
    start = lines.index(heading)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("#")), len(lines))
    return "\n".join(lines[start:end])


def test_one_table_per_length_with_the_earlier_projects_columns(baseline_run):
    md = report.markdown(baseline_run, title="T")
    assert "### N = 1,024 (float32, fwd)" in md and "### N = 2,048 (float32, fwd+bwd)" in md
    table = _section(md, "### N = 2,048 (float32, fwd)")
    header = _cells(table, "| variant")[0]
    for col in ("time (ms)", "memory (MiB)", "memory vs ImprovedDilated", "throughput (tokens/s)",
                "speed vs ImprovedDilated", "speed vs SDPA", "max error", "correct"):
        assert col in header
    rows = {c[0]: c for c in _cells(table, "| ") if c[0] in ("dense", "Production", "longnet")}
    assert rows["Production"][1] == "60.00"  # 0.015 s * 4
    assert rows["Production"][2] == "8.00"  # 8 MiB
    assert rows["Production"][4] == f"{2048 / 0.06:,.0f}"
    assert rows["Production"][6] == "0.67x"  # ratio 1.5: SDPA is 1.5x faster
    assert rows["Production"][8] == "pass"
    assert rows["Production"][3] == "n/a"  # no ImprovedDilatedAttention row in this run
    times = [float(c[1]) for c in _cells(table, "| ") if c[0] in rows]
    assert times == sorted(times)  # fastest first, like the earlier project's tables


def test_relative_to_improved_dilated():
    run = make_run([make_bench("ImprovedDilatedAttention", median=0.020, peak=4 << 20),
                    make_bench("Production", median=0.010, peak=6 << 20)])
    table = _section(report.markdown(run), "### N = 1,024 (float32, fwd)")
    rows = {c[0]: c for c in _cells(table, "| ") if c[0] in ("ImprovedDilatedAttention", "Production")}
    assert rows["Production"][5] == "2.00x" and rows["Production"][3] == "1.50x"
    assert rows["ImprovedDilatedAttention"][5] == "1.00x" and rows["ImprovedDilatedAttention"][3] == "1.00x"
    memory = _section(report.markdown(run), "### Memory vs ImprovedDilatedAttention at the largest length")
    assert "Production 6.00 MiB (+50%)" in memory


def test_best_throughput_ranks_correct_rows_only():
    fastest_but_wrong = make_bench("longnet", median=0.001, error=0.5)
    nan = make_bench("dense", median=0.002, error=math.nan)
    right = make_bench("Production", median=0.004, error=1e-6)
    slower = make_bench("ImprovedDilatedAttention", median=0.008, error=1e-6)
    run = make_run([fastest_but_wrong, nan, right, slower])
    want = max((b for b in run["benchmarks"] if b["extra_info"]["max_error"] <= 1e-3),
               key=lambda b: b["extra_info"]["tokens_per_s"])["extra_info"]["variant"]
    assert want == "Production"
    md = report.markdown(run)
    findings = _section(md, "### Best throughput by sequence length (correct rows only)")
    assert f"**{want}**" in findings and "**longnet**" not in findings
    assert "not ranked (error above tolerance): longnet, dense" in findings
    table = _section(md, "### N = 1,024 (float32, fwd)")
    verdicts = {c[0]: c[8] for c in _cells(table, "| ") if c[0] in ("longnet", "dense", "Production")}
    assert verdicts == {"longnet": "**FAIL** (not ranked)", "dense": "**FAIL** (not ranked)",
                        "Production": "pass"}


def test_full_table_keeps_every_column(baseline_run):
    md = report.markdown(baseline_run, title="T")
    full = _section(md, "## Full table")
    header = _cells(full, "| variant")[0]
    for col in ("variant", "N", "pass", "time (median ms)", "memory (MiB)", "tokens/s",
                "relative speed (vs dense SDPA)", "TFLOP/s", "% of SDPA", "max error"):
        assert col in header
    rows = [c for c in _cells(full, "| Production | 2048 |")]
    assert len(rows) == 2
    assert rows[0][4] == "60.00" and rows[0][7] == "0.67x" and rows[0][9] == "67%" and rows[0][10] == "1.00e-06"
    assert "![time and memory against N](report.png)" in md


def test_rows_sorted_and_speed(baseline_run):
    rows = report.rows(baseline_run)
    assert [r["N"] for r in rows] == sorted(r["N"] for r in rows)
    dense = [r for r in rows if r["variant"] == "dense"]
    assert all(abs(r["speed_vs_sdpa"] - 1.0) < 1e-12 for r in dense)


def test_write_png(tmp_path, baseline_run):
    md, png = report.write(baseline_run, tmp_path / "out")
    assert md.read_text().startswith("# ring_attention benchmarks on cpu-test\n")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_cost_counters_table():
    from perf.tests.conftest import make_counters

    run = make_run([make_bench("longnet", counters=make_counters(launches=158, fused_calls=7, peak_bytes=3 << 20,
                                                                 bytes_sent=0, flops=4.5e9)),
                    make_bench("RingAttention-ring2", counters=make_counters(bytes_sent=1 << 20)),
                    make_bench("dense", counters=False)])
    section = _section(report.markdown(run), "## Cost counters")
    header = _cells(section, "| variant")[0]
    assert header == ["variant", "N", "dtype", "pass", "launches", "fused calls", "live peak (MiB)",
                      "sent per rank (MiB)", "GFLOP", "busiest rank (M pairs)"]
    rows = {c[0]: c for c in _cells(section, "| ") if c[0] != "variant"}
    assert rows["longnet"][4:] == ["158", "7", "3.00", "0.00", "4.50", "2.50"]
    assert rows["RingAttention-ring2"][7] == "1.00"
    assert "dense" not in rows  # a benchmark without counters has no row
    bare = report.markdown(make_run([make_bench("dense", counters=False)]))
    assert "No cost counters in this run." in _section(bare, "## Cost counters")


def test_masked_rows_against_flex_attention():
    timed, untimed = make_bench("ring4-window-causal", median=0.010), make_bench("ring4-window-causal", mode="fwd+bwd")
    timed["extra_info"].update(flex_anchor="flex_attention+block_mask", flex_median_s=0.025)
    untimed["extra_info"].update(flex_anchor="no FlexAttention backward on CPU")
    section = _section(report.markdown(make_run([timed, untimed, make_bench("dense")])),
                       "## Masked rows against FlexAttention")
    rows = {(c[0], c[3]): c for c in _cells(section, "| ") if c[0] != "variant"}
    assert rows[("ring4-window-causal", "fwd")][4:] == ["10.00", "25.00", "2.50x"]
    assert rows[("ring4-window-causal", "fwd+bwd")][5:] == ["n/a (no FlexAttention backward on CPU)", "n/a"]
    assert len(rows) == 2  # an unmasked row has none
    assert "No masked rows in this run." in _section(report.markdown(make_run([make_bench("dense")])),
                                                      "## Masked rows against FlexAttention")
