"""The history store: every ``python -m perf`` run appended as one JSON line per device.

``perf/history/<device-slug>.jsonl`` (ignored by git; ``--history-dir`` or the
``PERF_HISTORY_DIR`` variable move it) holds one line per run:

* ``commit`` (``git rev-parse HEAD`` of the checkout the suite ran from) and ``dirty``
  (tracked files modified), ``timestamp``, ``slug``, ``device_name``, ``torch``, ``python``,
  ``threads``, ``note`` (``--history-note``: what a planted or special run was);
* ``benchmarks``: per benchmark its ``name``, ``variant``, ``N``, ``dtype``, ``pass``, every timed
  round (``round_s``, pytest-benchmark's ``stats.data``, kept by ``--benchmark-save-data``),
  the SDPA round timed right before each of them (``sdpa_round_s``), ``median_s``,
  ``ratio_to_sdpa``, ``peak_memory_bytes``, ``max_error`` and the cost ``counters``.

The per-round ratio to SDPA (:func:`round_ratios`) pairs round ``i`` of the variant with
SDPA round ``i``, the one timed just before it in the same run: the suite already times
them in pairs for its ``ratio_to_sdpa``, and a pair shares the machine's state of that
moment (load, clock), which the run's SDPA median would not. Each ratio is then one
drift-free observation, so a rank test over them compares code, not machines.

The history profile (:data:`PROFILE`, ``python -m perf --profile history``) runs a few rows
with ``ROUNDS`` rounds each, enough for the rank test of :mod:`perf.trend` to reach its level.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_DIR = HERE / "history"
ENV_DIR = "PERF_HISTORY_DIR"
SCHEMA = 1

# Rounds per benchmark of the history profile: with 15 + 15 rounds the exact one-sided
# rank test reaches p ~ 1e-8 on a clean shift; with 3 + 3 it cannot go below 0.05.
ROUNDS = 15
WARMUP = 2
# The history profile's rows: a dilated variant, the production mixture, a dilated ring and
# a causal ring (single call, plans, ring exchange, causal skipping), forward only.
VARIANTS = ("longnet", "Production", "RingDilatedV2-ring4", "ring-zigzag-causal4")
SEQ_LENS = {"cpu": (1024,), "cuda": (16384,)}
PASSES = ("fwd",)


def apply_profile(args, device: str) -> None:
    """Fill the runner's selection (``args``) with the history profile where it left it open."""
    args.variants = args.variants or VARIANTS
    args.n = args.n or SEQ_LENS.get(device, SEQ_LENS["cpu"])
    args.passes = args.passes or PASSES
    args.rounds = args.rounds or ROUNDS
    args.warmup = WARMUP if args.warmup is None else args.warmup


def default_dir() -> Path:
    """``$PERF_HISTORY_DIR``, else ``perf/history``."""
    return Path(os.environ[ENV_DIR]) if os.environ.get(ENV_DIR) else DEFAULT_DIR


def store_path(directory: Path, slug: str) -> Path:
    """The device's store: ``<directory>/<slug>.jsonl``."""
    return Path(directory) / f"{slug}.jsonl"


def git_state(root: Path = HERE.parent) -> tuple[str, bool]:
    """``(commit, dirty)`` of the checkout at ``root``; ``("unknown", False)`` outside git.

    Dirty means tracked files differ from the commit (untracked files do not count: the
    reports and this store are written into the tree).
    """
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False
    return commit, bool(status.strip())


def _share_rounds(e: dict) -> list[float] | None:
    """A real-rank row's anchor rounds (perf.real_ranks): the simulation's per-rank share of each round."""
    sim = e.get("simulation_round_s")
    return None if sim is None else [t / e["ranks"] for t in sim]


def _bench_record(b: dict) -> dict | None:
    e, rounds = b.get("extra_info", {}), b.get("stats", {}).get("data")
    if "median_s" not in e or not rounds:  # --benchmark-disable, or a run without its rounds
        return None
    return {
        "name": b["name"], "variant": e["variant"], "N": e["N"], "dtype": e["dtype"], "pass": e["pass"],
        "round_s": list(rounds), "sdpa_round_s": e.get("sdpa_round_s", _share_rounds(e)),
        "median_s": e["median_s"], "ratio_to_sdpa": e.get("ratio_to_sdpa", e.get("ratio_to_simulation")),
        "peak_memory_bytes": e.get("peak_memory_bytes"), "max_error": e.get("max_error"),
        "counters": e.get("counters"),
    }


def entry(run: dict, *, commit: str, dirty: bool, note: str | None = None, now: str | None = None) -> dict:
    """The history line of a run (a pytest-benchmark JSON written with its rounds' data)."""
    info = run.get("machine_info", {})
    benches = [r for r in (_bench_record(b) for b in run.get("benchmarks", [])) if r is not None]
    return {
        "schema": SCHEMA,
        "timestamp": now or datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit, "dirty": dirty, "note": note,
        "slug": info.get("perf_device"), "device_name": info.get("device_name"),
        "torch": info.get("torch"), "python": info.get("python_version") or platform.python_version(),
        "threads": info.get("torch_threads"),
        "benchmarks": benches,
    }


def append(path: Path, line: dict) -> None:
    """Add one run to the store (created with its folder when missing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(line, sort_keys=True) + "\n")


class HistoryError(ValueError):
    """A store line that is not a run: names the file and line."""


def load(path: Path) -> list[dict]:
    """The runs of a store, oldest first. Blank lines are skipped; a broken one raises."""
    runs = []
    for number, text in enumerate(Path(path).read_text().splitlines(), 1):
        if not text.strip():
            continue
        try:
            run = json.loads(text)
        except json.JSONDecodeError as exc:
            raise HistoryError(f"{path}:{number}: not JSON ({exc.msg})") from None
        if not isinstance(run, dict) or not isinstance(run.get("benchmarks"), list):
            raise HistoryError(f"{path}:{number}: not a run (no 'benchmarks' list)")
        runs.append(run)
    return runs


def round_ratios(bench: dict) -> list[float]:
    """Round ``i`` of the variant over the SDPA round timed just before it (see the module doc).

    A record without SDPA rounds (the ``dense`` anchor is its own) gives ratios of 1.
    """
    anchor = bench.get("sdpa_round_s") or bench["round_s"]
    if len(anchor) != len(bench["round_s"]):
        raise ValueError(f"{bench['name']}: {len(bench['round_s'])} rounds, {len(anchor)} SDPA rounds")
    return [t / a for t, a in zip(bench["round_s"], anchor)]


def run_label(run: dict) -> str:
    """``abc1234`` (``*`` when dirty), with the run's note: how plots and tables name a run."""
    label = str(run.get("commit", "?"))[:7] + ("*" if run.get("dirty") else "")
    return f"{label} {run['note']}" if run.get("note") else label


def series(runs: list[dict]) -> dict[str, list[tuple[int, dict]]]:
    """Per benchmark name, its ``(run index, record)`` pairs in run order."""
    out: dict[str, list[tuple[int, dict]]] = {}
    for i, run in enumerate(runs):
        for bench in run["benchmarks"]:
            out.setdefault(bench["name"], []).append((i, bench))
    return out
