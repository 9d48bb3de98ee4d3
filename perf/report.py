"""Markdown report and PNG plot from a benchmark JSON (``python -m perf.report RUN.json OUTDIR``).

Shaped like the earlier project's reports, readable on GitHub:

1. one table per sequence length (and dtype and pass): variant, time, memory, memory against
   the reference variant (``ImprovedDilatedAttention``, the earlier project's baseline),
   throughput (tokens/s), relative speed to the reference variant and to SDPA, max error
   against the dense reference, and whether that error is within the dtype's tolerance;
2. key findings: the best throughput per length among the *correct* rows (a wrong row is
   flagged and never ranked), and memory against the reference variant at the largest length;
3. the cost counters of :mod:`perf.counters` (launches, fused calls, live-bytes peak, bytes
   sent per rank, FLOPs);
4. the full table (every benchmark, with TFLOP/s and % of SDPA's TFLOP/s) and the plot;
5. real-rank rows (``python -m perf --real-ranks``), in their own section
   (:mod:`perf.report_ranks`): the slowest rank against the simulation's per-rank share.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from perf import gate, report_ranks

REFERENCE_VARIANT = "ImprovedDilatedAttention"
REFERENCE_SHORT = "ImprovedDilated"

COUNTER_COLUMNS = ("variant", "N", "dtype", "pass", "launches", "fused calls", "live peak (MiB)",
                   "sent per rank (MiB)", "GFLOP", "busiest rank (M pairs)")
COLUMNS = ("variant", "N", "dtype", "pass", "time (median ms)", "memory (MiB)", "tokens/s",
           "relative speed (vs dense SDPA)", "TFLOP/s", "% of SDPA", "max error")
LENGTH_COLUMNS = ("variant", "time (ms)", "memory (MiB)", f"memory vs {REFERENCE_SHORT}", "throughput (tokens/s)",
                  f"speed vs {REFERENCE_SHORT}", "speed vs SDPA", "max error", "correct")


def rows(run: dict, thresholds: gate.Thresholds | None = None) -> list[dict]:
    """One row per benchmark with the report's figures, sorted by N, dtype, pass, variant order.

    ``correct``: the max error is a finite number within the dtype's absolute tolerance (the
    gate's), so the row may be ranked.
    """
    thr = thresholds or gate.Thresholds()
    out = []
    for i, b in enumerate(run.get("benchmarks", [])):
        e = b.get("extra_info", {})
        if "median_s" not in e or report_ranks.is_real(b):  # real-rank rows: their own section
            continue
        err = e.get("max_error")
        out.append({
            "order": i,
            "variant": e["variant"], "N": e["N"], "dtype": e["dtype"], "pass": e["pass"],
            "time_ms": b["stats"]["median"] * 1e3,
            "memory_mib": e["peak_memory_bytes"] / 2**20,
            "tokens_per_s": e["tokens_per_s"],
            "speed_vs_sdpa": 1.0 / e["ratio_to_sdpa"],
            "ratio_to_sdpa": e["ratio_to_sdpa"],
            "tflops": e["tflops"],
            "pct_sdpa": 100.0 * e["tflops"] / e["sdpa_tflops"] if e.get("sdpa_tflops") else float("nan"),
            "max_error": err,
            "correct": err is not None and math.isfinite(err) and err <= thr.tolerance(e["dtype"]),
            "error_note": e.get("max_error_note", ""),
            "counters": e.get("counters"),
            "flex_ms": e["flex_median_s"] * 1e3 if e.get("flex_median_s") else None,
            "flex_anchor": e.get("flex_anchor"),
        })
    out.sort(key=lambda r: (r["N"], r["dtype"], r["pass"], r["order"]))
    return out


def groups(data: list[dict]) -> dict[tuple, list[dict]]:
    """Rows by ``(N, dtype, pass)``, in row order."""
    out: dict[tuple, list[dict]] = {}
    for r in data:
        out.setdefault((r["N"], r["dtype"], r["pass"]), []).append(r)
    return out


def best_throughput(group: list[dict]) -> dict | None:
    """The row with the most tokens/s among the correct ones (``None`` if none is correct)."""
    correct = [r for r in group if r["correct"]]
    return max(correct, key=lambda r: r["tokens_per_s"]) if correct else None


def _reference(group):
    return next((r for r in group if r["variant"] == REFERENCE_VARIANT), None)


def _x(value) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _error(r) -> str:
    return "n/a" if r["max_error"] is None else f"{r['max_error']:.2e}"


def length_table(group: list[dict]) -> list[str]:
    """The markdown table of one ``(N, dtype, pass)``: fastest first, wrong rows flagged."""
    ref = _reference(group)
    lines = ["| " + " | ".join(LENGTH_COLUMNS) + " |", "|" + "|".join("---" for _ in LENGTH_COLUMNS) + "|"]
    for r in sorted(group, key=lambda r: r["time_ms"]):
        mem_vs = _x(r["memory_mib"] / ref["memory_mib"]) if ref and ref["memory_mib"] > 0 else "n/a"
        speed_vs = _x(ref["time_ms"] / r["time_ms"]) if ref else "n/a"
        verdict = "pass" if r["correct"] else "**FAIL** (not ranked)"
        lines.append(f"| {r['variant']} | {r['time_ms']:.2f} | {r['memory_mib']:.2f} | {mem_vs} | "
                     f"{r['tokens_per_s']:,.0f} | {speed_vs} | {r['speed_vs_sdpa']:.2f}x | {_error(r)} | {verdict} |")
    return lines


# The counter columns of the report: (key in extra_info["counters"], divisor, format).
_COUNTER_CELLS = (("launches", 1, "{:.0f}"), ("fused_calls", 1, "{:.0f}"), ("peak_bytes", 2**20, "{:.2f}"),
                  ("bytes_sent", 2**20, "{:.2f}"), ("flops", 1e9, "{:.2f}"), ("busiest_rank_pairs", 1e6, "{:.2f}"))


def _counter(counters: dict, key: str, scale, fmt: str) -> str:
    return "n/a" if counters.get(key) is None else fmt.format(counters[key] / scale)


def counter_table(data: list[dict]) -> list[str]:
    """The cost counters of every row that has them (``extra_info["counters"]``, gated exactly)."""
    counted = [r for r in data if r["counters"]]
    if not counted:
        return ["No cost counters in this run."]
    lines = ["| " + " | ".join(COUNTER_COLUMNS) + " |", "|" + "|".join("---" for _ in COUNTER_COLUMNS) + "|"]
    for r in counted:
        cells = [_counter(r["counters"], key, scale, fmt) for key, scale, fmt in _COUNTER_CELLS]
        lines.append(f"| {r['variant']} | {r['N']} | {r['dtype']} | {r['pass']} | " + " | ".join(cells) + " |")
    return lines


def flex_table(data: list[dict]) -> list[str]:
    """Masked rows (windows, packed documents) against FlexAttention with the same block mask."""
    masked = [r for r in data if r.get("flex_anchor")]
    if not masked:
        return ["No masked rows in this run."]
    lines = ["| variant | N | dtype | pass | time (ms) | FlexAttention (ms) | speed vs FlexAttention |",
             "|---|---|---|---|---|---|---|"]
    for r in masked:
        if r["flex_ms"] is None:
            flex_cells = f"n/a ({r['flex_anchor']}) | n/a"
        else:
            flex_cells = f"{r['flex_ms']:.2f} | {r['flex_ms'] / r['time_ms']:.2f}x"
        lines.append(f"| {r['variant']} | {r['N']} | {r['dtype']} | {r['pass']} | {r['time_ms']:.2f} | {flex_cells} |")
    return lines


def markdown(run: dict, title: str | None = None) -> str:
    info = run.get("machine_info", {})
    title = title or f"ring_attention benchmarks on {info.get('perf_device', '?')}"
    data = rows(run)
    by_length = groups(data)
    lines = [
        f"# {title}",
        "",
        f"Device: {info.get('device_name', '?')} (`{info.get('perf_device', '?')}`), "
        f"torch {info.get('torch', '?')} on {info.get('torch_threads', '?')} thread(s), "
        f"run {run.get('datetime', '?')}.",
        "",
        "Time is the median per call over fixed rounds after warm-up rounds (a round repeats calls "
        "shorter than 1 ms; CUDA: timed with CUDA events, L2 flushed before each round); memory is the "
        "peak extra allocation of a separate untimed run (inputs excluded); throughput is B x N / time. "
        f"Speed vs {REFERENCE_SHORT} is {REFERENCE_VARIANT}'s time / the variant's time, and memory vs "
        f"{REFERENCE_SHORT} the variant's memory / {REFERENCE_VARIANT}'s (the earlier project's "
        "baseline), both for the same N, dtype and pass; speed vs SDPA is SDPA's time / the variant's, "
        "SDPA (flash on CUDA) timed right before each round of the variant (median of the per-round "
        "ratios); for a window or packed documents, SDPA with the equivalent boolean mask. Max error is the max abs difference from the dense reference (full reference up to "
        "the profile's limit, sampled query rows of the output above it); a row whose error is above "
        "its dtype's tolerance is marked **FAIL** and never ranked.",
        "",
    ]
    if not data:  # a --real-ranks run: its section only
        return "\n".join(lines[:4] + report_ranks.section(run)) + "\n"
    lines += ["## Results by sequence length", ""]
    for (n, dtype, mode), group in by_length.items():
        lines += [f"### N = {n:,} ({dtype}, {mode})", "", *length_table(group), ""]

    lines += ["## Key findings", "", "### Best throughput by sequence length (correct rows only)", ""]
    for (n, dtype, mode), group in by_length.items():
        best = best_throughput(group)
        wrong = [r["variant"] for r in group if not r["correct"]]
        text = f"**{best['variant']}** ({best['tokens_per_s']:,.0f} tokens/s)" if best else "no correct row"
        flag = f"; not ranked (error above tolerance): {', '.join(wrong)}" if wrong else ""
        lines.append(f"- {n:,} tokens, {dtype}, {mode}: {text}{flag}")
    lines += ["", f"### Memory vs {REFERENCE_VARIANT} at the largest length", ""]
    largest: dict[tuple, int] = {}
    for n, dtype, mode in by_length:
        largest[(dtype, mode)] = max(n, largest.get((dtype, mode), 0))
    for (dtype, mode), n in largest.items():
        group = by_length[(n, dtype, mode)]
        ref = _reference(group)
        if ref is None or ref["memory_mib"] <= 0:
            lines.append(f"- N = {n:,}, {dtype}, {mode}: {REFERENCE_VARIANT} not run")
            continue
        parts = [f"{r['variant']} {r['memory_mib']:.2f} MiB ({(r['memory_mib'] / ref['memory_mib'] - 1) * 100:+.0f}%)"
                 for r in sorted(group, key=lambda r: r["memory_mib"])]
        lines.append(f"- N = {n:,}, {dtype}, {mode}: " + ", ".join(parts))

    lines += [
        "",
        "## Masked rows against FlexAttention",
        "",
        "PyTorch's own way to run a sliding window or packed documents: compiled `flex_attention` "
        "with the same mask as a `BlockMask` (perf/flex.py), timed after the row (median of "
        "3 rounds; not gated). Speed vs FlexAttention is its time / the variant's.",
        "",
        *flex_table(data),
        "",
        "## Cost counters",
        "",
        "Counted per call, not timed, so they are the same on every run of the same code "
        "(`python -m perf.counters`): aten ops that would launch a kernel, fused attention calls, "
        "peak bytes of the storages the call's ops create (inputs excluded, kernels' internal "
        "scratch not counted), bytes the busiest rank sends per call, and effective FLOPs. The gate "
        "fails on any rise.",
        "",
        *counter_table(data),
        "",
        "## Full table",
        "",
        "Relative speed is SDPA time / variant time (above 1x beats SDPA); % of SDPA compares "
        "effective TFLOP/s (FLOPs of the scores each variant actually computes).",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    for r in data:
        lines.append(
            f"| {r['variant']} | {r['N']} | {r['dtype']} | {r['pass']} | {r['time_ms']:.2f} | "
            f"{r['memory_mib']:.2f} | {r['tokens_per_s']:.4g} | {r['speed_vs_sdpa']:.2f}x | "
            f"{r['tflops']:.4f} | {r['pct_sdpa']:.0f}% | {_error(r)} |")
    lines += ["", "![time and memory against N](report.png)", "", *report_ranks.section(run)]
    return "\n".join(lines) + "\n"


def plot(run: dict, path) -> None:
    """Time and memory vs N per variant (log-log), one row of panels per pass."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = rows(run)
    passes = sorted({r["pass"] for r in data}) or ["fwd"]
    dtypes = sorted({r["dtype"] for r in data})
    styles = ["-", "--", ":", "-."]
    names = list(dict.fromkeys(r["variant"] for r in data))
    cmap = plt.get_cmap("tab20")
    colors = {name: cmap(i % 20) for i, name in enumerate(names)}
    markers = {name: "os^vDPX*<>"[i % 10] for i, name in enumerate(names)}
    fig, axes = plt.subplots(len(passes), 2, figsize=(14, 5 * len(passes)), squeeze=False)
    for row, mode in enumerate(passes):
        for col, (key, label) in enumerate((("time_ms", "median time (ms)"), ("memory_mib", "peak memory (MiB)"))):
            ax = axes[row][col]
            for di, dtype in enumerate(dtypes):
                variants = dict.fromkeys(r["variant"] for r in data if r["pass"] == mode and r["dtype"] == dtype)
                for name in variants:
                    pts = sorted((r["N"], r[key]) for r in data
                                 if r["variant"] == name and r["pass"] == mode and r["dtype"] == dtype)
                    ax.plot([p[0] for p in pts], [max(p[1], 1e-6) for p in pts], styles[di % 4],
                            marker=markers[name], color=colors[name],
                            label=f"{name} ({dtype})" if len(dtypes) > 1 else name,
                            linewidth=2.5 if name == "dense" else 1.2)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length N")
            ax.set_ylabel(label)
            ax.set_title(f"{label}, {mode}")
            ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="center right", fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.8, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(run: dict, outdir, title: str | None = None) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.png`` under ``outdir``; return their paths."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    md, png = outdir / "report.md", outdir / "report.png"
    md.write_text(markdown(run, title))
    plot(run, png)
    return md, png


if __name__ == "__main__":
    import json

    if len(sys.argv) != 3:
        sys.exit("usage: python -m perf.report RUN.json OUTDIR")
    print(*write(json.loads(Path(sys.argv[1]).read_text()), sys.argv[2]), sep="\n")
