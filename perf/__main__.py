"""``python -m perf``: run the benchmarks, write the report, gate against the device's baseline.

    python -m perf                      # benchmarks + report + gate; the first run on a device saves its baseline
    python -m perf --require-baseline   # CI: no baseline for this device is an error (exit 3), nothing runs
    python -m perf --save-baseline      # refresh: store this run as the device's baseline
    python -m perf --smoke              # one round per benchmark, no warm-up, no gate, nothing saved
    python -m perf --variants Production_CP,RingDilatedV2_Ring4 --n 1024,2048 --pass fwd
    python -m perf -- -k "dense and fwd"   # anything after -- goes to pytest
    python -m perf --profile history    # a few rows, 15 rounds each, for the history's rank test
    python -m perf history              # trend plots and the history's regression table (perf.trend)
    python -m perf --real-ranks         # the ring variants on R real processes (perf.real_ranks), gated alike

The baseline of a device is ``<baselines-dir>/<device-slug>/0001_baseline.json``. It is checked
(schema, numbers, finiteness) before anything runs. Only this runner writes it: on the first
run on a device (no baseline yet), or with ``--save-baseline``. Saving a run that selected a
subset of the benchmarks merges it into the existing baseline (``--replace``: the baseline
becomes exactly this run).

The gate (``perf.gate``) has four arms: time, memory, correctness, ratio to SDPA; benchmarks
flagged by a timing arm (time, ratio) are re-run once and fail only when the re-run flags
them again (``--no-confirm`` fails at once). A full run (nothing deselected) also fails when
a benchmark of the baseline is missing from it; any run fails when it compared nothing.

Exit status: 0 pass, or baseline saved; 1 regression; 2 usage error (this runner's or
pytest's, with its message); 3 no baseline for this device and ``--require-baseline``;
4 the baseline file is invalid; 5 a benchmark itself failed (or no results were written).

Every run but ``--smoke`` also appends its results, every round included, to the device's
history store (``perf.history``; ``--history-dir``, ``--history-note``, ``--no-history``).
"""

from __future__ import annotations

import argparse
import enum
import json
import subprocess
import sys
import time
from pathlib import Path

from perf import device as _device
from perf import gate, history, options, report

HERE = Path(__file__).resolve().parent
BENCH_FILE = HERE / "test_bench_attention.py"
REAL_RANKS_FILE = HERE / "test_bench_real_ranks.py"
BASELINE_NAME = "0001_baseline.json"


class Exit(enum.IntEnum):
    OK = 0
    REGRESSION = 1
    USAGE = 2
    NO_BASELINE = 3
    BAD_BASELINE = 4
    BENCHMARK_FAILED = 5


# pytest options the runner passes itself: a second value would redirect its results.
RESERVED_PYTEST_OPTIONS = ("--benchmark-json", "--benchmark-compare", "--perf-device", "--perf-baselines")

# pytest's own exit codes (pytest.ExitCode).
PYTEST_USAGE_ERROR = 4
PYTEST_NO_TESTS = 5


def parse(argv):
    """``(runner options, pytest arguments)``: pytest's are those after ``--``.

    Runner options are parsed strictly: a misspelt one (``--save-basline``) is a usage error
    here, not an argument handed to pytest.
    """
    argv = list(argv)
    pytest_args = []
    if "--" in argv:
        cut = argv.index("--")
        argv, pytest_args = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(prog="python -m perf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--save-baseline", action="store_true", help="store this run as the device's baseline")
    p.add_argument("--replace", action="store_true",
                   help="with --save-baseline: the baseline becomes exactly this run, even a subset")
    p.add_argument("--require-baseline", action="store_true",
                   help="exit 3 before running anything when the device has no baseline (CI gates)")
    p.add_argument("--smoke", action="store_true", help="1 round, no warm-up, no gate, nothing saved")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--profile", default="suite", choices=("suite", "history"),
                   help="history: the history's rows (perf.history.VARIANTS, one N, fwd) with "
                        f"{history.ROUNDS} rounds each, unless --variants / --n / --pass / --rounds say otherwise")
    p.add_argument("--history-dir", type=Path, default=None,
                   help=f"the history store's folder (default ${history.ENV_DIR}, else perf/history)")
    p.add_argument("--history-note", default=None, help="a note stored with this run in the history")
    p.add_argument("--no-history", action="store_true", help="do not append this run to the history")
    p.add_argument("--real-ranks", action="store_true",
                   help="run the real-rank rows instead (perf/test_bench_real_ranks.py: ring variants on R "
                        "processes, gloo on CPU); they gate against the same baseline file")
    p.add_argument("--ranks", type=options.rank_counts, default=None,
                   help="with --real-ranks: comma-separated ring sizes R (default: the profile's)")
    p.add_argument("--variants", type=options.variant_names, default=None,
                   help="comma-separated registry names or aliases (Production_CP, RingDilatedV2_Ring4, ...)")
    p.add_argument("--n", type=options.seq_lens, default=None, help="comma-separated sequence lengths")
    p.add_argument("--pass", dest="passes", type=options.passes, default=None,
                   help="comma-separated passes: fwd, fwd+bwd")
    p.add_argument("--dtype", type=options.dtypes, default=None, help="comma-separated dtypes")
    p.add_argument("--compiled", type=options.variant_names, default=None,
                   help="comma-separated variants also benchmarked through torch.compile (<name>+compiled)")
    p.add_argument("--rounds", type=options.positive_int, default=None,
                   help="timed rounds per benchmark (overrides the profile)")
    p.add_argument("--warmup", type=options.non_negative_int, default=None,
                   help="warm-up rounds per benchmark (overrides the profile)")
    p.add_argument("--no-confirm", action="store_true",
                   help="do not re-run benchmarks flagged by the time / ratio arms before failing")
    p.add_argument("--baselines-dir", type=Path, default=HERE / "baselines")
    p.add_argument("--reports-dir", type=Path, default=HERE / "reports")
    t = gate.Thresholds()
    p.add_argument("--time-pct", type=options.non_negative_float, default=t.time_pct,
                   help="raw median slowdown that fails (%%)")
    p.add_argument("--ratio-pct", type=options.non_negative_float, default=t.ratio_pct,
                   help="ratio-to-SDPA increase that fails (%%)")
    p.add_argument("--memory-pct", type=options.non_negative_float, default=t.memory_pct,
                   help="peak memory increase that fails (%%)")
    args = p.parse_args(argv)
    for a in pytest_args:
        if a.startswith(RESERVED_PYTEST_OPTIONS):
            p.error(f"{a.split('=')[0]} after --: the runner sets it itself "
                    f"(the run's JSON is <reports-dir>/<device>/latest.json; --device picks the device)")
    if args.replace and not args.save_baseline:
        p.error("--replace goes with --save-baseline")
    if args.real_ranks and (args.variants or args.compiled or args.profile != "suite"):
        p.error("--real-ranks runs its own rows: select them with --n, --ranks, --pass, --dtype or -- -k")
    if args.real_ranks and args.replace:
        p.error("--real-ranks --replace would drop the suite's rows from the baseline: save without --replace")
    if args.ranks and not args.real_ranks:
        p.error("--ranks goes with --real-ranks")
    if args.smoke and (args.rounds or args.warmup is not None):
        p.error("--smoke sets one round and no warm-up itself")
    if args.smoke and args.profile == "history":
        p.error("--smoke runs one round: the history profile needs its rounds")
    if args.smoke and args.save_baseline:
        p.error("--smoke runs one round: not a baseline; leave out --save-baseline")
    return args, pytest_args


def selection_args(args) -> list[str]:
    """The pytest options for the runner's ``--variants``, ``--n``, ``--pass``, ``--dtype``,
    ``--compiled``, ``--rounds``, ``--warmup`` and ``--smoke``."""
    out = []
    for flag, value in (("--perf-variants", args.variants), ("--perf-n", args.n), ("--perf-ranks", args.ranks),
                        ("--perf-pass", args.passes), ("--perf-dtype", args.dtype),
                        ("--perf-compiled", args.compiled)):
        if value:
            out.append(f"{flag}={','.join(str(x) for x in value)}")
    if args.smoke:
        out += ["--perf-rounds=1", "--perf-warmup=0"]
    else:
        out += [f"{flag}={value}" for flag, value in (("--perf-rounds", args.rounds), ("--perf-warmup", args.warmup))
                if value is not None]
    return out


_SELECTING = ("-k", "-m", "--deselect", "--perf-variants", "--perf-n", "--perf-dtype", "--perf-pass", "--perf-compiled",
              "--perf-ranks",
              "--lf", "--last-failed", "--sw", "--stepwise", "--ignore")


def is_full_run(pytest_args) -> bool:
    """Whether ``pytest_args`` (selection options included) run every benchmark of the profile.

    Deselecting options and explicit node ids / files make a subset; anything else (``-x``,
    ``-p plugin``, ``--perf-rounds``) keeps the selection whole.
    """
    for a in pytest_args:
        if a.startswith(_SELECTING) or "::" in a or a.endswith(".py"):
            return False
    return True


def rows_of(baseline: dict | None, bench_file: Path) -> dict | None:
    """The baseline's rows of ``bench_file``'s test (``test_attention[...]`` or ``test_real_ranks[...]``).

    One file holds both kinds of rows; a run of one bench file is gated, and its coverage
    judged, against that file's rows only. ``None`` when it has none.
    """
    if baseline is None:
        return None
    test = "test_real_ranks[" if bench_file == REAL_RANKS_FILE else "test_attention["
    mine = [b for b in baseline["benchmarks"] if b["name"].startswith(test)]
    return dict(baseline, benchmarks=mine) if mine else None


def baseline_path(baselines_dir: Path, slug: str) -> Path:
    """Where the device's baseline lives: ``<baselines_dir>/<slug>/0001_baseline.json``."""
    return baselines_dir / slug / BASELINE_NAME


def load_run(path: Path) -> dict | None:
    """A run's JSON, or ``None`` when pytest wrote none, an empty file or broken JSON."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("benchmarks"), list) else None


def merged_baseline(old: dict | None, run: dict, *, replace: bool) -> dict:
    """The baseline to store: ``run``'s benchmarks, plus (unless ``replace``) ``old``'s others.

    Raw per-round data (times, SDPA times: the history keeps them) is dropped, the gate reads
    the statistics; the machine info is the run's. Benchmarks keep the baseline's order, new
    ones after.
    """
    new = {b["name"]: b for b in run["benchmarks"]}
    kept = [] if (replace or old is None) else [b for b in old["benchmarks"] if b["name"] not in new]
    out = dict(run)
    out["benchmarks"] = []
    order = [b["name"] for b in (old or {}).get("benchmarks", [])]
    everything = {b["name"]: b for b in kept} | new
    for name in [n for n in order if n in everything] + [n for n in new if n not in order]:
        b = json.loads(json.dumps(everything[name]))  # a copy
        b.get("stats", {}).pop("data", None)
        for raw in ("sdpa_round_s", "simulation_round_s", "rank_round_s"):
            b.get("extra_info", {}).pop(raw, None)
        out["benchmarks"].append(b)
    return out


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


def confirm(cmd, result: gate.GateResult, baseline: dict, thresholds: gate.Thresholds, out_dir: Path,
            bench_file: Path = BENCH_FILE):
    """Re-run the benchmarks flagged by the timing arms (time, ratio); see :func:`gate.confirmed`.

    Timing on a shared machine has bursts that slow every round of one benchmark; a real
    regression shows up twice. Memory, correctness and coverage are deterministic: kept.
    """
    timing = [f for f in result.failures if f.arm in gate.TIMING_ARMS]
    if not timing:
        return result
    names = sorted({f.name for f in timing})
    print(f"perf: confirming {len(names)} timing regression(s) with a re-run", flush=True)
    confirm_json = out_dir / "confirm.json"
    confirm_json.unlink(missing_ok=True)
    node_ids = [f"{bench_file}::{name}" for name in names]
    cmd = [c for c in cmd if not c.startswith(("--benchmark-json=", "--benchmark-compare"))]
    _pytest(cmd + [f"--benchmark-json={confirm_json}"] + node_ids)
    rerun_json = load_run(confirm_json)
    rerun = gate.check(rerun_json, baseline, thresholds) if rerun_json else None
    kept = gate.confirmed(result, rerun)
    for f in timing:
        if f not in kept.failures:
            print(f"perf: not confirmed (noise): {f}")
    return kept


def _save(path: Path, old: dict | None, run: dict, replace: bool, slug: str) -> None:
    data = merged_baseline(old, run, replace=replace)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    merged = len(data["benchmarks"]) - len(run["benchmarks"])
    how = f"{len(run['benchmarks'])} from this run" + (f", {merged} kept from the previous baseline" if merged else "")
    print(f"perf: saved baseline {path} ({len(data['benchmarks'])} benchmarks: {how})")
    try:
        shown = path.parent.resolve().relative_to(Path.cwd())
    except ValueError:
        shown = path.parent
    print(f"perf: commit it so the next runs on '{slug}' gate against it:\n\n"
          f"    git add {shown}\n    git commit -m 'perf: baseline for {slug}'\n")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["history"]:  # python -m perf history: the trend plots and table
        from perf import trend

        return trend.main(argv[1:])
    args, pytest_args = parse(argv)
    try:
        dev = _device.pick_device(args.device)
    except RuntimeError as exc:
        print(f"perf: {exc}", file=sys.stderr)
        return Exit.USAGE
    slug = _device.device_slug(dev)
    if args.profile == "history":
        history.apply_profile(args, dev)
    base_path = baseline_path(args.baselines_dir, slug)

    # The baseline is read and checked before anything runs: a broken one must not cost a
    # whole benchmark run to find out about.
    baseline = None
    if base_path.exists():
        try:
            baseline = gate.load_baseline(base_path)
        except gate.BaselineError as exc:
            print(f"perf: invalid baseline: {exc}\nperf: fix the file, or make a new one with "
                  f"--save-baseline --replace after deleting it", file=sys.stderr)
            return Exit.BAD_BASELINE
    elif args.require_baseline and not (args.save_baseline or args.smoke):
        print(f"perf: no baseline for device '{slug}' ({base_path} does not exist) and "
              f"--require-baseline given.\nperf: make one on this device with `nox -s perf` (the first "
              f"run saves it) or `nox -s perf -- --save-baseline`, and commit {base_path.parent}/",
              file=sys.stderr)
        return Exit.NO_BASELINE
    strays = sorted(p.name for p in base_path.parent.glob("*.json") if p != base_path) \
        if base_path.parent.is_dir() else []
    if strays:
        print(f"perf: note: ignoring {', '.join(strays)} in {base_path.parent}/ (the baseline is {BASELINE_NAME})")

    bench_file = REAL_RANKS_FILE if args.real_ranks else BENCH_FILE
    gated = rows_of(baseline, bench_file)  # the rows this run's bench file can be gated against
    if baseline is not None and gated is None and not (args.save_baseline or args.smoke):
        if args.require_baseline:
            print(f"perf: the baseline {base_path} has no rows of {bench_file.name} and --require-baseline "
                  f"given.\nperf: add them on this device with `python -m perf{' --real-ranks' * args.real_ranks} "
                  f"--save-baseline` and commit {base_path.parent}/", file=sys.stderr)
            return Exit.NO_BASELINE
        print(f"perf: the baseline has no rows of {bench_file.name} yet: this run's rows will be merged into it")
    first_run = gated is None and not args.smoke
    saving = args.save_baseline or first_run
    gating = gated is not None and not (args.save_baseline or args.smoke)
    if first_run and baseline is None and not args.save_baseline:
        print(f"perf: no baseline for device '{slug}' yet: this run will be saved as its baseline")

    out_dir = args.reports_dir / slug
    out_dir.mkdir(parents=True, exist_ok=True)
    run_json = out_dir / "latest.json"
    run_json.unlink(missing_ok=True)
    selection = selection_args(args)
    cmd = [sys.executable, "-m", "pytest", str(bench_file), "-p", "no:cacheprovider", "-q",
           f"--perf-device={dev}", f"--perf-baselines={args.baselines_dir}", f"--benchmark-json={run_json}", "--benchmark-sort=name",
           "--benchmark-save-data", "--benchmark-columns=median,iqr,rounds", *selection]
    if gating:
        cmd += [f"--benchmark-compare={base_path}"]
    rc = _pytest(cmd + pytest_args)

    if rc == PYTEST_USAGE_ERROR:
        print("perf: pytest refused its arguments (its message is above); nothing ran", file=sys.stderr)
        return Exit.USAGE
    if rc == PYTEST_NO_TESTS:
        print("perf: the selection matched no benchmark; nothing ran", file=sys.stderr)
        return Exit.USAGE
    run = load_run(run_json)
    if run is None:
        print(f"perf: pytest exited {rc} and wrote no benchmark results ({run_json})", file=sys.stderr)
        return Exit.BENCHMARK_FAILED
    if not run["benchmarks"]:
        print("perf: no benchmark recorded a result (all skipped?)", file=sys.stderr)
        return Exit.BENCHMARK_FAILED
    md, png = report.write(run, out_dir)
    print(f"perf: report {md} and {png}")
    if args.smoke:
        return Exit.OK if rc == 0 else Exit.BENCHMARK_FAILED
    if not args.no_history:
        store = history.store_path(args.history_dir or history.default_dir(), slug)
        commit, dirty = history.git_state(HERE.parent)
        history.append(store, history.entry(run, commit=commit, dirty=dirty, note=args.history_note))
        print(f"perf: appended this run to the history {store} (`python -m perf history` plots it)")

    if saving:
        if rc != 0:
            print(f"perf: a benchmark failed (pytest exit {rc}); baseline NOT saved", file=sys.stderr)
            return Exit.BENCHMARK_FAILED
        _save(base_path, baseline, run, args.replace, slug)
        return Exit.OK

    thresholds = gate.Thresholds(time_pct=args.time_pct, ratio_pct=args.ratio_pct, memory_pct=args.memory_pct)
    full_run = is_full_run(selection + pytest_args)
    result = gate.check(run, gated, thresholds, full_run=full_run)
    if not args.no_confirm:
        result = confirm(cmd + _without_k(pytest_args), result, gated, thresholds, out_dir, bench_file)
    print(f"perf: baseline {base_path}" + ("" if full_run else " (a subset was selected)"))
    print(gate.summary(result))
    if not result.ok:
        return Exit.REGRESSION
    if rc != 0:
        print(f"perf: pytest exited {rc}: a benchmark failed (see its output above)", file=sys.stderr)
        return Exit.BENCHMARK_FAILED
    return Exit.OK


if __name__ == "__main__":
    sys.exit(main())
