"""DilatedPattern: validation, effective segments, head groups, weights, work count."""

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import ring_attention as ra
from ring_attention import pattern as P
from ring_attention.layout import check_ring_size
from tests.inputs import qkv
from tests.strategies import naive_weights, patterns

# --- validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(segment_lengths=(), dilation_rates=()), ValueError, "segment_lengths is empty"),
        (dict(segment_lengths=(4, 8), dilation_rates=(1,)), ValueError, "dilation_rates has 1"),
        (dict(segment_lengths=(0,), dilation_rates=(1,)), ValueError, r"segment_lengths\[0\]"),
        (dict(segment_lengths=(4, -8), dilation_rates=(1, 1)), ValueError, r"segment_lengths\[1\]"),
        (dict(segment_lengths=(4,), dilation_rates=(0,)), ValueError, r"dilation_rates\[0\]"),
        (dict(segment_lengths=(4,), dilation_rates=(-1,)), ValueError, r"dilation_rates\[0\]"),
        (dict(segment_lengths=(4.0,), dilation_rates=(1,)), TypeError, r"segment_lengths\[0\]"),
        (dict(segment_lengths=(4,), dilation_rates=(1.5,)), TypeError, r"dilation_rates\[0\]"),
        (dict(segment_lengths=(True,), dilation_rates=(1,)), TypeError, r"segment_lengths\[0\]"),
        (dict(segment_lengths=(4,), dilation_rates=(True,)), TypeError, r"dilation_rates\[0\]"),
        (dict(segment_lengths=(4,), dilation_rates=("1",)), TypeError, r"dilation_rates\[0\]"),
        (dict(segment_lengths=4, dilation_rates=(1,)), TypeError, "segment_lengths"),
        (dict(segment_lengths="48", dilation_rates=(1,)), TypeError, "segment_lengths"),
        (dict(segment_lengths=(4,), dilation_rates=1), TypeError, "dilation_rates"),
        (dict(segment_lengths=(4, 8), dilation_rates=(1, 9)), ValueError, r"dilation_rates\[1\] = 9 exceeds"),
        (dict(segment_lengths=(4,), dilation_rates=(1,), mode="mix"), ValueError, "unknown mode 'mix'"),
        (dict(segment_lengths=(4,), dilation_rates=(1,), mode=None), ValueError, "unknown mode"),
    ],
)
def test_invalid_pattern_fields(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ra.DilatedPattern(**kwargs)


def test_pattern_normalizes_to_int_tuples():
    p = ra.DilatedPattern([8, 16], [1, 2])
    assert p.segment_lengths == (8, 16) and p.dilation_rates == (1, 2)
    assert all(type(x) is int for x in p.segment_lengths + p.dilation_rates)
    assert p.mode == "mixture" and p.num_pairs == 2
    assert hash(p) == hash(ra.DilatedPattern((8, 16), (1, 2)))
    # r == w is allowed, r need not divide w
    ra.DilatedPattern((6, 5), (6, 3))


# Integers as users pass them: Python ints, numpy integers, 0-d integer tensors, and whole
# sequences as tuples, lists, ranges, 1-d integer tensors or arrays.
INTEGER_FORMS = [
    lambda x: x,
    np.int64,
    np.int32,
    np.uint8,
    torch.tensor,
    lambda x: torch.tensor(x, dtype=torch.int32),
]
SEQUENCE_FORMS = [tuple, list, torch.tensor, np.array, lambda xs: torch.tensor(xs, dtype=torch.int16)]


@pytest.mark.parametrize("form", INTEGER_FORMS)
@pytest.mark.parametrize("seq", SEQUENCE_FORMS[:2])
def test_pattern_accepts_integer_forms(form, seq):
    p = ra.DilatedPattern(seq([form(8), form(16)]), seq([form(1), form(2)]), mode="head_groups")
    assert p == ra.DilatedPattern((8, 16), (1, 2), mode="head_groups")
    assert hash(p) == hash(ra.DilatedPattern((8, 16), (1, 2), mode="head_groups"))
    assert all(type(x) is int for x in p.segment_lengths + p.dilation_rates)


@pytest.mark.parametrize("seq", SEQUENCE_FORMS + [lambda xs: range(xs[0], xs[1] + 1, xs[1] - xs[0])])
def test_pattern_accepts_sequence_forms(seq):
    p = ra.DilatedPattern(seq([8, 16]), seq([1, 2]))
    assert p.segment_lengths == (8, 16) and p.dilation_rates == (1, 2)
    assert all(type(x) is int for x in p.segment_lengths + p.dilation_rates)


@pytest.mark.parametrize("field", ["segment_lengths", "dilation_rates"])
@pytest.mark.parametrize(
    "value",
    [{8: 1}, {8}, frozenset({8}), torch.tensor(8), torch.tensor([[8]]), np.array([[8]]), np.array(8), 8, "8"],
    ids=["dict", "set", "frozenset", "0d-tensor", "2d-tensor", "2d-array", "0d-array", "int", "str"],
)
def test_pattern_refuses_non_sequences(field, value):
    kwargs = dict(segment_lengths=(8,), dilation_rates=(1,))
    kwargs[field] = value
    with pytest.raises(TypeError, match=rf"^{field} must be a sequence of integers"):
        ra.DilatedPattern(**kwargs)


@pytest.mark.parametrize(
    "bad",
    [
        8.0, np.float64(8), torch.tensor(8.0), torch.tensor(True), np.bool_(True), True,
        torch.tensor([8]), torch.tensor(8.0 + 0j), "8", None, Fraction(8),
    ],
    ids=repr,
)
@pytest.mark.parametrize("field", ["segment_lengths", "dilation_rates"])
def test_pattern_refuses_non_integers_with_type_error(field, bad):
    kwargs = dict(segment_lengths=[8, 16], dilation_rates=[1, 2])
    kwargs[field][1] = bad
    with pytest.raises(TypeError, match=rf"^{field}\[1\] must be an integer"):
        ra.DilatedPattern(**kwargs)


@pytest.mark.parametrize("bad", [np.int64(0), torch.tensor(-2), 0])
def test_pattern_refuses_non_positive_integer_forms_with_value_error(bad):
    with pytest.raises(ValueError, match=r"^segment_lengths\[0\] must be a positive integer"):
        ra.DilatedPattern((bad,), (1,))


# --- ring_size: the same integer forms, the same errors ------------------------------------------


@pytest.mark.parametrize("form", INTEGER_FORMS)
def test_ring_size_accepts_integer_forms(form):
    assert check_ring_size(form(3)) == 3 and type(check_ring_size(form(3))) is int
    q, k, v = qkv(1, 8, 2, 1, 4)
    want = ra.ring_attention(q, k, v, ring_size=2, causal=True)
    torch.testing.assert_close(ra.ring_attention(q, k, v, ring_size=form(2), causal=True), want)
    p = ra.DilatedPattern((4,), (2,))
    want = ra.ring_dilated_attention(q, k, v, p, ring_size=2, layout="zigzag")
    torch.testing.assert_close(ra.ring_dilated_attention(q, k, v, p, ring_size=form(2), layout="zigzag"), want)


@pytest.mark.parametrize(
    "bad",
    [2.0, "2", True, np.bool_(True), np.float32(2), torch.tensor(2.0), torch.tensor([2]), [2], Fraction(2)],
    ids=repr,
)
def test_ring_size_of_wrong_type_raises_type_error(bad):
    with pytest.raises(TypeError, match="^ring_size must be an integer"):
        check_ring_size(bad)
    with pytest.raises(TypeError, match="^ring_size must be an integer"):
        ra.ring_attention(*qkv(1, 8, 2, 1, 4), ring_size=bad)


@pytest.mark.parametrize("bad", [0, -1, np.int64(0), torch.tensor(-3)], ids=repr)
def test_ring_size_below_one_raises_value_error(bad):
    with pytest.raises(ValueError, match="^ring_size must be a positive integer"):
        ra.ring_attention(*qkv(1, 8, 2, 1, 4), ring_size=bad)


def test_pattern_is_frozen():
    p = ra.DilatedPattern((8,), (1,))
    with pytest.raises(AttributeError):
        p.mode = "head_groups"


# --- effective segment lengths and head groups ---------------------------------------


@pytest.mark.parametrize(
    "ws, n, expected",
    [((4, 8, 16), 16, (4, 8, 16)), ((4, 100), 8, (4, 8)), ((32,), 12, (12,)), ((1,), 7, (1,))],
)
def test_effective_segment_lengths(ws, n, expected):
    p = ra.DilatedPattern(ws, (1,) * len(ws))
    assert p.effective_segment_lengths(n) == expected


@pytest.mark.parametrize("ws, n, bad", [((4, 8), 12, 8), ((5,), 12, 5), ((3, 4), 9, 4)])
def test_effective_segment_lengths_not_dividing(ws, n, bad):
    p = ra.DilatedPattern(ws, (1,) * len(ws))
    with pytest.raises(ValueError, match=rf"N={n}.*w={bad}"):
        p.effective_segment_lengths(n)
    with pytest.raises(ValueError, match=rf"N={n}.*w={bad}"):
        p.check(n, 4)


@given(h=st.integers(1, 8), k=st.integers(2, 8))
def test_heads_of_pair_head_groups_needs_as_many_heads_as_pairs(h, k):
    assume(h < k)
    p = ra.DilatedPattern((1,) * k, (1,) * k, mode="head_groups")
    with pytest.raises(ValueError, match=f"H={h} < K={k}"):
        p.heads_of_pair(h)


@given(h=st.integers(1, 40), k=st.integers(1, 8))
def test_heads_of_pair_head_groups(h, k):
    assume(h >= k)
    p = ra.DilatedPattern((1,) * k, (1,) * k, mode="head_groups")
    groups = p.heads_of_pair(h)
    assert len(groups) == k
    for i, g in enumerate(groups):
        lo = math.floor(Fraction(i * h, k))
        hi = math.floor(Fraction((i + 1) * h, k))
        assert list(g) == list(range(lo, hi))
        assert len(g) >= 1
    # contiguous partition of all heads
    assert [x for g in groups for x in g] == list(range(h))


@given(h=st.integers(1, 12), k=st.integers(1, 5))
def test_heads_of_pair_mixture(h, k):
    p = ra.DilatedPattern((1,) * k, (1,) * k, mode="mixture")
    assert [list(g) for g in p.heads_of_pair(h)] == [list(range(h))] * k


# --- weights and computed_pairs against a literal reading of SEMANTICS.md ------------


def _naive_pair_masks(pattern, n, h, causal):
    """``{(k, head): M_k[head]}`` (as nested lists) for every head that runs pair ``k``."""
    out = {}
    ks = range(len(pattern.segment_lengths))
    for kk in ks:
        w = min(pattern.segment_lengths[kk], n)
        r = pattern.dilation_rates[kk]
        if pattern.mode == "mixture":
            heads = range(h)
        else:
            heads = [x for x in range(h) if math.floor(Fraction(kk * h, len(ks))) <= x < math.floor(Fraction((kk + 1) * h, len(ks)))]
        for head in heads:
            o = head % r
            m = [[0] * n for _ in range(n)]
            for i in range(n):
                for j in range(n):
                    same = i // w == j // w
                    sel_i = (i % w) % r == o
                    sel_j = (j % w) % r == o
                    ok = (not causal) or j <= i
                    m[i][j] = int(same and sel_i and sel_j and ok)
            out[(kk, head)] = m
    return out


@st.composite
def _pattern_case(draw, max_n=24):
    n = draw(st.integers(1, max_n))
    h = draw(st.sampled_from([1, 2, 3, 4, 6, 8]))
    pattern = draw(patterns(n, h))
    causal = draw(st.booleans())
    return n, h, pattern, causal


@given(_pattern_case())
def test_weights_match_naive_loop(case):
    n, h, pattern, causal = case
    w = P.weights(pattern, n, h, is_causal=causal)
    assert w.shape == (h, n, n) and w.dtype == torch.int64
    expected = naive_weights(pattern, n, h, causal)
    assert torch.equal(w, expected)
    # mixture: a key covered by two pairs counts twice; head_groups: weights are 0/1
    if pattern.mode == "head_groups":
        assert int(w.max()) <= 1
    else:
        assert int(w.max()) <= pattern.num_pairs


@pytest.mark.parametrize("causal", [False, True])
def test_weights_full_attention(causal):
    w = P.weights(None, 5, 3, is_causal=causal)
    assert torch.equal(w, naive_weights(None, 5, 3, causal))


def test_weights_mixture_double_counts_overlap():
    # pairs (4,1) and (8,2): head 0 keeps even positions in pair 2, so (0, 2) is covered twice
    p = ra.DilatedPattern((4, 8), (1, 2))
    w = P.weights(p, 8, 2)
    assert w[0, 0, 2] == 2 and w[0, 0, 1] == 1 and w[1, 1, 3] == 2 and w[1, 0, 4] == 0
    assert w[0, 0, 4] == 1  # only pair 2 (segment 8, even positions)
    assert w[0, 1, 5] == 0  # odd rows are not kept by head 0 in pair 2, different segment in pair 1


def test_weights_rate_not_dividing_segment():
    # LongNet-style r not dividing w: w=5, r=3, head 1 keeps offsets 1, 4 of each segment
    p = ra.DilatedPattern((5,), (3,))
    w = P.weights(p, 10, 3)
    kept_h1 = [i for i in range(10) if w[1, i].any()]
    assert kept_h1 == [1, 4, 6, 9]
    assert w[1, 1, 4] == 1 and w[1, 1, 6] == 0  # different segments
    kept_h2 = [i for i in range(10) if w[2, i].any()]
    assert kept_h2 == [2, 7]


def test_weights_segment_longer_than_sequence():
    p = ra.DilatedPattern((100,), (3,))
    w = P.weights(p, 6, 1)
    # effective segment 6: head 0 keeps positions 0 and 3, all in one segment
    expected = torch.zeros(1, 6, 6, dtype=torch.int64)
    for i in (0, 3):
        for j in (0, 3):
            expected[0, i, j] = 1
    assert torch.equal(w, expected)


def test_weights_rejects_bad_n_and_few_heads():
    with pytest.raises(ValueError, match="N=6.*w=4"):
        P.weights(ra.DilatedPattern((4,), (1,)), 6, 1)
    with pytest.raises(ValueError, match="H=1 < K=2"):
        P.weights(ra.DilatedPattern((4, 4), (1, 2), mode="head_groups"), 8, 1)


@given(_pattern_case(max_n=32))
def test_computed_pairs_counts_mask_nonzeros(case):
    n, h, pattern, causal = case
    expected = sum(sum(map(sum, m)) for m in _naive_pair_masks(pattern, n, h, causal).values())
    assert P.computed_pairs(pattern, n, h, is_causal=causal) == expected


@pytest.mark.parametrize("causal", [False, True])
def test_computed_pairs_full(causal):
    n, h = 7, 3
    expected = h * (n * (n + 1) // 2 if causal else n * n)
    assert P.computed_pairs(None, n, h, is_causal=causal) == expected


@given(st.integers(1, 40), st.sets(st.integers(1, 39), max_size=5), st.booleans(),
       st.one_of(st.none(), st.tuples(st.integers(-1, 41), st.integers(-1, 41))))
def test_computed_pairs_of_full_attention_counts_what_a_window_and_documents_keep(n, starts, causal, window):
    starts = sorted(c for c in starts if c < n)
    documents = (0, *starts, n) if starts else None
    window = None if window == (-1, -1) else window
    expected = int(P.weights(None, n, 2, is_causal=causal, window=window, documents=documents).sum())
    assert P.computed_pairs(None, n, 2, is_causal=causal, window=window, documents=documents) == expected


def test_as_pattern():
    p = ra.DilatedPattern((4,), (1,))
    assert P.as_pattern(p) is p
    with pytest.raises(TypeError, match="DilatedPattern"):
        P.as_pattern(((4,), (1,)))


def test_a_mode_is_an_enum_inside_and_its_name_at_the_boundary():
    """DilatedPattern stores a Mode; built from the name or the enum it is the same pattern,
    hashes alike (plan caches), and prints the name (error messages, module reprs)."""
    by_name = ra.DilatedPattern((4, 8), (1, 2), "head_groups")
    by_enum = ra.DilatedPattern((4, 8), (1, 2), ra.Mode.HEAD_GROUPS)
    assert by_name.mode is ra.Mode.HEAD_GROUPS and by_name == by_enum and hash(by_name) == hash(by_enum)
    assert repr(by_name) == repr(by_enum) and "mode='head_groups'" in repr(by_name)
    assert f"{by_name.mode}" == "head_groups" and ra.DilatedPattern((4,), (1,)).mode is ra.Mode.MIXTURE
    with pytest.raises(ValueError, match="unknown mode 'groups'"):
        ra.DilatedPattern((4,), (1,), "groups")


@given(
    segment=st.integers(1, 24), rate=st.integers(1, 6), data=st.data(),
)
def test_kept_positions_are_the_positions_selected_keeps(segment, rate, data):
    """The planner's progression form of ``sel(h, p)`` against the predicate the oracle uses,
    on a segment starting anywhere (a document start need not be a multiple of ``w``)."""
    offset = data.draw(st.integers(0, rate - 1))
    first = data.draw(st.integers(0, 3 * segment))
    start = data.draw(st.integers(0, 5 * segment))
    stop = data.draw(st.integers(start, 5 * segment + 1))
    pos = torch.arange(first, first + segment)
    keep = P.selected(pos - first, segment, rate, offset) & (pos >= start) & (pos < stop)
    assert list(P.kept_positions(first, first + segment, rate, offset, start, stop)) == pos[keep].tolist()


@settings(max_examples=60, deadline=None)
@given(_pattern_case(max_n=32), st.booleans(), st.one_of(st.none(), st.tuples(st.integers(-1, 33), st.integers(-1, 33))),
       st.integers(0, 3))
def test_computed_pairs_of_a_pattern_under_a_window_and_documents_is_the_sum_of_w(case, use_documents, window, split):
    """A dilated pattern with a window and packed documents counts what ``W`` keeps (mixture
    pairs twice): the segments restart at every document, the window is on positions."""
    n, h, pattern, causal = case
    documents = (0, n // 2, n) if use_documents and split and n % 2 == 0 and n >= 4 else None
    window = None if window == (-1, -1) else window
    try:
        w = P.weights(pattern, n, h, is_causal=causal, window=window, documents=documents)
    except ValueError:  # a document the pattern does not divide
        return
    assert P.computed_pairs(pattern, n, h, is_causal=causal, window=window, documents=documents) == int(w.sum())
