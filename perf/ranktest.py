"""The one-sided Mann-Whitney U test (Wilcoxon rank-sum), without scipy.

``mann_whitney_greater(before, after)`` asks whether ``after`` tends to be larger than
``before`` (H1: a value drawn from ``after`` exceeds one drawn from ``before`` more often
than not) and returns :class:`UTest`: the statistic U of ``after`` and its one-sided p-value.

* Exact (the default up to ``EXACT_MAX`` values in all): the null distribution is that of
  the rank sum of ``len(after)`` values drawn without replacement from the pooled midranks,
  counted by dynamic programming over the pooled values. Ties are handled exactly (midranks
  are the permutation test's own statistic), so this is a permutation test, not an
  approximation; the tests check it against enumerating every split.
* Normal approximation above that: mean ``n1 n2 / 2``, variance with the tie correction
  ``n1 n2 / 12 * ((n + 1) - sum(t^3 - t) / (n (n - 1)))`` and a continuity correction of 1/2.

Rounds of a benchmark are continuous timings, so ties are rare, but synthetic data (and
quantised clocks) have them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

# Pooled sizes up to this are tested exactly (15 + 15 rounds is 30: well inside, and fast).
EXACT_MAX = 80


@dataclasses.dataclass(frozen=True)
class UTest:
    """``u``: U of the second sample (pairs where it is larger, ties counting 1/2);
    ``p``: one-sided p-value for "the second sample is larger"; ``method``: exact or normal."""

    u: float
    p: float
    method: str


def midranks(values: Sequence[float]) -> list[float]:
    """Ranks 1..n of ``values`` in their order, tied values sharing the mean of their ranks."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1  # positions i..j hold ranks i+1..j+1
        i = j + 1
    return ranks


def _exact_p(ranks: list[float], n2: int, observed_sum: float) -> float:
    """P(rank sum of ``n2`` of ``ranks`` drawn at random >= ``observed_sum``).

    Midranks are multiples of 1/2: doubled, they are integers, so the distribution is a
    table ``ways[k][s]`` (ways to pick ``k`` values summing to ``s``), filled value by value.
    """
    doubled = [round(2 * r) for r in ranks]
    ways: list[dict[int, int]] = [{} for _ in range(n2 + 1)]
    ways[0][0] = 1
    for value in doubled:
        for k in range(min(n2, len(doubled)) - 1, -1, -1):  # downwards: each value used once
            for s, count in ways[k].items():
                ways[k + 1][s + value] = ways[k + 1].get(s + value, 0) + count
    target = round(2 * observed_sum)
    total = sum(ways[n2].values())
    return sum(c for s, c in ways[n2].items() if s >= target) / total


def _normal_p(ranks: list[float], n1: int, n2: int, u: float) -> float:
    n = n1 + n2
    counts: dict[float, int] = {}
    for r in ranks:
        counts[r] = counts.get(r, 0) + 1
    ties = sum(t ** 3 - t for t in counts.values())
    var = n1 * n2 / 12 * ((n + 1) - ties / (n * (n - 1)))
    if var <= 0:  # every value tied: no evidence either way
        return 1.0
    z = (u - n1 * n2 / 2 - 0.5) / math.sqrt(var)
    return 0.5 * math.erfc(z / math.sqrt(2))


def mann_whitney_greater(before: Sequence[float], after: Sequence[float], *,
                         exact: bool | None = None) -> UTest:
    """One-sided Mann-Whitney U test of "``after`` is larger than ``before``".

    ``exact``: ``None`` picks the exact test up to :data:`EXACT_MAX` pooled values, the normal
    approximation above. Raises ``ValueError`` on an empty sample or a non-finite value.
    """
    before, after = [float(x) for x in before], [float(x) for x in after]
    if not before or not after:
        raise ValueError(f"both samples need values: {len(before)} and {len(after)}")
    if not all(math.isfinite(x) for x in before + after):
        raise ValueError("samples must be finite numbers")
    n1, n2 = len(before), len(after)
    ranks = midranks(before + after)
    u = sum(ranks[n1:]) - n2 * (n2 + 1) / 2
    if exact is None:
        exact = n1 + n2 <= EXACT_MAX
    if exact:
        return UTest(u, _exact_p(ranks, n2, sum(ranks[n1:])), "exact")
    return UTest(u, _normal_p(ranks, n1, n2, u), "normal")
