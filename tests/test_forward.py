"""ring_attention.forward: the forward executor, written or merged into accumulators
(adopted or not), against the dense reference."""

from __future__ import annotations

import pytest
import torch

import ring_attention as ra
from tests.inputs import check_against_reference, recording


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
