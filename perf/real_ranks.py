"""Real-rank benchmarks: the ring variants on ``R`` processes, one rank each.

``python -m perf --real-ranks`` runs ``perf/test_bench_real_ranks.py``: RingAttention and
RingDilated (LongNet's ``(256, 512, 1024) / (1, 2, 4)``, as the registry's ring-dilated
variants) x {contiguous, zigzag} x {full, causal} x ``R`` x the profile's ``N``, dtypes and
passes. One row is one :func:`launch`: ``R`` processes of :mod:`perf.rank_worker` (gloo on
CPU, NCCL with one GPU per rank), one thread each, a hard deadline, every rank killed when it
passes. The worker records:

* the slowest rank's time per round (``all_reduce(MAX)`` after a barrier started the round);
* the in-process simulation of the same work (``ring_size=R`` on the whole sequence, the
  registry's code), timed on rank 0 right before each round while the others wait: each
  round's real time divided by its simulation's per-rank share (simulation / R) gives the
  paired ``ratio_to_simulation``, as the suite's rows pair SDPA rounds;
* bytes each rank handed to ``batch_isend_irecv`` send ops in one call, and the counters'
  prediction (:func:`perf.counters.ring_traffic` around the simulation): they must be equal;
* the max error of the gathered shards (see :func:`error_note`) and each rank's peak memory.

The exchange is *hidden* when the slowest rank takes no more than :data:`HIDDEN_MAX` times its
expected share: the simulation's per-rank share, times ``R / cores`` where ranks outnumber
cores (they then share them: compute, not the exchange, sets the time).
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from perf import measure

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("RingAttention", "RingDilated")
LAYOUTS = ("contiguous", "zigzag")
# A slowest rank within this factor of its expected share: the exchange hides behind compute.
HIDDEN_MAX = 1.25
# Seconds a launch may take before its ranks are killed (``PERF_REAL_RANKS_TIMEOUT_S``).
DEFAULT_TIMEOUT_S = float(os.environ.get("PERF_REAL_RANKS_TIMEOUT_S", "600"))


class RankError(RuntimeError):
    """A launch that failed: a rank exited non-zero, hung past the deadline, or broke a check."""


@dataclasses.dataclass(frozen=True)
class Case:
    """One real-rank row: what every rank runs (JSON-able: it travels to the workers)."""

    kind: str
    layout: str
    causal: bool
    ranks: int
    n: int
    dtype: str = "float32"
    mode: str = "fwd"
    batch: int = 1
    heads: int = 8
    dim: int = 64
    rounds: int = 3
    warmup: int = 1
    device: str = "cpu"
    full_reference_max_n: int = 1024

    @property
    def name(self) -> str:
        """The row's id: ``RingAttention-zigzag-causal-R2-N4096-float32-fwd``."""
        mask = "causal" if self.causal else "full"
        return f"{self.kind}-{self.layout}-{mask}-R{self.ranks}-N{self.n}-{self.dtype}-{self.mode}"

    @property
    def variant_name(self) -> str:
        return f"{self.kind}-{self.layout}-{'causal' if self.causal else 'full'}"

    def variant(self):
        """The registry :class:`~ring_attention.registry.Variant` simulating this ring in one process."""
        from ring_attention import registry

        dilated = self.kind == "RingDilated"
        return registry.Variant(
            self.variant_name, f"{self.kind} over a ring of {self.ranks}",
            registry.Kind.RING_DILATED if dilated else registry.Kind.RING,
            pattern=registry.longnet() if dilated else (lambda n: None),
            ring_size=self.ranks, causal=self.causal, layout=self.layout)


def cases(profile, ranks, modes) -> list[Case]:
    """Every row of a profile (:class:`perf.device.Profile`) at the ring sizes ``ranks``."""
    out = []
    for n in profile.real_ranks_n:
        for dtype in profile.dtypes:
            for mode in modes:
                for r in ranks:
                    for kind in KINDS:
                        for layout in LAYOUTS:
                            for causal in (False, True):
                                case = Case(kind, layout, causal, r, n, dtype, mode, profile.batch,
                                            profile.heads, profile.head_dim, profile.real_ranks_rounds,
                                            profile.warmup_rounds, profile.device, profile.full_reference_max_n)
                                if case.variant().supports(n, profile.heads):
                                    out.append(case)
    return out


def error_note(case: Case) -> str:
    """What ``max_error`` compares: the gathered output (and dq/dk/dv with backward) with ..."""
    what = "output and dq/dk/dv" if case.mode == "fwd+bwd" else "output"
    if case.n <= case.full_reference_max_n:
        return f"{what} of the gathered shards vs full dense reference"
    return (f"{what} of the gathered shards vs the in-process simulation (exact to the reference, "
            f"tests/), and the output on 32 sampled query rows vs the dense reference")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(rank: int, world: int, port: int) -> dict:
    """A rank's environment: this checkout first on the path, one thread, the rendezvous."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def launch(case: Case, workdir: Path, timeout_s: float = DEFAULT_TIMEOUT_S,
           worker: str = "perf.rank_worker") -> list[dict]:
    """Run ``case`` on ``case.ranks`` processes of ``python -m worker``; every rank's result.

    A rank still running ``timeout_s`` after the launch is a hang: every rank is killed and
    :class:`RankError` names the ranks that did not finish, with their logs' tails.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    spec = workdir / "case.json"
    spec.write_text(json.dumps(dataclasses.asdict(case) | {"timeout_s": timeout_s}))
    port, procs, logs = _free_port(), [], []
    try:
        for rank in range(case.ranks):
            logs.append(open(workdir / f"rank{rank}.log", "w"))  # noqa: SIM115 - closed below
            procs.append(subprocess.Popen([sys.executable, "-m", worker, str(spec), str(workdir)],
                                          env=_env(rank, case.ranks, port), cwd=str(ROOT),
                                          stdout=logs[-1], stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout_s
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                break
        hung = [r for r, p in enumerate(procs) if p.poll() is None]
    finally:
        for p in procs:  # ours, by handle: nothing else is touched
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()

    def tail(rank):
        return f"--- rank {rank} ---\n" + (workdir / f"rank{rank}.log").read_text()[-2000:]

    if hung:
        raise RankError(f"{case.name}: rank(s) {hung} of {case.ranks} still running after {timeout_s:g} s "
                        f"(a hang: a rank never joined or never reached a collective); all killed\n"
                        + "\n".join(tail(r) for r in range(case.ranks)))
    failed = [(r, p.returncode) for r, p in enumerate(procs) if p.returncode != 0]
    if failed:
        raise RankError(f"{case.name}: rank(s) exited non-zero {failed}\n" + "\n".join(tail(r) for r, _ in failed))
    return [json.loads((workdir / f"rank{r}.json").read_text()) for r in range(case.ranks)]


@dataclasses.dataclass(frozen=True)
class Result:
    """What a launch measured, merged over its ranks (checked by :func:`merge`)."""

    slowest_s: list[float]          # per round: the slowest rank's time
    rank_s: list[list[float]]       # per rank, per round
    simulation_s: list[float]       # per round: the in-process simulation, rank 0
    bytes_sent: list[int]           # per rank, measured at batch_isend_irecv
    bytes_predicted: list[int]      # per rank, perf.counters' simulation
    peak_memory_bytes: list[int]    # per rank
    max_error: float
    threads: int


def merge(case: Case, ranks: list[dict]) -> Result:
    """One :class:`Result` from every rank's JSON; :class:`RankError` when the ranks disagree
    on the slowest time of a round (it must be the largest rank time: a wrong reduction)."""
    slowest = ranks[0]["slowest_s"]
    for r, res in enumerate(ranks):
        if res["slowest_s"] != slowest:
            raise RankError(f"{case.name}: ranks 0 and {r} recorded different slowest times")
    for i, t in enumerate(slowest):
        largest = max(res["round_s"][i] for res in ranks)
        if t != largest:
            raise RankError(f"{case.name}: round {i}: slowest-rank time {t} is not the largest rank's {largest}")
    return Result(slowest, [res["round_s"] for res in ranks], ranks[0]["simulation_s"],
                  [res["bytes_sent"] for res in ranks], ranks[0]["bytes_predicted"],
                  [res["peak_memory_bytes"] for res in ranks], ranks[0]["max_error"],
                  max(res["threads"] for res in ranks))


def run(case: Case, workdir: Path, timeout_s: float = DEFAULT_TIMEOUT_S, worker: str = "perf.rank_worker") -> Result:
    return merge(case, launch(case, workdir, timeout_s, worker))


def cores() -> int:
    """CPU cores this process may run on (the ranks share them), or GPUs for NCCL rows."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def extra_info(case: Case, result: Result, median_s: float) -> dict:
    """The row's ``extra_info``: the fields the gate and the report read, and the raw rounds."""
    import torch

    r = case.ranks
    variant = case.variant()
    share = [t / r for t in result.simulation_s]
    slots = cores() if case.device == "cpu" else r  # NCCL rows have a GPU per rank
    oversubscribed = max(1.0, r / slots)
    expected = measure.paired_ratio(result.slowest_s, share) / oversubscribed
    flops = variant.flops(case.batch, case.n, case.heads, case.dim, backward=case.mode == "fwd+bwd")
    return {
        "variant": case.variant_name, "kind": case.kind, "real_ranks": True, "ranks": r,
        "layout": case.layout, "causal": case.causal,
        "N": case.n, "B": case.batch, "H": case.heads, "D": case.dim, "dtype": case.dtype, "pass": case.mode,
        "device": case.device, "backend": "nccl" if case.device == "cuda" else "gloo",
        "device_name": _device_name(case.device), "torch_version": torch.__version__,
        "threads": result.threads, "cores": slots,
        "median_s": median_s, "tokens_per_s": case.batch * case.n / median_s,
        "flops": flops, "tflops": flops / median_s / 1e12,
        "rank_round_s": result.rank_s,
        "simulation_round_s": result.simulation_s,
        "simulation_median_s": _median(result.simulation_s),
        "simulation_share_s": _median(share),
        "ratio_to_simulation": measure.paired_ratio(result.slowest_s, share),
        "oversubscription": oversubscribed,
        "ratio_to_expected": expected,
        "exchange": "hidden" if expected <= HIDDEN_MAX else "exposed",
        "bytes_sent_per_rank": result.bytes_sent,
        "bytes_predicted_per_rank": result.bytes_predicted,
        # exact, so gated exactly: the busiest rank as perf.counters defines it, and every rank
        "counters": {"bytes_sent": max(result.bytes_sent),
                     **{f"bytes_sent_rank{i}": b for i, b in enumerate(result.bytes_sent)}},
        "peak_memory_bytes": max(result.peak_memory_bytes),
        "max_error": result.max_error, "max_error_note": error_note(case),
        "rounds": case.rounds, "warmup_rounds": case.warmup,
    }


def _median(xs):
    import statistics

    return statistics.median(xs)


def _device_name(dev: str) -> str:
    from perf import device

    return device.device_name(dev)
