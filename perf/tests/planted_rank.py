"""A planted rank worker for ``perf/tests/test_perf_real_ranks.py``: :mod:`perf.rank_worker` with one fault.

    PERF_RANK_PLANT=never-join   rank 1 sleeps instead of joining the process group (a hang)
    PERF_RANK_PLANT=slow:0.2     rank 1 sleeps 0.2 s after each ring call it makes (the slowest rank)

Started by :func:`perf.real_ranks.launch` with ``worker="perf.tests.planted_rank"``.
"""

from __future__ import annotations

import os
import sys
import time

from perf import rank_worker


def _slow(delay: float):
    original = rank_worker.ring_fn

    def ring_fn(case, group):
        fn = original(case, group)

        def call(q, k, v):
            out = fn(q, k, v)  # the exchange is over: only this rank is held up
            time.sleep(delay)
            return out

        return call

    return ring_fn


def main() -> int:
    plant, rank = os.environ.get("PERF_RANK_PLANT", ""), int(os.environ["RANK"])
    if rank == 1 and plant == "never-join":
        time.sleep(3600)
    if rank == 1 and plant.startswith("slow:"):
        rank_worker.ring_fn = _slow(float(plant.split(":", 1)[1]))
    return rank_worker.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
