"""The one-sided Mann-Whitney U test of perf/ranktest.py against enumerating every split."""

from __future__ import annotations

import itertools
import random

import pytest

from perf import ranktest


def brute_force_p(before, after) -> float:
    """P(U >= observed) over every split of the pooled values, U counted pair by pair."""
    def u(b, a):
        return sum((x > y) + 0.5 * (x == y) for x in a for y in b)

    pooled, n2 = list(before) + list(after), len(after)
    observed = u(before, after)
    splits = list(itertools.combinations(range(len(pooled)), n2))
    hits = 0
    for chosen in splits:
        a = [pooled[i] for i in chosen]
        b = [pooled[i] for i in range(len(pooled)) if i not in chosen]
        hits += u(b, a) >= observed - 1e-9
    return hits / len(splits)


@pytest.mark.parametrize("before, after", [
    ([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]),
    ([3.1, 1.2, 5.5, 2.0], [4.4, 6.0, 0.5, 7.1, 2.2]),
    ([1, 2, 2, 3, 3], [2, 3, 3, 4]),          # ties across the samples
    ([5, 5, 5, 1], [5, 5, 2, 9, 9]),
    ([4.0, 3.0, 2.0], [1.0, 0.5, 0.2, 0.1]),  # after smaller: p near 1
])
def test_exact_p_is_the_permutation_test(before, after):
    test = ranktest.mann_whitney_greater(before, after)
    assert test.method == "exact"
    assert test.p == pytest.approx(brute_force_p(before, after), abs=1e-12)
    assert test.u == sum((x > y) + 0.5 * (x == y) for x in after for y in before)


def test_normal_approximation_follows_the_exact_test():
    rng = random.Random(3)
    for shift in (0.0, 0.3, 0.8):
        before = [round(rng.gauss(0, 1), 1) for _ in range(15)]  # rounded: ties
        after = [round(rng.gauss(shift, 1), 1) for _ in range(15)]
        exact = ranktest.mann_whitney_greater(before, after, exact=True).p
        normal = ranktest.mann_whitney_greater(before, after, exact=False).p
        assert normal == pytest.approx(exact, abs=0.01)
    assert ranktest.mann_whitney_greater([2.0] * 5, [2.0] * 5, exact=False).p == 1.0  # all tied


def test_one_sided_direction_and_power():
    assert ranktest.mann_whitney_greater([1, 2, 3], [4, 5, 6]).p == pytest.approx(0.05)  # 1 / C(6, 3)
    assert ranktest.mann_whitney_greater([4, 5, 6], [1, 2, 3]).p == 1.0
    with pytest.raises(ValueError):
        ranktest.mann_whitney_greater([], [1.0])
    with pytest.raises(ValueError):
        ranktest.mann_whitney_greater([1.0], [float("nan")])
