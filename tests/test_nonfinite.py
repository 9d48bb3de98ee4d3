"""Non-finite inputs: which tensors are seen to be finite, and which query rows are marked."""

import pytest
import torch

from ring_attention import nonfinite
from tests.inputs import randn as _rand


@pytest.mark.parametrize(
    "make, finite",
    [
        (lambda: torch.randn(2, 3, 5, 4), True),
        (lambda: torch.randn(2, 3, 5, 4).index_fill_(2, torch.tensor([3]), float("nan")), False),
        (lambda: torch.randn(2, 3, 5, 4).index_fill_(3, torch.tensor([1]), float("-inf")), False),
        (lambda: torch.full((4, 4), torch.finfo(torch.float32).max), False),  # the sum overflows
        (lambda: torch.randn(4, 4, dtype=torch.float16), True),
    ],
)
def test_known_finite_reads_real_cpu_tensors(make, finite):
    assert nonfinite.known_finite(make()) is finite


def test_known_finite_is_false_where_reading_a_value_would_trace_or_stall():
    from torch._subclasses.fake_tensor import FakeTensorMode

    assert not nonfinite.known_finite(torch.ones(3, device="meta"))
    with FakeTensorMode():
        assert not nonfinite.known_finite(torch.ones(3))
        assert not nonfinite.known_finite(torch.ones(3, device="cuda"))


def test_transformed_and_traced_calls_read_no_value():
    from torch.fx.experimental.proxy_tensor import make_fx

    import ring_attention as ra

    q, k, v = (_rand((3, 1, 32, 2, 8), torch.float32, s) for s in range(3))
    assert not torch.func.vmap(lambda x: torch.tensor(nonfinite.known_finite(x)))(q).any()
    # vmap and make_fx (real tensors under a tracing mode) run as before: no .item() on them
    batched = torch.func.vmap(lambda x: ra.dense_attention(x, k[0], v[0], causal=True))(q)
    torch.testing.assert_close(batched, torch.stack([ra.dense_attention(x, k[0], v[0], causal=True) for x in q]))
    traced = make_fx(lambda a, b, c: ra.dilated_attention(a, b, c, ra.DilatedPattern((8, 16), (1, 2))))(q[0], k[0], v[0])
    torch.testing.assert_close(traced(q[0], k[0], v[0]), ra.dilated_attention(q[0], k[0], v[0], ra.DilatedPattern((8, 16), (1, 2))))


def test_only_a_query_seen_finite_skips_marking_its_rows():
    from torch._subclasses.fake_tensor import FakeTensorMode

    q = _rand((1, 2, 32, 8), torch.float32, 0)
    assert not nonfinite.marks_query_rows(q)  # seen finite: nothing to mark
    q[0, 1, 5, 2] = float("inf")
    assert nonfinite.marks_query_rows(q)
    with FakeTensorMode():  # no value to read: marked, whatever it holds
        assert nonfinite.marks_query_rows(torch.ones(1, 2, 32, 8))
        # CUDA: a row holding inf scoring -inf everywhere comes back as a row without keys
        assert nonfinite.marks_query_rows(torch.ones(1, 2, 32, 8, device="cuda"))


def test_band_hits_are_the_rows_whose_band_holds_a_bad_value():
    """Against the band as a dense block: every band of blocks up to 9 x 9, values bad at
    random places (NaN, inf, -inf)."""
    from ring_attention.masks import band_keeps

    g = torch.Generator().manual_seed(0)
    for q_len in range(1, 10):
        for k_len in range(1, 10):
            v = torch.randn(2, k_len, 3, generator=g, dtype=torch.float64)
            bad = torch.rand(v.shape, generator=g) < 0.15
            v[bad] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=v.dtype)[torch.arange(int(bad.sum())) % 3]
            for lo in range(-q_len - 1, k_len + 1):
                for hi in range(lo, k_len + 2):
                    keep = band_keeps(q_len, k_len, (lo, hi), torch.device("cpu")).double()
                    want = (keep @ (v - v).isnan().double()) > 0
                    got = nonfinite.band_hits(q_len, v, (lo, hi))
                    if not bad.any():  # seen to be finite: nothing to find
                        assert got is None
                        continue
                    assert got is not None and torch.equal(got, want), (q_len, k_len, lo, hi)
    assert nonfinite.band_hits(3, torch.ones(2, 4, 3), (0, 1)) is None  # finite: nothing to find


@pytest.mark.parametrize("path", ["split per source", "per call", "dense"])
def test_an_infinite_value_reaches_the_rows_attending_it_as_that_infinity(path):
    """The reference's sum of ``p * v`` over a row's keys is +inf where one of them is +inf,
    NaN where +inf meets -inf or NaN: a causal block's poison is that sum of the non-finite
    values (not a NaN for any of them), on every path that quarantines values."""
    import ring_attention as ra
    from ring_attention import executable
    from tests.inputs import qkv

    q, k, v = qkv(1, 128, 2, 2, 8, dtype=torch.float64)
    v[0, 40, 0, 1] = float("inf")
    v[0, 90, 0, 1] = -float("inf")  # rows 90 on: +inf meets -inf, NaN
    v[0, 60, 1, 2] = -float("inf")
    cu = pattern = None
    if path == "per call":  # distinct lengths: no two documents batch, each call quarantines its own
        lengths = [11, 12, 13, 14, 15, 16, 17, 10, 20]
        cu = [sum(lengths[:i]) for i in range(len(lengths) + 1)]
    executable.clear()
    if path == "dense":
        out = ra.dense_attention(q, k, v, causal=True)
    elif path == "per call":
        out = ra.ring_attention(q, k, v, causal=True, cu_seqlens=cu)
    else:  # several causal calls over much of the source (a dilated pattern): one split
        pattern = ra.DilatedPattern((64, 128), (1, 1), mode="head_groups")
        out = ra.dilated_attention(q, k, v, pattern, causal=True)
    if path != "dense":
        ranks = [r for p in executable._CACHE.values() for r in p.ranks.values()]
        assert [r.splits_values for r in ranks] == [path == "split per source"]
    ref = ra.reference_attention(q, k, v, pattern=pattern, causal=True, cu_seqlens=cu)
    assert ref.isposinf().any() and ref.isneginf().any()
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10, equal_nan=True)
