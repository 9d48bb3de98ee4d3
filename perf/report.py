"""Markdown table and PNG plot from a benchmark JSON (``python -m perf.report RUN.json OUTDIR``).

Columns: variant, N, dtype, pass, median time, peak memory, tokens/s, relative speed
(SDPA time / variant time: above 1 is faster than SDPA), effective TFLOP/s, % of SDPA's
TFLOP/s (same shape, dtype and causal flag) and max error vs the dense reference.
"""

from __future__ import annotations

import sys
from pathlib import Path

COLUMNS = ("variant", "N", "dtype", "pass", "time (median ms)", "memory (MiB)", "tokens/s",
           "relative speed (vs dense SDPA)", "TFLOP/s", "% of SDPA", "max error")


def rows(run: dict) -> list[dict]:
    """One row per benchmark with the report's figures, sorted by N, dtype, pass, variant order."""
    out = []
    for i, b in enumerate(run.get("benchmarks", [])):
        e = b.get("extra_info", {})
        if "median_s" not in e:
            continue
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
            "max_error": e.get("max_error"),
            "error_note": e.get("max_error_note", ""),
        })
    out.sort(key=lambda r: (r["N"], r["dtype"], r["pass"], r["order"]))
    return out


def markdown(run: dict, title: str | None = None) -> str:
    info = run.get("machine_info", {})
    title = title or f"ring_attention benchmarks on {info.get('perf_device', '?')}"
    lines = [
        f"# {title}",
        "",
        f"Device: {info.get('device_name', '?')} (`{info.get('perf_device', '?')}`), "
        f"torch {info.get('torch', '?')} on {info.get('torch_threads', '?')} thread(s), "
        f"run {run.get('datetime', '?')}.",
        "",
        "Time is the median over fixed rounds after warm-up rounds; memory is the peak extra "
        "allocation of a separate untimed run (inputs excluded); relative speed is SDPA time / variant "
        "time for the same shape, dtype, causal flag and pass, SDPA timed right before each round of the "
        "variant (median of the per-round ratios); % of SDPA "
        "compares effective TFLOP/s. Max error is the max abs difference from the dense reference "
        "(full reference up to the profile's limit, sampled query rows of the output above it).",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    for r in rows(run):
        err = "n/a" if r["max_error"] is None else f"{r['max_error']:.2e}"
        lines.append(
            f"| {r['variant']} | {r['N']} | {r['dtype']} | {r['pass']} | {r['time_ms']:.2f} | "
            f"{r['memory_mib']:.2f} | {r['tokens_per_s']:.4g} | {r['speed_vs_sdpa']:.2f}x | "
            f"{r['tflops']:.4f} | {r['pct_sdpa']:.0f}% | {err} |")
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
