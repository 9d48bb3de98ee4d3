"""Packed documents ``cu_seqlens`` on the fast paths (SEMANTICS.md, "Packed documents"):
dilated, ring and ring-dilated attention with ``group=None``, one device or a simulated
ring, against the float64 reference with the same documents, forward and backward.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ring_attention as ra
from ring_attention import layout as _layout
from ring_attention import pattern as _pattern
from ring_attention.masks import SequenceMask
from ring_attention.plans import ring_plans
from tests.inputs import LAYOUTS, assert_matches, fwd_bwd, make_qkv, record_sent_bytes

TOL = dict(rtol=1e-10, atol=1e-10)
GRAD_TOL = dict(rtol=1e-9, atol=1e-9)


def _run(q, k, v, pattern, ring_size=None, **kwargs):
    if ring_size is None:
        return ra.dilated_attention(q, k, v, pattern or ra.DilatedPattern((q.shape[1],), (1,)), **kwargs)
    if pattern is None:
        return ra.ring_attention(q, k, v, ring_size=ring_size, **kwargs)
    return ra.ring_dilated_attention(q, k, v, pattern, ring_size=ring_size, **kwargs)


def _check(q, k, v, g, pattern, cu_seqlens, ring_size=None, **kwargs):
    """Output and gradients of the fast path against the reference, both with ``cu_seqlens``."""
    ref_kwargs = {key: val for key, val in kwargs.items() if key != "layout"}
    got = fwd_bwd(lambda q, k, v: _run(q, k, v, pattern, ring_size, cu_seqlens=cu_seqlens, **kwargs), q, k, v, g)
    want = fwd_bwd(lambda q, k, v: ra.reference_attention(q, k, v, pattern=pattern, cu_seqlens=cu_seqlens,
                                                          **ref_kwargs), q, k, v, g)
    assert_matches(got, want, grad_tol=GRAD_TOL, **TOL)
    return got[0]


def _fits(w: int, lengths: list[int]) -> bool:
    """Whether segment length ``w`` is valid for every document: ``min(w, L) | L``."""
    return all(length % min(w, length) == 0 for length in lengths)


@st.composite
def document_cases(draw):
    ring_size = draw(st.sampled_from([None, 1, 2, 4]))
    layout = draw(st.sampled_from([*LAYOUTS, "documents"]))
    parts = (ring_size or 1) * _layout.chunks_per_rank(layout)
    n = parts * draw(st.integers(1, max(1, 40 // parts)))
    # documents of any length from 1 up: some shorter than a shard, some spanning several
    cuts = draw(st.sets(st.integers(1, n - 1), max_size=6)) if n > 1 else set()
    cu = [0, *sorted(cuts), n]
    lengths = [b - a for a, b in zip(cu, cu[1:])]
    h, hkv = draw(st.sampled_from([(1, 1), (2, 1), (2, 2), (4, 2)]))
    pattern = None
    if draw(st.booleans()):
        fitting = [w for w in range(1, n + 3) if _fits(w, lengths)]
        pairs = draw(st.integers(1, 2))
        ws = [draw(st.sampled_from(fitting)) for _ in range(pairs)]
        rs = [draw(st.integers(1, min(w, 4))) for w in ws]
        mode = draw(st.sampled_from(["mixture", "head_groups"])) if h >= pairs else "mixture"
        pattern = ra.DilatedPattern(tuple(ws), tuple(rs), mode=mode)
    side = st.integers(-1, n)
    window = None if draw(st.booleans()) else (draw(side), draw(side))
    as_tensor = draw(st.booleans())
    return dict(
        ring_size=ring_size, layout=layout, n=n, h=h, hkv=hkv, pattern=pattern, causal=draw(st.booleans()),
        window=window, seed=draw(st.integers(0, 2**16)),
        cu_seqlens=torch.tensor(cu, dtype=torch.int32) if as_tensor else cu,
    )


@settings(max_examples=80, deadline=None)
@given(case=document_cases())
def test_documents_match_reference(case):
    q, k, v, g = make_qkv(case["seed"], 2, case["n"], case["h"], case["hkv"], 4)
    kwargs = dict(causal=case["causal"], window=case["window"])
    if case["ring_size"] is not None:
        kwargs["layout"] = case["layout"]
    _check(q, k, v, g, case["pattern"], case["cu_seqlens"], case["ring_size"], **kwargs)


@pytest.mark.parametrize("cu_seqlens", [[0, 5, 64, 100, 128], [0, 32, 64, 96, 128], [0, 1, 2, 127, 128]])
@pytest.mark.parametrize("ring_size, layout", [(None, "contiguous"), (2, "zigzag"), (4, "contiguous"),
                                              (4, "documents")])
@pytest.mark.parametrize("causal", [False, True])
def test_documents_on_blocks_the_cpu_op_runs(cu_seqlens, ring_size, layout, causal):
    """Documents of 16 keys and more run on the fused CPU op; the pattern restarts at each
    document, so a rate-2 segment in an odd document keeps other rows than in ``N``'s."""
    q, k, v, g = make_qkv(7, 2, 128, 4, 2, 8)
    kwargs = dict(causal=causal) if ring_size is None else dict(causal=causal, layout=layout)
    _check(q, k, v, g, None, cu_seqlens, ring_size, **kwargs)
    lengths = [b - a for a, b in zip(cu_seqlens, cu_seqlens[1:])]
    ws = [w for w in (16, 32, 64) if _fits(w, lengths)] or [128]
    pattern = ra.DilatedPattern(tuple(ws[:2]), (1, 2)[: len(ws[:2])])
    _check(q, k, v, g, pattern, cu_seqlens, ring_size, **kwargs)


def test_the_pattern_restarts_at_every_document():
    """The weights of a packed call are those of each document alone: rate 2 keeps positions
    0 and 2 of each document, so an odd start shifts the kept global positions."""
    pattern = ra.DilatedPattern((4,), (2,))
    w = _pattern.weights(pattern, 7, 1, documents=(0, 3, 7))
    kept = w[0].sum(0).nonzero().flatten().tolist()  # keys some query keeps
    assert kept == [0, 2, 3, 5]
    alone = _pattern.weights(pattern, 4, 1)
    assert torch.equal(w[0, 3:7, 3:7], alone[0])
    assert not w[0, :3, 3:].any() and not w[0, 3:, :3].any()


@pytest.mark.parametrize("ring_size, layout", [(None, "contiguous"), (2, "zigzag"), (4, "contiguous"), (4, "zigzag"),
                                              (2, "documents")])
@pytest.mark.parametrize("pattern", [None, ra.DilatedPattern((4, 8), (1, 2))])
def test_a_document_never_reaches_another(ring_size, layout, pattern):
    """Change every value of one document: the other documents' outputs and their inputs'
    gradients are bitwise the same (a masked cell contributes an exact 0, not a rounding)."""
    cu = [0, 8, 24, 32]
    q, k, v, g = make_qkv(4, 1, 32, 2, 2, 4)
    kwargs = dict(causal=True) if ring_size is None else dict(causal=True, layout=layout)

    def outputs(q, k, v):
        ins = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = _run(*ins, pattern, ring_size, cu_seqlens=cu, **kwargs)
        return out, torch.autograd.grad(out, ins, g)

    out, grads = outputs(q, k, v)
    changed = [t.detach().clone() for t in (q, k, v)]
    for t in changed:
        t[:, 8:24] = torch.randn_like(t[:, 8:24]) * 3
    out2, grads2 = outputs(*changed)
    others = torch.tensor([True] * 8 + [False] * 16 + [True] * 8)
    assert not torch.equal(out[:, ~others], out2[:, ~others])
    assert torch.equal(out[:, others], out2[:, others])
    for a, b in zip(grads, grads2):
        assert torch.equal(a[:, others], b[:, others])


def test_documents_sharded_with_the_ring_send_nothing(monkeypatch):
    """One document per rank (contiguous): no rank needs another's keys, so a ring of 4
    sends no byte, forward or backward; documents across shards send some."""
    q, k, v, g = make_qkv(0, 1, 64, 2, 2, 8, dtype=torch.float32)

    def sent_bytes(cu):
        sent = record_sent_bytes(monkeypatch)
        out = ra.ring_attention(q, k, v, ring_size=4, causal=True, cu_seqlens=cu)
        ref = ra.reference_attention(*(t.double() for t in (q, k, v)), causal=True, cu_seqlens=cu)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
        out.backward(g)
        monkeypatch.undo()
        return sent[0]

    assert sent_bytes([0, 16, 32, 48, 64]) == 0
    assert sent_bytes([0, 8, 16, 32, 40, 48, 64]) == 0
    across = sent_bytes([0, 24, 64])
    assert 0 < across < sent_bytes(None)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("cu, window", [((0, 3, 16, 17, 32), None), ((0, 10, 32), (2, 3)), ((0, 16, 32), (-1, 0))])
@pytest.mark.parametrize("causal", [False, True])
def test_a_ring_plan_computes_exactly_the_cells_of_the_documents(layout, cu, window, causal):
    """Every (query, key, head) cell the documents keep is computed once, none across two
    documents (so a block of two documents is neither computed nor sent)."""
    n, h, r = 32, 2, 4
    pattern = ra.DilatedPattern((1, 32), (1, 2))  # w=32 covers each document whole
    mask = SequenceMask(causal=causal, window=window, documents=cu)
    plans = ring_plans(pattern, n, h, h, mask, r, layout, range(r))
    cells = sum(plan.attended_pairs() for plan in plans)
    w = _pattern.weights(pattern, n, h, is_causal=causal, window=window, documents=cu)
    assert cells == int(w.sum())


def test_one_document_is_the_plain_call():
    q, k, v, _ = make_qkv(0, 1, 16, 2, 2, 4, requires_grad=False)
    plain = ra.ring_attention(q, k, v, ring_size=2, causal=True)
    for cu in ([0, 16], torch.tensor([0, 16], dtype=torch.int32), None):
        assert torch.equal(ra.ring_attention(q, k, v, ring_size=2, causal=True, cu_seqlens=cu), plain)


@pytest.mark.parametrize("cu_seqlens, error, match", [
    ([0, 8, 4, 16], ValueError, "cu_seqlens.*increasing"),
    ([0, 8, 8, 16], ValueError, "cu_seqlens.*increasing"),
    ([1, 8, 16], ValueError, "cu_seqlens.*from 0"),
    ([0, 8, 15], ValueError, "cu_seqlens.*N=16"),
    ([0, 8, 20], ValueError, "cu_seqlens.*N=16"),
    ([16], ValueError, "cu_seqlens"),
    (torch.tensor([0.0, 8.0, 16.0]), TypeError, "cu_seqlens.*integer"),
    (torch.tensor([[0, 8, 16]]), TypeError, "cu_seqlens.*1-d"),
    ([0, 8.5, 16], TypeError, "cu_seqlens"),
    ("0,8,16", TypeError, "cu_seqlens"),
    (8, TypeError, "cu_seqlens"),
])
def test_bad_documents_raise_naming_cu_seqlens(cu_seqlens, error, match):
    q, k, v, _ = make_qkv(0, 1, 16, 2, 2, 4)
    for call in (
        lambda: ra.dilated_attention(q, k, v, ra.DilatedPattern((16,), (1,)), cu_seqlens=cu_seqlens),
        lambda: ra.ring_attention(q, k, v, ring_size=2, cu_seqlens=cu_seqlens),
        lambda: ra.ring_dilated_attention(q, k, v, ra.DilatedPattern((4,), (2,)), ring_size=2, cu_seqlens=cu_seqlens),
        lambda: ra.reference_attention(q, k, v, cu_seqlens=cu_seqlens),
    ):
        with pytest.raises(error, match=match):
            call()


def test_a_segment_that_does_not_divide_a_document_names_it():
    """``min(w, L_d)`` must divide every document's length ``L_d`` (not ``N``): the error
    names the document."""
    q, k, v, _ = make_qkv(0, 1, 16, 2, 2, 4)
    pattern = ra.DilatedPattern((4,), (1,))
    for call in (
        lambda: ra.dilated_attention(q, k, v, pattern, cu_seqlens=[0, 6, 16]),
        lambda: ra.ring_dilated_attention(q, k, v, pattern, ring_size=2, cu_seqlens=[0, 6, 16]),
        lambda: ra.reference_attention(q, k, v, pattern=pattern, cu_seqlens=[0, 6, 16]),
    ):
        with pytest.raises(ValueError, match=r"document 0 .*length 6"):
            call()
    # N % w need not hold when every document fits: w=5 on documents of 5, 10 and 1
    q, k, v, g = make_qkv(0, 1, 16, 2, 2, 4)
    _check(q, k, v, g, ra.DilatedPattern((5,), (2,)), [0, 5, 15, 16], 2, layout="zigzag")


@pytest.mark.parametrize("layout, pattern", [("zigzag", None), ("documents", ra.DilatedPattern((8, 16), (1, 2)))])
def test_a_new_packing_runs_the_compiled_graph_again(layout, pattern):
    """torch.compile without a group: ``cu_seqlens`` reaches the custom ops as a tensor, so
    new boundaries (as many documents) compile nothing new; each is the reference's,
    forward and backward, and boundaries the pattern cannot cut raise where the op runs."""
    from torch._dynamo.testing import CompileCounter

    q, k, v, g = make_qkv(2, 1, 64, 4, 2, 4)
    counter = CompileCounter()
    compiled = torch.compile(
        lambda q, k, v, cu: _run(q, k, v, pattern, 2, layout=layout, causal=True, cu_seqlens=cu),
        backend=counter, fullgraph=True,
    )
    for cu in ([0, 16, 48, 64], [0, 32, 48, 64], [0, 8, 16, 64]):
        out = compiled(q, k, v, torch.tensor(cu, dtype=torch.int32))
        ref = ra.reference_attention(q, k, v, pattern=pattern, causal=True, cu_seqlens=cu)
        torch.testing.assert_close(out, ref, **TOL)
        for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
            torch.testing.assert_close(a, b, **GRAD_TOL)
    assert counter.frame_count == 1
    with pytest.raises(ValueError, match="cu_seqlens" if pattern is None else "document 2"):
        compiled(q, k, v, torch.tensor([0, 5, 3, 64] if pattern is None else [0, 5, 6, 64], dtype=torch.int32))
    # What tracing checks (dtype and shape): with fullgraph Dynamo reports it as Unsupported,
    # the message naming cu_seqlens.
    with pytest.raises(Exception, match="cu_seqlens must be a 1-d integer tensor"):
        compiled(q, k, v, torch.tensor([0.0, 16.0, 64.0]))


def test_documents_as_a_list_compile_too():
    """A list is a constant of the graph (a recompile per packing, as for any Python value)."""
    q, k, v, _ = make_qkv(0, 1, 8, 2, 2, 4, requires_grad=False)
    compiled = torch.compile(lambda q, k, v: ra.ring_attention(q, k, v, ring_size=2, cu_seqlens=[0, 3, 8]),
                             backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), ra.reference_attention(q, k, v, cu_seqlens=[0, 3, 8]), **TOL)


@pytest.mark.parametrize("ring_size, layout", [(None, "contiguous"), (2, "zigzag"), (4, "contiguous")])
def test_non_finite_inputs_stay_in_their_document(ring_size, layout):
    """A NaN value and an inf key poison exactly the rows the reference says: never a row
    of another document (no 0 * NaN across a document boundary)."""
    q, k, v, _ = make_qkv(11, 1, 64, 2, 2, 8, requires_grad=False)
    v[0, 40, 0, 1] = float("nan")
    k[0, 20, 1, 0] = float("inf")
    cu = [0, 16, 30, 64]
    kwargs = {} if ring_size is None else dict(layout=layout)
    out = _run(q, k, v, None, ring_size, cu_seqlens=cu, causal=True, **kwargs)
    ref = ra.reference_attention(q, k, v, causal=True, cu_seqlens=cu)
    assert ref.isnan().any() and not ref[0, :16].isnan().any()
    torch.testing.assert_close(out, ref, **TOL, equal_nan=True)


@pytest.mark.parametrize("ring_size", [None, 2])
def test_short_documents_quarantine_their_own_values(ring_size):
    """Documents short next to the shard: each causal call zeroes its own non-finite values
    and adds their poison (schedule.splits_values is False), instead of holding two copies
    of the whole shard's values. NaN values reach exactly the rows the reference says."""
    from ring_attention import executable

    q, k, v, _ = make_qkv(5, 1, 256, 2, 2, 8, requires_grad=False)
    v[0, 70, 1, 3] = float("nan")
    v[0, 200, 0, 5] = float("nan")
    lengths = [*range(10, 24), 25]  # distinct: no two documents batch into one call
    cu = [sum(lengths[:i]) for i in range(len(lengths) + 1)]
    executable.clear()
    out = _run(q, k, v, None, ring_size, cu_seqlens=cu, causal=True)
    ref = ra.reference_attention(q, k, v, causal=True, cu_seqlens=cu)
    assert ref.isnan().any() and ref[0, :70].isfinite().all()
    torch.testing.assert_close(out, ref, **TOL, equal_nan=True)
    ranks = [rank for plan in executable._CACHE.values() for rank in plan.ranks.values()]
    assert ranks and not any(rank.splits_values for rank in ranks)
