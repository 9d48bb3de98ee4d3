"""The report: markdown with every column and real numbers, and a PNG plot."""

from __future__ import annotations

from perf import report


def test_markdown_columns_and_values(baseline_run):
    md = report.markdown(baseline_run, title="T")
    header = next(line for line in md.splitlines() if line.startswith("| variant"))
    for col in ("variant", "N", "pass", "time (median ms)", "memory (MiB)", "tokens/s",
                "relative speed (vs dense SDPA)", "TFLOP/s", "% of SDPA", "max error"):
        assert col in header
    rows = [line for line in md.splitlines() if line.startswith("| Production | 2048 |")]
    assert len(rows) == 2
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[4] == "60.00"  # 0.015 s * 4 -> 60 ms
    assert cells[5] == "8.00"  # 8 MiB
    assert cells[7] == "0.67x"  # ratio 1.5 -> SDPA is 1.5x faster
    assert cells[9] == "67%"
    assert cells[10] == "1.00e-06"


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
