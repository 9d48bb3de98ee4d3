"""The history's trend plots: one PNG per variant, one row per benchmark (N, dtype, pass).

Columns, with one x position per run that recorded the benchmark (labelled by commit, ``*``
when dirty, and the run's note):

1. the per-round ratios to SDPA (:func:`perf.history.round_ratios`) as a box per run, the
   rounds as dots over it; a box judged a regression by :mod:`perf.trend` is red;
2. peak memory (MiB, the allocator's view);
3. the cost counters, each divided by its value in the benchmark's first run (1 means
   unchanged; they are deterministic, so any move is a code change).
"""

from __future__ import annotations

from pathlib import Path

from perf import history
from perf.device import slugify

COUNTERS = ("launches", "fused_calls", "peak_bytes", "bytes_sent", "flops")


def _ticks(ax, runs, indices):
    ax.set_xticks(range(len(indices)))
    ax.set_xticklabels([history.run_label(runs[i]) for i in indices], rotation=90, fontsize=7)
    ax.grid(True, axis="y", alpha=0.3)


def _row(axes, runs, points, flagged: set[int]):
    indices = [i for i, _ in points]
    ratios = [history.round_ratios(b) for _, b in points]
    box = axes[0].boxplot(ratios, positions=range(len(points)), widths=0.6, showfliers=False, patch_artist=True)
    for k, patch in enumerate(box["boxes"]):
        patch.set_facecolor("tab:red" if indices[k] in flagged else "tab:blue")
        patch.set_alpha(0.35)
    for k, values in enumerate(ratios):
        axes[0].plot([k] * len(values), values, ".", color="black", markersize=2)
    axes[0].set_ylabel("ratio to SDPA (per round)")
    axes[1].set_title("peak memory", fontsize=9)
    axes[2].set_title("cost counters", fontsize=9)
    memory = [(b.get("peak_memory_bytes") or 0) / 2**20 for _, b in points]
    axes[1].plot(range(len(points)), memory, "o-")
    axes[1].set_ylabel("peak memory (MiB)")
    first = next((b["counters"] for _, b in points if b.get("counters")), None)
    for key in COUNTERS:
        if first and first.get(key):
            values = [b["counters"][key] / first[key] if b.get("counters") and key in b["counters"] else float("nan")
                      for _, b in points]
            axes[2].plot(range(len(points)), values, "o-", label=key, markersize=3)
    axes[2].set_ylabel("counter / first run's (1: unchanged)")
    if first:
        axes[2].legend(fontsize=6)
    for ax in axes:
        _ticks(ax, runs, indices)


def write(runs: list[dict], out: Path, found=()) -> list[Path]:
    """Write ``<out>/<variant>.png`` per variant; ``found``: verdicts (red boxes for regressions)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    flagged: dict[str, set[int]] = {}
    for v in found:
        if v.regression:
            flagged.setdefault(v.name, set()).add(v.runs[1])
    by_variant: dict[str, list[str]] = {}
    all_series = history.series(runs)
    for name, points in all_series.items():
        by_variant.setdefault(points[0][1]["variant"], []).append(name)
    written = []
    for variant, names in by_variant.items():
        width = max(10, 3 + 0.25 * max(len(all_series[n]) for n in names) * 3)
        fig, axes = plt.subplots(len(names), 3, figsize=(width, 4.0 * len(names)), squeeze=False)
        for row, name in enumerate(names):
            _row(axes[row], runs, all_series[name], flagged.get(name, set()))
            b = all_series[name][0][1]
            axes[row][0].set_title(f"{variant} N={b['N']} {b['dtype']} {b['pass']}", fontsize=9)
        fig.tight_layout()
        path = Path(out) / f"{slugify(variant)}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    return written
