"""``python -m perf``: run the benchmarks, write the report, gate against the device's baseline.

    python -m perf                      # benchmarks + report + gate (non-zero exit on regression)
    python -m perf --save-baseline      # benchmarks + report, then store them as this device's baseline
    python -m perf --smoke              # one round per benchmark, no warm-up, no gate (CI smoke run)
    python -m perf -- -k "dense and fwd" --perf-n 512   # anything after -- goes to pytest

The time arm is pytest-benchmark's ``--benchmark-compare-fail=median:<time-pct>%`` rule,
evaluated by ``perf.gate`` together with the memory, correctness and ratio arms, so that
benchmarks flagged by a timing arm (time, ratio) can be re-run once and fail only when the
re-run confirms them (``--no-confirm`` to fail at once). Plain pytest applies the same time
rule with ``pytest perf/test_bench_attention.py --benchmark-compare --benchmark-compare-fail=median:75%``.

Exit status: 0 pass; 1 regression; 2 a benchmark itself failed; 3 no baseline for this
device (run with ``--save-baseline`` first, or pass ``--allow-missing-baseline`` to only warn).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from perf import device as _device
from perf import gate, report

HERE = Path(__file__).resolve().parent
BENCH_FILE = HERE / "test_bench_attention.py"
BASELINE_NAME = "0001_baseline.json"


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m perf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--save-baseline", action="store_true", help="store this run as the device's baseline")
    p.add_argument("--smoke", action="store_true", help="1 round, no warm-up, no gate")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--allow-missing-baseline", action="store_true",
                   help="exit 0 (with a warning) when the device has no baseline")
    p.add_argument("--no-confirm", action="store_true",
                   help="do not re-run benchmarks flagged by the time / ratio arms before failing")
    p.add_argument("--baselines-dir", type=Path, default=HERE / "baselines")
    p.add_argument("--reports-dir", type=Path, default=HERE / "reports")
    t = gate.Thresholds()
    p.add_argument("--time-pct", type=int, default=int(t.time_pct), help="raw median slowdown that fails (%%)")
    p.add_argument("--ratio-pct", type=float, default=t.ratio_pct, help="ratio-to-SDPA increase that fails (%%)")
    p.add_argument("--memory-pct", type=float, default=t.memory_pct, help="peak memory increase that fails (%%)")
    args, pytest_args = p.parse_known_args(argv)
    if pytest_args[:1] == ["--"]:
        pytest_args = pytest_args[1:]
    return args, pytest_args


def baseline_file(baselines_dir: Path, slug: str) -> Path | None:
    """The newest ``*.json`` in ``<baselines_dir>/<slug>/``, if any."""
    files = sorted((baselines_dir / slug).glob("*.json"))
    return files[-1] if files else None


def _pytest(cmd) -> int:
    print("perf:", " ".join(cmd), flush=True)
    start = time.perf_counter()
    rc = subprocess.call(cmd, cwd=HERE.parent)
    print(f"perf: benchmarks took {time.perf_counter() - start:.0f} s (pytest exit {rc})", flush=True)
    return rc


def _without_k(pytest_args):
    """``pytest_args`` less ``-k EXPR`` / ``-kEXPR`` (the re-run selects node ids instead)."""
    out, skip = [], False
    for a in pytest_args:
        if skip:
            skip = False
        elif a == "-k":
            skip = True
        elif not a.startswith("-k"):
            out.append(a)
    return out


def confirm(cmd, result: gate.GateResult, baseline: dict, thresholds: gate.Thresholds, out_dir: Path):
    """Re-run the benchmarks flagged by the timing arms (time, ratio); keep those flagged again.

    Timing on a shared machine has bursts that slow every round of one benchmark; a real
    regression shows up twice. Memory and correctness are deterministic: kept as they are.
    """
    timing = [f for f in result.failures if f.arm in gate.TIMING_ARMS]
    if not timing:
        return result
    names = sorted({f.name for f in timing})
    print(f"perf: confirming {len(names)} timing regression(s) with a re-run", flush=True)
    confirm_json = out_dir / "confirm.json"
    confirm_json.unlink(missing_ok=True)
    node_ids = [f"{BENCH_FILE}::{name}" for name in names]
    cmd = [c for c in cmd if not c.startswith(("--benchmark-json=", "--benchmark-compare"))]
    _pytest(cmd + [f"--benchmark-json={confirm_json}"] + node_ids)
    rerun = gate.check(gate.load(confirm_json), baseline, thresholds) if confirm_json.exists() else result
    again = {(f.arm, f.name) for f in rerun.failures}
    kept = [f for f in result.failures if f.arm not in gate.TIMING_ARMS or (f.arm, f.name) in again]
    for f in timing:
        if (f.arm, f.name) not in again:
            print(f"perf: not confirmed (noise): {f}")
    return gate.GateResult(kept, result.notes, result.compared)


def main(argv=None) -> int:
    args, pytest_args = parse(sys.argv[1:] if argv is None else argv)
    dev = _device.pick_device(args.device)
    slug = _device.device_slug(dev)
    out_dir = args.reports_dir / slug
    out_dir.mkdir(parents=True, exist_ok=True)
    run_json = out_dir / "latest.json"
    run_json.unlink(missing_ok=True)
    base = baseline_file(args.baselines_dir, slug)
    gating = not (args.save_baseline or args.smoke)

    cmd = [sys.executable, "-m", "pytest", str(BENCH_FILE), "-p", "no:cacheprovider", "-q",
           f"--perf-device={dev}", f"--benchmark-storage=file://{args.baselines_dir.resolve()}",
           f"--benchmark-json={run_json}", "--benchmark-sort=name", "--benchmark-columns=median,iqr,rounds"]
    if args.smoke:
        cmd += ["--perf-rounds=1", "--perf-warmup=0"]
    if gating and base is not None:
        cmd += [f"--benchmark-compare={base}"]
    rc = _pytest(cmd + pytest_args)

    if not run_json.exists():
        print("perf: no benchmark JSON was written; nothing to report", file=sys.stderr)
        return 2
    run = gate.load(run_json)
    md, png = report.write(run, out_dir)
    print(f"perf: report {md} and {png}")

    if args.save_baseline:
        if rc != 0:
            print("perf: benchmarks failed; baseline NOT saved", file=sys.stderr)
            return 2
        target = args.baselines_dir / slug / BASELINE_NAME
        target.parent.mkdir(parents=True, exist_ok=True)
        for b in run["benchmarks"]:
            b["stats"].pop("data", None)
        target.write_text(json.dumps(run, indent=1, sort_keys=True) + "\n")
        for old in target.parent.glob("*.json"):
            if old != target:
                old.unlink()
        print(f"perf: saved baseline {target} ({len(run['benchmarks'])} benchmarks)")
        return 0
    if args.smoke:
        return 0 if rc == 0 else 2

    if base is None:
        print(f"\nperf: WARNING: no baseline for device '{slug}' under {args.baselines_dir / slug}/.\n"
              "perf: make one (and commit it) with:\n\n    nox -s perf -- --save-baseline\n"
              "\n(or: python -m perf --save-baseline)", file=sys.stderr)
        return 0 if args.allow_missing_baseline else 3

    thresholds = gate.Thresholds(time_pct=args.time_pct, ratio_pct=args.ratio_pct, memory_pct=args.memory_pct)
    baseline = gate.load(base)
    result = gate.check(run, baseline, thresholds)
    if not args.no_confirm:
        result = confirm(cmd + _without_k(pytest_args), result, baseline, thresholds, out_dir)
    print(f"perf: baseline {base}")
    print(gate.summary(result))
    if not result.ok:
        return 1
    if rc != 0:
        print(f"perf: pytest exited {rc}: a benchmark failed (see its output above)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
