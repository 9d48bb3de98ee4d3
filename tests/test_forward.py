"""ring_attention.forward: the forward executor, written or merged into accumulators
(adopted or not), against the dense reference."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import ring_attention as ra
from ring_attention import layout as _layout
from ring_attention import ops
from ring_attention import pattern as P
from ring_attention.options import DEFAULT, Options
from tests.inputs import F64, check_against_reference, qkv, recording


@pytest.mark.parametrize("layout", ["rows-major", "heads-major"])
@pytest.mark.parametrize("batch", [1, 2])
def test_a_first_call_of_several_runs_becomes_the_accumulators_where_its_layout_allows(monkeypatch, layout, batch):
    """A mixture's rate-1 pair computes every row and head in one call of several runs (its
    segments are shorter than N). Its results and gradients are the accumulators when
    the kernel lays the runs out back to back, rows-major (``[B, L, H, D]``, as the CPU
    and CUDA kernels do); heads-major (the CPU op's meta kernel) they are copied into
    fresh accumulators. The result is the reference's either way."""
    from ring_attention import kernels

    if layout == "heads-major":
        for name in ("attention_forward", "attention_backward"):
            fn = getattr(kernels, name)
            monkeypatch.setattr(kernels, name, lambda *a, fn=fn, **kw: tuple(t.contiguous() for t in fn(*a, **kw)))
    forward, backward = recording(monkeypatch, "attention_forward"), recording(monkeypatch, "attention_backward")
    # pair 0: 4 runs of 16 rows over all 4 heads (16 keys or more: the CPU op, not math)
    pattern = ra.DilatedPattern((16, 64), (1, 2))
    torch.manual_seed(3)
    q, k, v = (torch.randn(batch, 64, 4, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    g = torch.randn(batch, 64, 4, 8, dtype=torch.float64)
    check_against_reference(q, k, v, (q, k, v), pattern, False, g)

    out = ra.dilated_attention(q, k, v, pattern)
    grads = torch.autograd.grad((out * g).sum(), (q, k, v))
    adopted = layout == "rows-major"
    assert (out.untyped_storage().data_ptr() in forward) == adopted
    assert all((t.untyped_storage().data_ptr() in backward) == adopted for t in grads)


def _reference_lse(q, k, pattern, causal, scale):
    """``[B, H, N]``: log sum_j W[h, i, j] exp(s_ij) from SEMANTICS.md's weights; -inf without keys."""
    h, hkv = q.shape[2], k.shape[2]
    w = P.weights(pattern, q.shape[1], h, is_causal=causal).double()  # [H, N, N]
    s = torch.einsum("bihd,bjhd->bhij", q, k.repeat_interleave(h // hkv, dim=2)) * scale
    return torch.logsumexp(s + w.log(), dim=-1)


FORWARD_CASES = [  # (pattern, H, Hkv, causal, ring size, layout, options)
    (ra.DilatedPattern((16, 64), (1, 2)), 4, 4, False, 1, "contiguous", DEFAULT),  # first call adopted
    (ra.DilatedPattern((16, 64), (1, 2)), 4, 2, True, 1, "contiguous", Options(max_call_share=8, min_split_bytes=0)),
    (ra.DilatedPattern((32, 16), (2, 4)), 4, 2, False, 1, "contiguous", DEFAULT),  # cells without keys
    (ra.DilatedPattern((16, 64), (2, 3), "head_groups"), 4, 1, True, 2, "zigzag", DEFAULT),  # merges, scattered rows
    (None, 2, 2, True, 1, "contiguous", DEFAULT),  # one call, adopted
    (None, 2, 1, False, 4, "contiguous", DEFAULT),  # a relay: merges into the local call's results
]


@pytest.mark.parametrize("pattern, h, hkv, causal, ring_size, layout, options", FORWARD_CASES)
def test_out_and_lse_of_every_rank_are_the_references(pattern, h, hkv, causal, ring_size, layout, options):
    """Through the custom op, which returns every rank's LSE: rows without keys are exactly
    0 with LSE -inf, the other rows the reference's output and log-sum-exp."""
    q, k, v = qkv(2, 64, h, hkv, 8, seed=4)
    ws, rs, mode = ([], [], "mixture") if pattern is None else (
        list(pattern.segment_lengths), list(pattern.dilation_rates), pattern.mode.value)
    out, lse = ops._forward(q, k, v, ws, rs, mode, causal, ring_size, layout, 0.3, list(dataclasses.astuple(options)), [], None)
    torch.testing.assert_close(out, ra.reference_attention(q, k, v, pattern=pattern, causal=causal, scale=0.3), **F64)
    want = _reference_lse(q, k, pattern, causal, 0.3)
    got = _layout.unshard(list(lse.transpose(2, 3).unbind(0)), layout).transpose(1, 2)  # [B, H, N]
    torch.testing.assert_close(got, want, **F64)
    empty = want == float("-inf")
    assert bool((out.transpose(1, 2)[empty] == 0).all())
