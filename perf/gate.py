"""The regression gate: pure functions over pytest-benchmark JSON dicts.

Five arms, each comparing one benchmark of the current run with the same-named benchmark
of the device's baseline:

* time: raw median slower than ``time_pct`` percent (the same rule as pytest-benchmark's
  ``--benchmark-compare-fail=median:<time_pct>%``);
* memory: ``peak_memory_bytes`` above ``memory_pct`` percent plus ``memory_slack_bytes``;
* correctness: ``max_error`` NaN, above the dtype's absolute tolerance, or more than
  ``error_factor`` times the baseline's (differences under ``error_floor`` never count);
* ratio: ``ratio_to_sdpa`` (variant time / SDPA time, both measured in the same run) up by
  more than ``ratio_pct`` percent. The ratio cancels a uniformly slower machine, so its
  threshold is tighter than the raw-time one. A benchmark whose own median moved by no more
  than its rounds' spread (the larger interquartile range of the two runs) is not flagged:
  its ratio moved because SDPA's rounds did. Real-rank rows (:mod:`perf.real_ranks`) carry
  ``ratio_to_simulation`` (slowest rank / the in-process simulation's per-rank share, paired by
  round) instead: the arm reads whichever anchor ratio the row has (:func:`anchor_ratio`).

Cost counters (``extra_info["counters"]``, from :mod:`perf.counters`: launches, fused calls,
live-bytes peak, bytes sent per rank, FLOPs) are deterministic, so their arm has no noise
allowance: any counter above the baseline's fails, one below is noted as an improvement,
and a benchmark whose run or baseline has no counters (a baseline older than the counters)
is noted as not compared.

Coverage: a run that compares no benchmark with the baseline fails; a benchmark of the
baseline absent from a full run (nothing deselected) fails; benchmarks new to the run get
the absolute error check and a note.

:func:`validate` checks a baseline before anything runs; :func:`confirmed` keeps the
failures a re-run confirms.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

DEFAULT_ERROR_TOL = {"float32": 1e-3, "float64": 1e-8, "float16": 5e-2, "bfloat16": 2.5e-1}
# The tolerance of a dtype missing from the table.
FALLBACK_ERROR_TOL = 1e-3


@dataclasses.dataclass(frozen=True)
class Thresholds:
    time_pct: float = 75.0
    memory_pct: float = 10.0
    memory_slack_bytes: int = 256 << 10
    ratio_pct: float = 30.0
    # The history's regression threshold (perf.trend): a median ratio-to-SDPA rise that fails
    # when the rank test over the runs' rounds also calls it significant. Tighter than ratio_pct:
    # the test, not the threshold, is what keeps a noisy run's shift out there.
    trend_pct: float = 5.0
    error_tol: dict = dataclasses.field(default_factory=lambda: dict(DEFAULT_ERROR_TOL))
    error_factor: float = 10.0
    error_floor: float = 1e-5

    def tolerance(self, dtype) -> float:
        """The absolute error tolerance of ``dtype`` (a dtype name)."""
        return self.error_tol.get(dtype, FALLBACK_ERROR_TOL)


@dataclasses.dataclass(frozen=True)
class Finding:
    """One gate failure (or note): which arm, which benchmark, and why."""

    arm: str
    name: str
    message: str

    def __str__(self) -> str:
        return f"[{self.arm}] {self.name}: {self.message}"


@dataclasses.dataclass
class GateResult:
    failures: list[Finding]
    notes: list[Finding]
    compared: int

    @property
    def ok(self) -> bool:
        return not self.failures


class BaselineError(ValueError):
    """A baseline file that cannot be gated against: names the file and the field."""

    def __init__(self, path, field: str, problem: str):
        self.path, self.field, self.problem = str(path), field, problem
        super().__init__(f"{path}: {field}: {problem}")


def load(path) -> dict:
    return json.loads(Path(path).read_text())


def _number(value, *, positive: bool = False, integer: bool = False):
    """The problem with ``value`` as a finite (positive / integer) number, or ``None``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"not a number: {value!r}"
    if integer and not isinstance(value, int):
        return f"not an integer: {value!r}"
    if not math.isfinite(value):
        return f"not finite: {value!r}"
    if value < 0 or (positive and value == 0):
        return f"must be {'> 0' if positive else '>= 0'}: {value!r}"
    return None


# Baseline fields the gate reads: (where, key, check keyword arguments); None: any string.
_REQUIRED = (
    ("stats", "median", {"positive": True}),
    ("stats", "iqr", {}),
    ("extra_info", "variant", None),
    ("extra_info", "dtype", None),
    ("extra_info", "pass", None),
    ("extra_info", "N", {"positive": True, "integer": True}),
    ("extra_info", "peak_memory_bytes", {"integer": True}),
    ("extra_info", "max_error", {}),
    ("extra_info", "ratio_to_sdpa", {"positive": True}),
)


# The anchor ratio of a row: real-rank rows are paired with the simulation, the others with SDPA.
ANCHOR_RATIOS = ("ratio_to_simulation", "ratio_to_sdpa")


def anchor_ratio(extra_info: dict) -> tuple[str, float | None]:
    """``(key, value)`` of the row's anchor ratio: ``ratio_to_simulation`` where the row has one."""
    key = next((k for k in ANCHOR_RATIOS if k in extra_info), ANCHOR_RATIOS[-1])
    return key, extra_info.get(key)


def _required(bench: dict):
    """:data:`_REQUIRED`, with the row's own anchor ratio in place of ``ratio_to_sdpa``."""
    info = bench.get("extra_info")
    anchor = anchor_ratio(info)[0] if isinstance(info, dict) else "ratio_to_sdpa"
    return [(sec, anchor if key == "ratio_to_sdpa" else key, rule) for sec, key, rule in _REQUIRED]


def _counters_problem(counters):
    """The problem with an ``extra_info.counters`` value, as ``(key, problem)``, or ``None``."""
    if not isinstance(counters, dict):
        return "", f"not a JSON object: {counters!r}"
    for key, value in counters.items():
        problem = _number(value)
        if problem:
            return f".{key}", problem
    return None


def validate(data, path="baseline") -> dict:
    """Check a baseline's schema and numbers; return it, or raise :class:`BaselineError`.

    Every field the gate reads must be there, numbers must be numbers (not strings, not
    booleans), finite, and positive where the gate divides by them (a NaN ``max_error``
    would turn the relative correctness check off: refused). Names must be unique. The
    optional ``extra_info.counters`` must be an object of numbers >= 0.
    """
    if not isinstance(data, dict):
        raise BaselineError(path, "<top level>", f"not a JSON object: {type(data).__name__}")
    benches = data.get("benchmarks")
    if not isinstance(benches, list):
        raise BaselineError(path, "benchmarks", "missing or not a list")
    if not benches:
        raise BaselineError(path, "benchmarks", "empty: a baseline must hold at least one benchmark")
    seen = set()
    for i, bench in enumerate(benches):
        where = f"benchmarks[{i}]"
        if not isinstance(bench, dict):
            raise BaselineError(path, where, "not a JSON object")
        name = bench.get("name")
        if not isinstance(name, str) or not name:
            raise BaselineError(path, f"{where}.name", f"missing or not a string: {name!r}")
        if name in seen:
            raise BaselineError(path, f"{where}.name", f"duplicate benchmark {name!r}")
        seen.add(name)
        where = f"benchmarks[{i}] ({name})"
        for section, key, rule in _required(bench):
            part = bench.get(section)
            if not isinstance(part, dict):
                raise BaselineError(path, f"{where}.{section}", "missing or not a JSON object")
            if key not in part:
                raise BaselineError(path, f"{where}.{section}.{key}", "missing")
            value = part[key]
            problem = (None if isinstance(value, str) and value else f"not a non-empty string: {value!r}") \
                if rule is None else _number(value, **rule)
            if problem:
                raise BaselineError(path, f"{where}.{section}.{key}", problem)
        if "counters" in bench["extra_info"]:  # optional: baselines older than the counters lack it
            problem = _counters_problem(bench["extra_info"]["counters"])
            if problem:
                raise BaselineError(path, f"{where}.extra_info.counters{problem[0]}", problem[1])
    return data


def load_baseline(path) -> dict:
    """Read and :func:`validate` a baseline file; :class:`BaselineError` on any problem."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise BaselineError(path, "<file>", f"cannot be read: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BaselineError(path, "<file>", f"not valid JSON (line {exc.lineno}, column {exc.colno}: "
                                            f"{exc.msg})") from None
    return validate(data, path)


def by_name(run: dict) -> dict[str, dict]:
    """Benchmarks of a pytest-benchmark JSON, keyed by test name (``test_attention[...]``)."""
    return {b["name"]: b for b in run.get("benchmarks", [])}


def check_time(name, now, base, thr: Thresholds):
    t_now, t_base = now["stats"]["median"], base["stats"]["median"]
    if t_now > t_base * (1 + thr.time_pct / 100):
        return Finding("time", name, f"median {t_now * 1e3:.3f} ms vs baseline {t_base * 1e3:.3f} ms "
                                     f"(+{(t_now / t_base - 1) * 100:.0f}% > {thr.time_pct:g}%)")
    return None


def check_memory(name, now, base, thr: Thresholds):
    m_now = now["extra_info"].get("peak_memory_bytes")
    m_base = base["extra_info"].get("peak_memory_bytes")
    if m_now is None or m_base is None:
        return None
    limit = m_base * (1 + thr.memory_pct / 100) + thr.memory_slack_bytes
    if m_now > limit:
        return Finding("memory", name, f"peak {m_now / 2**20:.2f} MiB vs baseline {m_base / 2**20:.2f} MiB "
                                       f"(limit {limit / 2**20:.2f} MiB)")
    return None


def check_error(name, now, base, thr: Thresholds):
    """Absolute tolerance of the run's dtype, then (with a baseline) the relative rule.

    The relative limit is ``max(error_factor * baseline, error_floor)``; a baseline error
    that is not a finite number leaves the floor as the limit (stricter, never off).
    """
    e_now = now["extra_info"].get("max_error")
    if e_now is None:
        return None
    if not math.isfinite(e_now):
        return Finding("correctness", name, f"max_error is {e_now}")
    dtype = now["extra_info"].get("dtype")
    tol = thr.tolerance(dtype)
    if e_now > tol:
        return Finding("correctness", name, f"max_error {e_now:.3g} > {dtype} tolerance {tol:.3g}")
    e_base = base["extra_info"].get("max_error") if base else None
    if e_base is None:
        return None
    finite = isinstance(e_base, (int, float)) and math.isfinite(e_base)
    limit = max(thr.error_factor * e_base, thr.error_floor) if finite else thr.error_floor
    if e_now > limit:
        return Finding("correctness", name, f"max_error {e_now:.3g} > limit {limit:.3g} "
                                            f"({thr.error_factor:g}x baseline {e_base:.3g}, "
                                            f"floor {thr.error_floor:g})")
    return None


def timing_spread(now, base) -> float:
    """The noise scale of a benchmark's median: the larger interquartile range of its rounds."""
    return max(now["stats"].get("iqr") or 0.0, base["stats"].get("iqr") or 0.0)


def check_ratio(name, now, base, thr: Thresholds):
    key, r_now = anchor_ratio(now["extra_info"])
    r_base = base["extra_info"].get(key)
    if r_now is None or r_base is None or now["extra_info"].get("variant") == "dense":
        return None
    # Faster or slower alike: a median that moved no more than the rounds' spread is noise.
    if abs(now["stats"]["median"] - base["stats"]["median"]) <= timing_spread(now, base):
        return None
    if r_now > r_base * (1 + thr.ratio_pct / 100):
        what = "to the simulation's share" if key == "ratio_to_simulation" else "to SDPA"
        return Finding("ratio", name, f"ratio {what} {r_now:.3f} vs baseline {r_base:.3f} "
                                      f"(+{(r_now / r_base - 1) * 100:.0f}% > {thr.ratio_pct:g}%)")
    return None


def _counter_pairs(now, base):
    """``(key, run value, baseline value)`` of the counters both hold, in the run's order."""
    c_now, c_base = now["extra_info"].get("counters"), base["extra_info"].get("counters")
    if not c_now or not c_base:
        return []
    return [(key, c_now[key], c_base[key]) for key in c_now if key in c_base]


def _counter_change(pairs) -> str:
    return ", ".join(f"{key} {v_now:.12g} vs baseline {v_base:.12g} ({v_now - v_base:+.12g})"
                     for key, v_now, v_base in pairs)


def check_counters(name, now, base, thr: Thresholds):
    """Any cost counter above the baseline's fails: they are deterministic, so no allowance."""
    risen = [(key, v_now, v_base) for key, v_now, v_base in _counter_pairs(now, base) if v_now > v_base]
    if risen:
        return Finding("counters", name, _counter_change(risen))
    return None


def counter_notes(name, now, base) -> list[Finding]:
    """Notes of the counter arm: counters below the baseline's, and counters not compared."""
    c_now, c_base = now["extra_info"].get("counters"), base["extra_info"].get("counters")
    if not c_now or not c_base:
        which = "the run" if c_base else "the baseline (older than the counters?)" if c_now else \
            "the run or the baseline"
        return [Finding("counters-not-compared", name, f"no cost counters in {which}")]
    notes = []
    fallen = [(key, v_now, v_base) for key, v_now, v_base in _counter_pairs(now, base) if v_now < v_base]
    if fallen:
        notes.append(Finding("improved", name, _counter_change(fallen)))
    unmatched = sorted(c_now.keys() ^ c_base.keys())
    if unmatched:
        notes.append(Finding("counters-not-compared", name, f"only in one of run and baseline: {', '.join(unmatched)}"))
    return notes


ARMS = (check_time, check_memory, check_error, check_ratio, check_counters)
TIMING_ARMS = ("time", "ratio")


def check(current: dict, baseline: dict, thresholds: Thresholds | None = None, *,
          full_run: bool = False) -> GateResult:
    """Compare a run with a baseline (both pytest-benchmark JSON dicts).

    ``full_run``: nothing was deselected, so every benchmark of the baseline should be in
    the run; one that is not fails (``coverage``). A run sharing no benchmark with the
    baseline fails too: a gate that compared nothing says nothing.
    """
    thr = thresholds or Thresholds()
    now_map, base_map = by_name(current), by_name(baseline)
    failures, notes, compared = [], [], 0
    for name, now in now_map.items():
        base = base_map.get(name)
        if base is None:
            notes.append(Finding("new", name, "not in the baseline"))
            finding = check_error(name, now, None, thr)  # the absolute tolerance still applies
            if finding:
                failures.append(finding)
            continue
        compared += 1
        for arm in ARMS:
            finding = arm(name, now, base, thr)
            if finding:
                failures.append(finding)
        notes += counter_notes(name, now, base)
    for name in sorted(base_map.keys() - now_map.keys()):
        if full_run:
            failures.append(Finding("coverage", name, "in the baseline, missing from this full run "
                                                      "(skipped, failed or no longer generated)"))
        else:
            notes.append(Finding("missing", name, "in the baseline, not selected in this run"))
    if compared == 0:
        failures.append(Finding("coverage", "*", f"no benchmark of this run ({len(now_map)}) is in the "
                                                 f"baseline ({len(base_map)}): nothing was compared"))
    return GateResult(failures, notes, compared)


def confirmed(first: GateResult, rerun: GateResult | None) -> GateResult:
    """The failures of ``first`` that stand after a re-run of the timing-flagged benchmarks.

    Memory, correctness and coverage failures are deterministic and always stand; a timing
    failure (time, ratio) stands when the re-run flags the same arm of the same benchmark
    again, or when there is no re-run to judge by (``rerun`` is ``None``).
    """
    if rerun is None:
        return first
    again = {(f.arm, f.name) for f in rerun.failures}
    kept = [f for f in first.failures if f.arm not in TIMING_ARMS or (f.arm, f.name) in again]
    return GateResult(kept, first.notes, first.compared)


def summary(result: GateResult) -> str:
    """Human-readable verdict."""
    lines = [f"perf gate: {result.compared} benchmarks compared, {len(result.failures)} regression(s)"]
    by_arm: dict[str, int] = {}
    for f in result.failures:
        by_arm[f.arm] = by_arm.get(f.arm, 0) + 1
    if by_arm:
        lines.append("  by arm: " + ", ".join(f"{k}={v}" for k, v in sorted(by_arm.items())))
    lines += [f"  FAIL {f}" for f in result.failures]
    new = [n for n in result.notes if n.arm == "new"]
    missing = [n for n in result.notes if n.arm == "missing"]
    if new:
        lines.append(f"  note: {len(new)} benchmark(s) not in the baseline")
    if missing:
        lines.append(f"  note: {len(missing)} baseline benchmark(s) not selected in this run")
    lines += [f"  improved {n}" for n in result.notes if n.arm == "improved"]
    uncounted = [n for n in result.notes if n.arm == "counters-not-compared"]
    if uncounted:
        lines.append(f"  note: cost counters not compared for {len(uncounted)} benchmark(s) "
                     f"({uncounted[0].message}, ...)")
    lines.append("perf gate: " + ("PASS" if result.ok else "FAIL"))
    return "\n".join(lines)
