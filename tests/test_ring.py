"""Ring attention simulated in one process (``group=None, ring_size=R``) against the reference.

The oracle is always ``reference_attention`` on the whole sequence (or, for the plan
tests, counts derived from SEMANTICS.md's weights), never the code under test. The real
process-group runs are in test_distributed.py.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ring_attention as ra
from ring_attention import layout as _layout
from ring_attention import pattern as _pattern
from ring_attention.masks import BlockMask
from ring_attention.plans import ring_plans
from tests.inputs import F64, HEADS, LAYOUTS, assert_matches, fwd_bwd, make_qkv
from tests.plan_view import plan_view


@st.composite
def ring_cases(draw):
    ring_size = draw(st.sampled_from([1, 2, 3, 4]))
    layout = draw(st.sampled_from(LAYOUTS))
    parts = ring_size * _layout.chunks_per_rank(layout)
    n = parts * draw(st.integers(1, 4))
    h, hkv = draw(st.sampled_from(HEADS))
    return dict(
        ring_size=ring_size, layout=layout, n=n, h=h, hkv=hkv,
        b=draw(st.integers(1, 2)), d=draw(st.sampled_from([4, 8])),
        causal=draw(st.booleans()),
        scale=draw(st.one_of(st.none(), st.floats(0.05, 2.0))),
        checkpoint=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=40)
@given(case=ring_cases())
def test_simulated_ring_matches_reference(case):
    q, k, v, g = make_qkv(case["seed"], case["b"], case["n"], case["h"], case["hkv"], case["d"])
    kw = dict(causal=case["causal"], scale=case["scale"])
    got = fwd_bwd(
        lambda q, k, v: ra.ring_attention(
            q, k, v, ring_size=case["ring_size"], layout=case["layout"], checkpoint=case["checkpoint"], **kw
        ),
        q, k, v, g,
    )
    want = fwd_bwd(lambda q, k, v: ra.reference_attention(q, k, v, **kw), q, k, v, g)
    assert_matches(got, want, **F64)


@settings(max_examples=20)
@given(
    ring_size=st.sampled_from([2, 3, 4]),
    chunk=st.integers(1, 3),
    heads=st.sampled_from(HEADS),
    causal=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_output_does_not_depend_on_ring_size_or_layout(ring_size, chunk, heads, causal, seed):
    """float32: ring_size 1 vs R, contiguous vs zigzag agree up to rounding."""
    n = 2 * ring_size * chunk
    h, hkv = heads
    q, k, v, g = make_qkv(seed, 2, n, h, hkv, 8, dtype=torch.float32)
    results = {
        (r, lay): fwd_bwd(lambda q, k, v, r=r, lay=lay: ra.ring_attention(
            q, k, v, ring_size=r, layout=lay, causal=causal), q, k, v, g)
        for r, lay in ((1, "contiguous"), (ring_size, "contiguous"), (ring_size, "zigzag"), (1, "zigzag"))
    }
    base = results[(1, "contiguous")]
    for key, got in results.items():
        assert got[0].dtype == torch.float32
        torch.testing.assert_close(got[0], base[0], atol=2e-6, rtol=1e-5, msg=lambda m, key=key: f"{key}: {m}")
        for a, b in zip(got[1], base[1]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.parametrize(
    "dtype, out_tol, grad_tol",
    [(torch.float16, 4e-3, 2e-2), (torch.bfloat16, 3e-2, 1.5e-1)],
    ids=["float16", "bfloat16"],
)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_low_precision_smoke(dtype, out_tol, grad_tol, layout, causal):
    """Half precision against the float64 reference on the same (rounded) inputs."""
    q, k, v, g = make_qkv(5, 2, 64, 4, 2, 16, dtype=dtype)
    out, grads = fwd_bwd(lambda q, k, v: ra.ring_attention(q, k, v, ring_size=4, layout=layout, causal=causal),
                         q, k, v, g)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_grads = fwd_bwd(lambda q, k, v: ra.reference_attention(q, k, v, causal=causal), q64, k64, v64, g.double())
    assert out.dtype == dtype and all(gr.dtype == dtype for gr in grads)
    assert torch.isfinite(out).all() and all(torch.isfinite(gr).all() for gr in grads)
    assert (out.double() - ref).abs().max().item() < out_tol
    for name, a, b in zip(("dq", "dk", "dv"), grads, ref_grads):
        err = (a.double() - b).abs().max().item()
        assert err < grad_tol * max(1.0, b.abs().max().item()), f"{name}: max error {err}"


def test_gradcheck_zigzag_causal_gqa():
    """Finite differences, independent of the reference: R=2, zigzag, causal, GQA."""
    q, k, v, _ = make_qkv(7, 1, 8, 2, 1, 4)
    assert torch.autograd.gradcheck(
        lambda q, k, v: ra.ring_attention(q, k, v, ring_size=2, layout="zigzag", causal=True),
        (q, k, v), eps=1e-6, atol=1e-6,
    )


# --- plans: what each rank computes and receives -----------------------------------------------


def _calls_work(blocks, num_heads, triangle: bool):
    """Score entries computed by ``blocks``: diagonal calls count their triangle if ``triangle``."""
    total = 0
    for blk in blocks:
        heads = len(range(*blk.heads.indices(num_heads)))
        for c in blk.calls:
            if triangle and c.mask is BlockMask.CAUSAL:
                assert c.q_len == c.k_len
                total += heads * c.runs * c.q_len * (c.q_len + 1) // 2
            else:
                total += heads * c.runs * c.q_len * c.k_len
    return total


def _received_blocks(plan, rank):
    return [blk for step in plan.steps for blk in step.blocks.get(rank, ())]


@pytest.mark.parametrize("ring_size", [2, 3, 4])
def test_contiguous_causal_plan_skips_blocks_above_the_diagonal(ring_size):
    n, h, hkv = 8 * ring_size, 4, 2
    plan = plan_view(None, n, h, hkv, True, ring_size, "contiguous")
    assert len(plan.steps) == ring_size - 1
    for step in plan.steps:
        # Rank dst receives from src = dst - shift only when src < dst (keys before queries):
        # rank 0 receives nothing, and the last rank sends nothing.
        assert 0 not in step.blocks
        assert sorted(step.blocks) == list(range(step.shift, ring_size))
        assert sorted(step.sends) == list(range(0, ring_size - step.shift))
        assert ring_size - 1 not in step.sends
    # Work grows with the rank: rank r computes r full blocks plus its diagonal.
    shard = n // ring_size
    for r in range(ring_size):
        assert _calls_work(_received_blocks(plan, r), h, False) == r * h * shard * shard
    full = plan_view(None, n, h, hkv, False, ring_size, "contiguous")
    for step in full.steps:
        assert sorted(step.blocks) == list(range(ring_size)) == sorted(step.sends)


@pytest.mark.parametrize("ring_size", [2, 3, 4])
@pytest.mark.parametrize("heads", [(4, 2), (2, 2)])
def test_zigzag_causal_plan_is_balanced(ring_size, heads):
    h, hkv = heads
    n = 2 * ring_size * 4
    plan = plan_view(None, n, h, hkv, True, ring_size, "zigzag")
    received = [_calls_work(_received_blocks(plan, r), h, False) for r in range(ring_size)]
    total = [_calls_work(list(plan.local[r]) + _received_blocks(plan, r), h, False) for r in range(ring_size)]
    assert len(set(received)) == 1, f"received work per rank: {received}"
    assert len(set(total)) == 1, f"total work per rank: {total}"
    # Every rank receives at every step (half of each peer's shard is before its queries).
    for step in plan.steps:
        assert sorted(step.blocks) == list(range(ring_size))
    contiguous = plan_view(None, n, h, hkv, True, ring_size, "contiguous")
    contiguous_total = [
        _calls_work(list(contiguous.local[r]) + _received_blocks(contiguous, r), h, False)
        for r in range(ring_size)
    ]
    assert max(total) < max(contiguous_total)


@given(
    ring_size=st.sampled_from([1, 2, 3, 4]),
    layout=st.sampled_from(LAYOUTS),
    chunk=st.integers(1, 4),
    heads=st.sampled_from(HEADS),
    causal=st.booleans(),
)
def test_plan_computes_each_allowed_score_once(ring_size, layout, chunk, heads, causal):
    """Summed over ranks, the plan's work is the number of nonzero weights: H*N*N or H*N(N+1)/2.

    Counting diagonal (block-causal) calls by their triangle, a plan that also computed
    blocks above the diagonal, or a block twice, would count more.
    """
    h, hkv = heads
    n = ring_size * _layout.chunks_per_rank(layout) * chunk
    plan = plan_view(None, n, h, hkv, causal, ring_size, layout)
    work = sum(
        _calls_work(list(plan.local[r]) + _received_blocks(plan, r), h, True) for r in range(ring_size)
    )
    assert work == int(_pattern.weights(None, n, h, is_causal=causal).sum())


def test_messages_carry_only_kv_heads():
    """GQA: each message holds the shard's rows of the Hkv kv heads, never the H query heads."""
    plan = plan_view(None, 16, 8, 2, False, 2, "contiguous")
    for step in plan.steps:
        for msgs in step.sends.values():
            assert sum(len(m.rows) for m in msgs) == 8
            assert all(len(m.kv_heads) == 2 for m in msgs)


# --- bad input -------------------------------------------------------------------------------


def _small(n, h=2, hkv=2):
    q, k, v, _ = make_qkv(0, 1, n, h, hkv, 4, requires_grad=False)
    return q, k, v


@pytest.mark.parametrize(
    "n, ring_size, layout",
    [(10, 3, "contiguous"), (7, 2, "contiguous"), (12, 4, "zigzag"), (6, 2, "zigzag"), (9, 3, "zigzag")],
)
def test_sequence_not_divisible_raises(n, ring_size, layout):
    with pytest.raises(ValueError, match=f"N={n}"):
        ra.ring_attention(*_small(n), ring_size=ring_size, layout=layout)


@pytest.mark.parametrize("layout", ["spiral", "Zigzag", "", None, 2])
def test_unknown_layout_raises(layout):
    with pytest.raises(ValueError, match="layout"):
        ra.ring_attention(*_small(8), ring_size=2, layout=layout)


@pytest.mark.parametrize("ring_size", [0, -1, -4])
def test_non_positive_ring_size_raises(ring_size):
    with pytest.raises(ValueError, match="ring_size"):
        ra.ring_attention(*_small(8), ring_size=ring_size)


@pytest.mark.parametrize("ring_size", ["2", 2.0, True, [2]])
def test_non_integer_ring_size_raises(ring_size):
    with pytest.raises((ValueError, TypeError), match="ring_size"):
        ra.ring_attention(*_small(8), ring_size=ring_size)


@pytest.mark.parametrize("kwargs", [dict(causal=1), dict(checkpoint="yes"), dict(scale="0.5")])
def test_bad_flags_raise_type_error(kwargs):
    with pytest.raises(TypeError):
        ra.ring_attention(*_small(8), ring_size=2, **kwargs)


def test_group_without_initialized_process_group_raises():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    with pytest.raises(RuntimeError, match="not initialized"):
        ra.ring_attention(*_small(8), group=object())


# --- traffic: a neighbour ring -------------------------------------------------------------


def _exchanges(monkeypatch, fn, *args, **kwargs):
    """Run ``fn``, forward and backward; record every exchange: (hop, {sender: bytes})."""
    from ring_attention import comm

    log, original = [], comm.SimulatedRing.exchange

    def exchange(self, shift, sends, specs, device):
        log.append((shift % self.size, {r: sum(t.numel() * t.element_size() for t in ts) for r, ts in sends.items()}))
        return original(self, shift, sends, specs, device)

    monkeypatch.setattr(comm.SimulatedRing, "exchange", exchange)
    q, k, v, g = args
    fn(q, k, v, **kwargs).backward(g)
    return log


@pytest.mark.parametrize("causal, layout", [(False, "contiguous"), (False, "zigzag"), (True, "zigzag")])
def test_full_attention_ring_passes_shards_to_the_neighbour(monkeypatch, causal, layout):
    """Each rank sends only to rank + 1: its K/V shard, then what it received, R - 1 times
    a pass; dK/dV follow the same way back to their owner. Per rank and pass, forward:
    (R - 1) K/V shards; backward: as many again, plus (R - 1) float32 dK/dV shards."""
    r, n, h, d = 4, 64, 2, 8
    q, k, v, g = make_qkv(0, 1, n, h, h, d, dtype=torch.float32)
    log = _exchanges(monkeypatch, ra.ring_attention, q, k, v, g, ring_size=r, causal=causal, layout=layout)
    assert {hop for hop, _ in log} == {1}
    shard = (n // r) * h * d * 4  # bytes of one rank's K (or V, or float32 dK)
    sent = {rank: sum(by_rank.get(rank, 0) for _, by_rank in log) for rank in range(r)}
    assert sent == {rank: 3 * 2 * (r - 1) * shard for rank in range(r)}


def test_causal_contiguous_ring_sends_only_what_ranks_after_need(monkeypatch):
    """Rank r holds keys that only ranks after it attend: it sends them straight there."""
    r, n, h, d = 4, 64, 2, 8
    q, k, v, g = make_qkv(0, 1, n, h, h, d, dtype=torch.float32)
    log = _exchanges(monkeypatch, ra.ring_attention, q, k, v, g, ring_size=r, causal=True)
    shard = (n // r) * h * d * 4
    forward = {rank: 0 for rank in range(r)}
    for hop, by_rank in log[: r - 1]:  # the forward's shifts 1 .. R-1
        for rank, size in by_rank.items():
            assert rank + hop < r, f"rank {rank} sent to rank {(rank + hop) % r}, which does not attend it"
            forward[rank] += size
    assert forward == {rank: 2 * (r - 1 - rank) * shard for rank in range(r)}


def test_a_zigzag_rank_attends_its_own_two_chunks_in_one_causal_call():
    # chunks r and 2R-1-r follow each other in packed order, which is position order: one
    # causal block over both is exact, where two diagonal blocks and a full one took 3 calls
    for plan in ring_plans(None, 64, 2, 2, True, 4, "zigzag", tuple(range(4))):
        (block,) = plan.local
        assert [(c.runs, c.q_len, c.k_len, c.mask) for c in block.calls] == [(1, 16, 16, BlockMask.CAUSAL)]
