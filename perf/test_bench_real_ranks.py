"""Real-rank benchmarks (``python -m perf --real-ranks``): the ring variants on R processes.

Each row launches its ranks (:func:`perf.real_ranks.launch`), which time their own rounds
(the slowest rank's time per round) and the in-process simulation of the same work; the rounds
are then handed to pytest-benchmark through ``measure.round_clock``, as every row of
``test_bench_attention.py`` hands its own, and ``extra_info`` carries what the gate and the
report read (:func:`perf.real_ranks.extra_info`). The bytes each rank sent must equal
``perf.counters``' prediction exactly: the row is recorded, then fails if they differ.
"""

from __future__ import annotations

import pytest

from perf import measure, real_ranks


def test_real_ranks(benchmark, real_case, tmp_path):
    case = real_case
    if case.device == "cuda":
        import torch

        if torch.cuda.device_count() < case.ranks:
            pytest.skip(f"{case.name}: NCCL needs a GPU per rank ({torch.cuda.device_count()} < {case.ranks})")
    try:
        result = real_ranks.run(case, tmp_path)
    except real_ranks.RankError as exc:
        pytest.fail(str(exc), pytrace=False)
    rounds = iter(result.slowest_s)

    def timed_round():
        measure.ROUND_CLOCK.advance(next(rounds, result.slowest_s[-1]))

    benchmark.group = f"real ranks N={case.n} {case.dtype} {case.mode}"
    benchmark.pedantic(timed_round, rounds=len(result.slowest_s), warmup_rounds=0, iterations=1)
    if benchmark.stats is not None:  # None under --benchmark-disable (a smoke run)
        benchmark.extra_info.update(real_ranks.extra_info(case, result, benchmark.stats.stats.median))
    assert result.bytes_sent == result.bytes_predicted, (
        f"{case.name}: bytes sent per rank {result.bytes_sent} != perf.counters' prediction {result.bytes_predicted}")
