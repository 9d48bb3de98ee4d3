"""The regression gate: pure functions over pytest-benchmark JSON dicts.

Four arms, each comparing one benchmark of the current run with the same-named benchmark
of the device's baseline:

* time: raw median slower than ``time_pct`` percent (the same rule as pytest-benchmark's
  ``--benchmark-compare-fail=median:<time_pct>%``, which ``python -m perf`` also passes);
* memory: ``peak_memory_bytes`` above ``memory_pct`` percent plus ``memory_slack_bytes``;
* correctness: ``max_error`` NaN, above the dtype's absolute tolerance, or more than
  ``error_factor`` times the baseline's (ignoring differences under ``error_floor``);
* ratio: ``ratio_to_sdpa`` (variant time / SDPA time, both measured in the same run) up by
  more than ``ratio_pct`` percent. The ratio cancels a uniformly slower machine, so its
  threshold is tighter than the raw-time one; benchmarks whose own time is within
  ``min_time_s`` of the baseline's are not flagged (timer noise).

Benchmarks present on one side only are reported as notes, never as failures.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

DEFAULT_ERROR_TOL = {"float32": 1e-3, "float64": 1e-8, "float16": 5e-2, "bfloat16": 2.5e-1}


@dataclasses.dataclass(frozen=True)
class Thresholds:
    time_pct: float = 75.0
    memory_pct: float = 10.0
    memory_slack_bytes: int = 256 << 10
    ratio_pct: float = 30.0
    min_time_s: float = 1e-3
    error_tol: dict = dataclasses.field(default_factory=lambda: dict(DEFAULT_ERROR_TOL))
    error_factor: float = 10.0
    error_floor: float = 1e-5


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


def load(path) -> dict:
    return json.loads(Path(path).read_text())


def by_name(run: dict) -> dict[str, dict]:
    """Benchmarks of a pytest-benchmark JSON, keyed by test name (``test_attention[...]``)."""
    return {b["name"]: b for b in run.get("benchmarks", [])}


def check_time(name, now, base, thr: Thresholds):
    t_now, t_base = now["stats"]["median"], base["stats"]["median"]
    if t_now > t_base * (1 + thr.time_pct / 100):
        return Finding("time", name, f"median {t_now * 1e3:.3f} ms vs baseline {t_base * 1e3:.3f} ms "
                                     f"(+{(t_now / t_base - 1) * 100:.0f}% > {thr.time_pct:.0f}%)")
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
    e_now = now["extra_info"].get("max_error")
    if e_now is None:
        return None
    if math.isnan(e_now) or math.isinf(e_now):
        return Finding("correctness", name, f"max_error is {e_now}")
    tol = thr.error_tol.get(now["extra_info"].get("dtype"), 1e-3)
    if e_now > tol:
        return Finding("correctness", name, f"max_error {e_now:.3g} > tolerance {tol:.3g}")
    e_base = base["extra_info"].get("max_error") if base else None
    if e_base is not None and e_now > max(thr.error_factor * e_base, thr.error_floor):
        return Finding("correctness", name, f"max_error {e_now:.3g} > {thr.error_factor:g}x baseline "
                                            f"{e_base:.3g}")
    return None


def check_ratio(name, now, base, thr: Thresholds):
    r_now = now["extra_info"].get("ratio_to_sdpa")
    r_base = base["extra_info"].get("ratio_to_sdpa")
    if r_now is None or r_base is None or now["extra_info"].get("variant") == "dense":
        return None
    if abs(now["stats"]["median"] - base["stats"]["median"]) < thr.min_time_s:
        return None
    if r_now > r_base * (1 + thr.ratio_pct / 100):
        return Finding("ratio", name, f"ratio to SDPA {r_now:.3f} vs baseline {r_base:.3f} "
                                      f"(+{(r_now / r_base - 1) * 100:.0f}% > {thr.ratio_pct:.0f}%)")
    return None


ARMS = (check_time, check_memory, check_error, check_ratio)
TIMING_ARMS = ("time", "ratio")


def check(current: dict, baseline: dict, thresholds: Thresholds | None = None) -> GateResult:
    """Compare a run with a baseline (both pytest-benchmark JSON dicts)."""
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
    for name in base_map.keys() - now_map.keys():
        notes.append(Finding("missing", name, "in the baseline, not in this run"))
    return GateResult(failures, notes, compared)


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
        lines.append(f"  note: {len(missing)} baseline benchmark(s) not run")
    lines.append("perf gate: " + ("PASS" if result.ok else "FAIL"))
    return "\n".join(lines)
