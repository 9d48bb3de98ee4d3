"""Sharding a sequence over a ring: SEMANTICS.md's layouts, and lengths that do not divide.

The oracle is SEMANTICS.md's definition written out per position: ``contiguous`` gives rank
``r`` positions ``[r*N/R, (r+1)*N/R)``; ``zigzag`` cuts ``2R`` chunks and gives rank ``r``
chunks ``r`` and ``2R-1-r``; ``documents`` deals ``8R`` chunks by their causal work within
the documents, heaviest first, to the least loaded rank with room.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import ring_attention as ra
from ring_attention import layout as L

LAYOUTS = ("contiguous", "zigzag")


def _positions(n: int, ring_size: int, rank: int, layout: str) -> list[int]:
    if layout == "contiguous":
        size = n // ring_size
        return list(range(rank * size, (rank + 1) * size))
    c = n // (2 * ring_size)
    return [p for chunk in (rank, 2 * ring_size - 1 - rank) for p in range(chunk * c, (chunk + 1) * c)]


@given(st.integers(1, 6), st.integers(1, 8), st.sampled_from(LAYOUTS), st.integers(1, 3))
def test_split_gives_every_rank_its_positions_and_join_inverts_it(ring_size, per_chunk, layout, batch):
    n = ring_size * (2 if layout == "zigzag" else 1) * per_chunk
    x = torch.arange(batch * n).view(batch, n) % n
    shards = L.shard(x, ring_size, layout)
    assert len(shards) == ring_size
    for r, shard in enumerate(shards):
        assert shard[0].tolist() == _positions(n, ring_size, r, layout)
    assert torch.equal(L.unshard(shards, layout), x)


@given(st.integers(1, 64), st.integers(2, 8), st.sampled_from(LAYOUTS))
def test_split_refuses_a_length_that_does_not_divide(n, ring_size, layout):
    parts = ring_size * (2 if layout == "zigzag" else 1)
    assume(n % parts != 0)
    x = torch.arange(n).view(1, n)
    for call in (
        lambda: L.shard(x, ring_size, layout),
        lambda: L.shard(x.view(1, 1, n), ring_size, layout, dim=2),
        lambda: L.shard_intervals(n, ring_size, 0, layout),
    ):
        with pytest.raises(ValueError) as info:
            call()
        msg = str(info.value)
        assert f"N={n}" in msg and f"R={ring_size}" in msg and layout in msg, msg


def test_split_of_the_issue_example_keeps_every_token_or_raises():
    # split(arange(10), 4, "contiguous") used to drop 8 and 9 silently
    with pytest.raises(ValueError, match=r"N=10 must be divisible by 4 \(R\) for ring size R=4 with the contiguous"):
        L.shard(torch.arange(10).view(1, 10), 4, "contiguous")
    with pytest.raises(ValueError, match=r"N=10 must be divisible by 4 \(2R\) for ring size R=2 with the zigzag"):
        L.shard(torch.arange(10).view(1, 10), 2, "zigzag")


@pytest.mark.parametrize(
    "args, exc, match",
    [
        ((4, "spiral"), ValueError, "unknown layout 'spiral'"),
        ((0, "contiguous"), ValueError, "ring_size must be a positive integer"),
        ((2.0, "contiguous"), TypeError, "ring_size must be an integer"),
    ],
)
def test_split_refuses_bad_ring_size_or_layout(args, exc, match):
    with pytest.raises(exc, match=match):
        L.shard(torch.arange(8).view(1, 8), *args)


def test_shard_intervals_refuses_a_rank_outside_the_ring():
    with pytest.raises(ValueError, match="rank 2 is outside a ring of size R=2"):
        L.shard_intervals(8, 2, 2, "contiguous")


@pytest.mark.parametrize(
    "lengths, layout, match",
    [((4, 3), "contiguous", r"one length, got lengths \[4, 3\]"), ((3, 3), "zigzag", "not divisible by 2"), ((4, 4), "documents", "not divisible by 8"), ((), "zigzag", "at least one")],
)
def test_join_refuses_shards_no_split_makes(lengths, layout, match):
    with pytest.raises(ValueError, match=match):
        L.unshard([torch.zeros(1, m) for m in lengths], layout)


def test_a_layout_is_an_enum_inside_and_its_name_at_the_boundary():
    """Layout.ZIGZAG and "zigzag" are one layout: same shards, same plans (one cache entry)."""
    from ring_attention.plans import rank_plan

    assert L.check_layout("zigzag") is L.Layout.ZIGZAG is L.check_layout(ra.Layout.ZIGZAG)
    assert f"{ra.Layout.ZIGZAG}" == str(ra.Layout.ZIGZAG) == "zigzag" and hash(ra.Layout.ZIGZAG) == hash("zigzag")
    assert rank_plan(None, 16, 2, 2, True, 2, "zigzag", 1) is rank_plan(None, 16, 2, 2, True, 2, ra.Layout.ZIGZAG, 1)
    x = torch.arange(16.0).reshape(1, 16)
    for a, b in zip(L.shard(x, 2, "zigzag"), L.shard(x, 2, ra.Layout.ZIGZAG)):
        assert torch.equal(a, b)
    q = k = v = torch.randn(1, 16, 2, 4, dtype=torch.float64)
    assert torch.equal(ra.ring_attention(q, k, v, ring_size=2, layout="zigzag", causal=True),
                       ra.ring_attention(q, k, v, ring_size=2, layout=ra.Layout.ZIGZAG, causal=True))


@given(ring_size=st.integers(1, 6), chunk=st.integers(1, 4), layout=st.sampled_from(list(ra.Layout)), data=st.data())
def test_holders_are_the_ranks_whose_shards_meet_the_positions(ring_size, chunk, layout, data):
    n = ring_size * L.chunks_per_rank(layout) * chunk
    start = data.draw(st.integers(0, n - 1))
    stop = data.draw(st.integers(start + 1, n))
    expected = {
        r for r in range(ring_size)
        if any(a < stop and start < b for a, b in L.shard_intervals(n, ring_size, r, layout))
    }
    assert L.holders(n, ring_size, layout, start, stop) == expected


def _dealt(n: int, ring_size: int, documents: list[int]) -> list[list[int]]:
    """SEMANTICS.md's documents layout, per position: each chunk's work is the number of
    keys each of its positions attends causally in its document; chunks go heaviest first
    (then lowest) to the rank with least work (then lowest) among those with fewer than 8."""
    count = 8 * ring_size
    c = n // count
    start_of = [max(s for s in documents[:-1] if s <= p) for p in range(n)]
    work = [sum(p - start_of[p] + 1 for p in range(ch * c, (ch + 1) * c)) for ch in range(count)]
    load, held = [0] * ring_size, [[] for _ in range(ring_size)]
    for ch in sorted(range(count), key=lambda ch: (-work[ch], ch)):
        rank = min((r for r in range(ring_size) if len(held[r]) < 8), key=lambda r: (load[r], r))
        load[rank] += work[ch]
        held[rank].append(ch)
    return [[p for ch in sorted(chunks) for p in range(ch * c, (ch + 1) * c)] for chunks in held]


@given(st.integers(1, 4), st.integers(1, 3), st.sets(st.integers(1, 95), max_size=8), st.booleans())
def test_the_documents_layout_deals_chunks_by_their_work(ring_size, per_chunk, starts, as_tensor):
    n = 8 * ring_size * per_chunk
    documents = [0, *sorted(c for c in starts if c < n), n]
    cu = torch.tensor(documents, dtype=torch.int32) if as_tensor else documents
    x = torch.arange(2 * n).view(2, n) % n
    shards = ra.shard(x, ring_size, "documents", cu_seqlens=cu)
    want = _dealt(n, ring_size, documents)
    assert [s[0].tolist() for s in shards] == want  # N/R each, ascending within a shard
    assert torch.equal(ra.unshard(shards, "documents", cu_seqlens=cu), x)
    assert sorted(p for w in want for p in w) == list(range(n))


def test_the_documents_layout_balances_the_benchmarks_documents():
    """64 long-tailed documents, causal, ring of 4: the busiest rank attends at most 1.15x
    the idlest's pairs (zigzag, balanced for one document, is 3.9x off here)."""
    from ring_attention.masks import SequenceMask
    from ring_attention.plans import ring_plans
    from ring_attention.registry import packed_documents

    n = 8192
    mask = SequenceMask(causal=True, documents=packed_documents(n, 64))

    def spread(layout):
        pairs = [p.attended_pairs() for p in ring_plans(None, n, 1, 1, mask, 4, layout, range(4))]
        return max(pairs) / min(pairs)

    assert spread("documents") <= 1.15 < 3 < spread("zigzag")


def test_the_documents_layout_without_documents_balances_one_causal_sequence():
    from ring_attention.plans import ring_plans

    pairs = [p.attended_pairs() for p in ring_plans(None, 1024, 1, 1, True, 4, "documents", range(4))]
    assert max(pairs) / min(pairs) <= 1.02
