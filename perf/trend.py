"""``python -m perf history``: trend plots and a regression table from the history store.

A benchmark's latest run is compared with its previous run (``--every``: every run with the
one before it) on the per-round ratios to SDPA of :func:`perf.history.round_ratios`. It is
flagged as a regression only when both hold (:func:`judge`):

* significant: the one-sided Mann-Whitney U test (:mod:`perf.ranktest`) of "the latest
  ratios are larger" gives p < ``alpha`` (default :data:`ALPHA`);
* large: the median ratio rose by more than ``trend_pct`` percent
  (``gate.Thresholds.trend_pct``, ``--threshold-pct``).

Why both: rounds of one run share that run's state (load, allocator, frequency), so two
runs of the same code differ by a little more than their rounds' spread, and with 15 + 15
rounds the rank test calls a 2% shift significant. The threshold keeps such shifts out; the
test keeps a noisy run whose median happened to move out. The test needs rounds to have
power: with ``n1`` and ``n2`` rounds the smallest exact p is ``1 / C(n1 + n2, n2)``, 0.05 for
3 + 3, so the history profile (``python -m perf --profile history``) times 15 per benchmark.
The ``dense`` anchor is its own SDPA (ratio 1) and is not judged.

Writes ``<out>/regressions.md`` and one ``<out>/<variant>.png`` per variant
(:mod:`perf.trend_plot`); exits 1 when a judged comparison is a regression, 2 on a usage
error (no store), else 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
from pathlib import Path

from perf import device as _device
from perf import gate, history, options, ranktest

ALPHA = 0.01
ANCHOR = "dense"


@dataclasses.dataclass(frozen=True)
class Verdict:
    """One comparison of a benchmark's per-round ratios: ``before`` run against ``after`` run."""

    name: str
    before: str
    after: str
    median_before: float
    median_after: float
    p: float
    alpha: float
    threshold_pct: float
    rounds: tuple[int, int]
    runs: tuple[int, int] = (-1, -1)  # indices of the two runs in the store

    @property
    def change_pct(self) -> float:
        return (self.median_after / self.median_before - 1) * 100

    @property
    def significant(self) -> bool:
        return self.p < self.alpha

    @property
    def above_threshold(self) -> bool:
        return self.change_pct > self.threshold_pct

    @property
    def regression(self) -> bool:
        return self.significant and self.above_threshold

    @property
    def reachable(self) -> bool:
        """Whether the rounds could reach ``alpha`` at all (the smallest exact p is 1 / C(n, k))."""
        return 1 / math.comb(sum(self.rounds), self.rounds[1]) < self.alpha

    @property
    def label(self) -> str:
        if self.regression:
            return "**REGRESSION**"
        if not self.reachable:
            return f"too few rounds for p < {self.alpha:g}"
        if self.significant:
            return "significant, below threshold"
        return "above threshold, not significant" if self.above_threshold else "no regression"


def judge(before: list[float], after: list[float], *, alpha: float = ALPHA, threshold_pct: float | None = None,
          name: str = "", labels: tuple[str, str] = ("before", "after"),
          runs: tuple[int, int] = (-1, -1)) -> Verdict:
    """The verdict on per-round ratios ``after`` against ``before``: see the module docstring."""
    thr = gate.Thresholds().trend_pct if threshold_pct is None else threshold_pct
    test = ranktest.mann_whitney_greater(before, after)
    return Verdict(name, labels[0], labels[1], statistics.median(before), statistics.median(after),
                   test.p, alpha, thr, (len(before), len(after)), runs)


def verdicts(runs: list[dict], *, alpha: float = ALPHA, threshold_pct: float | None = None,
             every: bool = False) -> list[Verdict]:
    """Each benchmark's latest run against its previous one (``every``: all consecutive pairs)."""
    out = []
    for name, points in history.series(runs).items():
        if points[0][1]["variant"] == ANCHOR or len(points) < 2:
            continue
        pairs = list(zip(points, points[1:]))
        for (i, before), (j, after) in (pairs if every else pairs[-1:]):
            out.append(judge(history.round_ratios(before), history.round_ratios(after), alpha=alpha,
                             threshold_pct=threshold_pct, name=name, runs=(i, j),
                             labels=(f"#{i} {history.run_label(runs[i])}", f"#{j} {history.run_label(runs[j])}")))
    return out


def table(found: list[Verdict]) -> list[str]:
    """The markdown regression table, one row per comparison."""
    lines = ["| benchmark | before | after | median ratio before | after | change | p (one-sided U) | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for v in found:
        lines.append(f"| {v.name} | {v.before} | {v.after} | {v.median_before:.4f} | {v.median_after:.4f} | "
                     f"{v.change_pct:+.1f}% | {v.p:.2g} | {v.label} |")
    return lines


def summary(found: list[Verdict], alpha: float, threshold_pct: float) -> list[str]:
    flagged = [v for v in found if v.regression]
    significant = [v for v in found if v.significant]
    return [f"{len(found)} comparison(s), {len(significant)} significant at alpha = {alpha:g}, "
            f"{len(flagged)} regression(s) (significant and median ratio up > {threshold_pct:g}%)"]


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m perf history", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slug", default=None, help="device slug (default: this machine's default device)")
    p.add_argument("--history-dir", type=Path, default=None,
                   help=f"the store's folder (default ${history.ENV_DIR}, else perf/history)")
    p.add_argument("--file", type=Path, default=None, help="a store file, instead of <history-dir>/<slug>.jsonl")
    p.add_argument("--out", type=Path, default=None, help="where plots and regressions.md go "
                                                          "(default: the store's path without .jsonl)")
    p.add_argument("--alpha", type=options.non_negative_float, default=ALPHA, help="level of the rank test")
    p.add_argument("--threshold-pct", type=options.non_negative_float, default=gate.Thresholds().trend_pct,
                   help="median ratio increase that, when significant, is a regression (%%)")
    p.add_argument("--every", action="store_true", help="judge every run against the one before it")
    p.add_argument("--no-plots", action="store_true", help="the table only")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    directory = args.history_dir or history.default_dir()
    slug = args.slug or (args.file.stem if args.file else _device.device_slug(_device.pick_device("auto")))
    path = args.file or history.store_path(directory, slug)
    if not path.exists():
        print(f"perf history: no history at {path}: runs of `python -m perf` append to it "
              f"(`python -m perf --profile history` times enough rounds)", file=sys.stderr)
        return 2
    try:
        runs = history.load(path)
    except history.HistoryError as exc:
        print(f"perf history: {exc}", file=sys.stderr)
        return 2
    out = args.out or path.with_suffix("")  # <slug>.jsonl -> <slug>/
    out.mkdir(parents=True, exist_ok=True)
    found = verdicts(runs, alpha=args.alpha, threshold_pct=args.threshold_pct, every=args.every)
    head = summary(found, args.alpha, args.threshold_pct)
    text = [f"# Regressions in the history of {slug}", "", f"{len(runs)} run(s) in `{path}`. " + head[0] + ".",
            "", *table(found)]
    (out / "regressions.md").write_text("\n".join(text) + "\n")
    print("\n".join(table(found)))
    print("perf history: " + head[0])
    if not args.no_plots:
        from perf import trend_plot

        for png in trend_plot.write(runs, out, found):
            print(f"perf history: plot {png}")
    print(f"perf history: table {out / 'regressions.md'}")
    return 1 if any(v.regression for v in found) else 0


if __name__ == "__main__":
    sys.exit(main())
