"""The report's section on real-rank rows (:mod:`perf.real_ranks`): where the exchange hides.

One table per ``(N, dtype, pass)``: per ring variant and ``R``, the slowest rank's time per
call, the in-process simulation's time for the same work and its per-rank share (simulation /
R), their paired ratio, the share expected on this machine (times ``R / cores`` where the ranks
outnumber the cores), the bytes each rank sent against ``perf.counters``' prediction, the max
error, and whether the exchange is hidden (slowest rank within ``HIDDEN_MAX`` of the expected
share) or exposed.
"""

from __future__ import annotations

import math

from perf import gate, real_ranks

COLUMNS = ("variant", "R", "slowest rank (ms)", "simulation (ms)", "share = sim / R (ms)", "real / share",
           "expected share (ms)", "real / expected", "sent per rank (MiB): measured = predicted", "max error",
           "exchange")


def is_real(bench: dict) -> bool:
    """Whether a benchmark of a run is a real-rank row."""
    return bool(bench.get("extra_info", {}).get("real_ranks"))


def _sent(e: dict) -> str:
    measured, predicted = e["bytes_sent_per_rank"], e["bytes_predicted_per_rank"]
    mib = "/".join(f"{b / 2**20:.3g}" for b in measured)
    if measured == predicted:
        return f"{mib} (= predicted)"
    return f"**{mib} != predicted {'/'.join(f'{b / 2**20:.3g}' for b in predicted)}**"


def _error(e: dict, thr: gate.Thresholds) -> str:
    err = e.get("max_error")
    ok = err is not None and math.isfinite(err) and err <= thr.tolerance(e["dtype"])
    return f"{err:.2e}" + ("" if ok else " **FAIL**")


def section(run: dict, thresholds: gate.Thresholds | None = None) -> list[str]:
    """Markdown lines of the real-rank section (empty when the run has no real-rank row)."""
    thr = thresholds or gate.Thresholds()
    found = [b for b in run.get("benchmarks", []) if is_real(b) and "median_s" in b.get("extra_info", {})]
    if not found:
        return []
    first = found[0]["extra_info"]
    lines = [
        "## Real ranks",
        "",
        f"Each row ran on R processes ({first['backend']}, {first['threads']} thread per rank, "
        f"{first['cores']} {'cores' if first['backend'] == 'gloo' else 'GPUs'}). Time is the median "
        "over rounds of the slowest rank's time per call (a barrier starts each round, an all_reduce "
        "MAX ends it). The simulation is the same work in one process (`ring_size=R`), timed on rank 0 "
        "right before each round; its share is simulation / R, the time a rank would take if the "
        "exchange cost nothing and each rank had its own core. Expected share = share x max(1, R / "
        "cores): ranks beyond the cores share them, so compute, not the exchange, sets the time. "
        f"The exchange is **hidden** when real / expected <= {real_ranks.HIDDEN_MAX}, else **exposed**. "
        "Bytes sent per rank are counted at `batch_isend_irecv`'s send ops and must equal "
        "`perf.counters`' prediction from the simulation exactly.",
        "",
    ]
    groups: dict[tuple, list[dict]] = {}
    for b in found:
        e = b["extra_info"]
        groups.setdefault((e["N"], e["dtype"], e["pass"]), []).append(e)
    for (n, dtype, mode), group in sorted(groups.items()):
        lines += [f"### Real ranks, N = {n:,} ({dtype}, {mode})", "",
                  "| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
        for e in sorted(group, key=lambda e: (e["ranks"], e["variant"])):
            expected = e["simulation_share_s"] * e["oversubscription"]
            lines.append(
                f"| {e['variant']} | {e['ranks']} | {e['median_s'] * 1e3:.2f} | {e['simulation_median_s'] * 1e3:.2f} | "
                f"{e['simulation_share_s'] * 1e3:.2f} | {e['ratio_to_simulation']:.2f}x | {expected * 1e3:.2f} | "
                f"{e['ratio_to_expected']:.2f}x | {_sent(e)} | {_error(e, thr)} | {e['exchange']} |")
        lines.append("")
    return lines
