"""The block kernel: forward (out, lse) and backward-with-global-stats vs plain math."""

import pytest
import torch

from ring_attention import kernels
from ring_attention.masks import band_keeps
from tests.fake_cuda import flash_keeps
from tests.inputs import randn as _rand

TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
}


def _plain(q, k, v, mask, scale):
    """Plain float64 softmax attention of ``[B, H, L, D]`` tensors with a boolean mask."""
    s = torch.einsum("bhid,bhjd->bhij", q.double(), k.double()) * scale
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    return torch.einsum("bhij,bhjd->bhid", torch.exp(s - lse[..., None]), v.double()), lse


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "causal, lq, lk", [(False, 7, 7), (False, 5, 11), (False, 12, 3), (True, 7, 7), (True, 16, 16), (True, 5, 11),
                       (True, 1, 20)]
)
def test_attention_forward_matches_plain_math(dtype, causal, lq, lk):
    # a causal block aligns bottom-right: a square diagonal block, or a row chunk of one
    b, h, d, scale = 2, 3, 8, 0.3
    q, k, v = (_rand((b, h, n, d), dtype, s) for s, n in ((0, lq), (1, lk), (2, lk)))
    mask = torch.ones(lq, lk, dtype=torch.bool)
    if causal:
        mask = mask.tril(lk - lq)
    out, lse = kernels.attention_forward(q, k, v, causal=causal, scale=scale)
    assert out.dtype == dtype and out.shape == (b, h, lq, d)
    assert lse.dtype == torch.promote_types(dtype, torch.float32) and lse.shape == (b, h, lq)
    exp_out, exp_lse = _plain(q, k, v, mask, scale)
    torch.testing.assert_close(out.double(), exp_out, **TOL[dtype])
    lse_tol = TOL[dtype] if dtype in (torch.float64, torch.float32) else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse.double(), exp_lse, **lse_tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_math_fallback_matches_plain_math(dtype):
    # the CUDA float32 fallback, exercised directly on CPU
    q, k, v = (_rand((1, 2, 6, 4), dtype, s) for s in range(3))
    for causal in (False, True):
        mask = torch.ones(6, 6, dtype=torch.bool)
        if causal:
            mask = mask.tril()
        out, lse = kernels._math_forward(q, k, v, causal=causal, scale=0.7)
        exp_out, exp_lse = _plain(q, k, v, mask, 0.7)
        torch.testing.assert_close(out.double(), exp_out, **TOL[dtype])
        torch.testing.assert_close(lse.double(), exp_lse, **TOL[dtype])
        dout = _rand(q.shape, dtype, 9)
        grads = kernels._math_backward(dout, q, k, v, out, lse, causal=causal, scale=0.7)
        qq, kk, vv = (t.detach().double().requires_grad_() for t in (q, k, v))
        expected = torch.autograd.grad((_plain(qq, kk, vv, mask, 0.7)[0] * dout.double()).sum(), (qq, kk, vv))
        for a, e in zip(grads, expected):
            torch.testing.assert_close(a.double(), e, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_kernel", ["cpu", "math"])
def test_attention_backward_with_global_stats_is_share_of_global_gradient(dtype, use_kernel):
    """Keys split into a past block (full) and a diagonal block (causal).

    Each block's backward, given the rows' *global* out/lse, returns that block's share;
    dQ summed over blocks and dK/dV per block equal autograd of the plain global math.
    """
    b, h, lq, lpast, d, scale = 2, 2, 6, 5, 8, 0.4
    q = _rand((b, h, lq, d), dtype, 0)
    k_past, v_past = _rand((b, h, lpast, d), dtype, 1), _rand((b, h, lpast, d), dtype, 2)
    k_diag, v_diag = _rand((b, h, lq, d), dtype, 3), _rand((b, h, lq, d), dtype, 4)
    dout = _rand((b, h, lq, d), dtype, 5)

    # global plain math (float64, autograd)
    leaves = [t.detach().double().requires_grad_() for t in (q, k_past, v_past, k_diag, v_diag)]
    qq, kp, vp, kd, vd = leaves
    mask = torch.cat([torch.ones(lq, lpast, dtype=torch.bool), torch.ones(lq, lq, dtype=torch.bool).tril()], 1)
    out64, lse64 = _plain(qq, torch.cat([kp, kd], 2), torch.cat([vp, vd], 2), mask, scale)
    expected = torch.autograd.grad((out64 * dout.double()).sum(), leaves)

    backward = kernels.attention_backward if use_kernel == "cpu" else kernels._math_backward
    acc = torch.promote_types(dtype, torch.float32)
    out = out64.detach().to(dtype)
    lse = lse64.detach().to(acc)
    dq1, dk1, dv1 = backward(dout, q, k_past, v_past, out, lse, causal=False, scale=scale)
    dq2, dk2, dv2 = backward(dout, q, k_diag, v_diag, out, lse, causal=True, scale=scale)
    got = [dq1.double() + dq2.double(), dk1, dv1, dk2, dv2]
    tol = TOL[dtype] if dtype != torch.bfloat16 else dict(rtol=5e-2, atol=5e-2)
    for a, e in zip(got, expected):
        assert a.shape == e.shape
        torch.testing.assert_close(a.double(), e, **tol)


def test_attention_backward_with_own_stats_differs_from_global():
    # guards the test above: a block's own lse gives a different (wrong) share
    q, k1, v1, k2, v2 = (_rand((1, 1, 4, 4), torch.float64, s) for s in range(5))
    dout = _rand((1, 1, 4, 4), torch.float64, 9)
    own_out, own_lse = kernels.attention_forward(q, k1, v1, causal=False, scale=0.5)
    mask = torch.ones(4, 8, dtype=torch.bool)
    g_out, g_lse = _plain(q, torch.cat([k1, k2], 2), torch.cat([v1, v2], 2), mask, 0.5)
    a = kernels.attention_backward(dout, q, k1, v1, own_out, own_lse, causal=False, scale=0.5)
    b = kernels.attention_backward(dout, q, k1, v1, g_out, g_lse, causal=False, scale=0.5)
    assert not torch.allclose(a[2], b[2])


@pytest.mark.parametrize("which", [0, 1, 2])
def test_attention_forward_non_unit_stride_head_dim(which):
    t = [_rand((1, 2, 6, 4), torch.float64, s) for s in range(3)]
    buf = torch.zeros(1, 2, 6, 4, 2, dtype=torch.float64)
    strided = buf[..., 0]
    strided.copy_(t[which])
    args = list(t)
    args[which] = strided
    out, lse = kernels.attention_forward(*args, causal=False, scale=0.5)
    exp_out, exp_lse = _plain(*t, torch.ones(6, 6, dtype=torch.bool), 0.5)
    torch.testing.assert_close(out, exp_out)
    torch.testing.assert_close(lse, exp_lse)


# --- inputs every kernel must accept ------------------------------------------------------


@pytest.mark.parametrize("scale", [0.0, -0.7, 1e-300])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("which", ["cpu", "math"])
def test_any_finite_scale_matches_plain_math(scale, causal, which):
    # the fused ops scale the masked -inf scores too: a scale <= 0 (or one that is 0 in
    # float32) turned causal rows into NaN before the scale was folded into q
    q, k, v = (_rand((1, 2, 20, 8), torch.float64, s) for s in range(3))
    dout = _rand(q.shape, torch.float64, 7)
    mask = torch.ones(20, 20, dtype=torch.bool)
    if causal:
        mask = mask.tril()
    exp_out, exp_lse = _plain(q, k, v, mask, scale)
    if which == "cpu":
        out, lse = kernels.attention_forward(q, k, v, causal=causal, scale=scale)
        grads = kernels.attention_backward(dout, q, k, v, out, lse, causal=causal, scale=scale)
    else:
        fq, fscale, factor = kernels.fold_scale(q, scale)
        out, lse = kernels._math_forward(fq, k, v, causal=causal, scale=fscale)
        dq, dk, dv = kernels._math_backward(dout, fq, k, v, out, lse, causal=causal, scale=fscale)
        grads = (dq * factor, dk, dv)
    torch.testing.assert_close(out, exp_out)
    torch.testing.assert_close(lse, exp_lse)
    qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
    expected = torch.autograd.grad((_plain(qq, kk, vv, mask, scale)[0] * dout).sum(), (qq, kk, vv))
    for got, exp in zip(grads, expected):
        torch.testing.assert_close(got, exp)


def test_a_causal_block_needs_as_many_keys_as_queries():
    q = _rand((1, 1, 6, 8), torch.float32, 0)
    k = _rand((1, 1, 4, 8), torch.float32, 1)
    with pytest.raises(ValueError, match="at least as many keys as queries"):
        kernels.attention_forward(q, k, k, causal=True, scale=1.0)
    with pytest.raises(ValueError, match="at least as many keys as queries"):
        kernels.attention_backward(q, q, k, k, q, q[..., 0], causal=True, scale=1.0)


@pytest.mark.parametrize("backend", ["cpu", "math", "flash"])
def test_a_causal_row_chunk_is_the_blocks_rows(monkeypatch, backend):
    """Rows [a, b) of a square causal block against keys [0, b) (the forward's row chunks,
    schedule.causal_chunks) give the block's own rows: output, LSE, and the gradients of
    those rows' share, on each backend (flash emulated by its own mask, on CPU)."""
    from ring_attention import fused_cuda

    if backend != "cpu":
        monkeypatch.setattr(kernels, "backend", lambda *args, **kwargs: backend)
    monkeypatch.setattr(fused_cuda, "forward", _flash_on_cpu)
    monkeypatch.setattr(fused_cuda, "backward", _flash_backward_on_cpu)
    q, k, v, dout = (_rand((2, 3, 24, 16), torch.float64, s) for s in range(4))
    whole_out, whole_lse = _plain(q, k, v, torch.ones(24, 24, dtype=torch.bool).tril(), 0.3)
    a, b = 9, 17
    out, lse = kernels.attention_forward(q[:, :, a:b], k[:, :, :b], v[:, :, :b], causal=True, scale=0.3)
    torch.testing.assert_close(out, whole_out[:, :, a:b], **TOL[torch.float64])
    torch.testing.assert_close(lse, whole_lse[:, :, a:b], **TOL[torch.float64])
    qs, ks, vs = (x.clone().requires_grad_() for x in (q, k, v))
    rows = _plain(qs, ks, vs, torch.ones(24, 24, dtype=torch.bool).tril(), 0.3)[0][:, :, a:b]
    ref = torch.autograd.grad(rows, (qs, ks, vs), dout[:, :, a:b])
    grads = kernels.attention_backward(dout[:, :, a:b], q[:, :, a:b], k[:, :, :b], v[:, :, :b], out, lse,
                                       causal=True, scale=0.3)
    torch.testing.assert_close(grads[0], ref[0][:, :, a:b], **TOL[torch.float64])
    for g, r in zip(grads[1:], ref[1:]):
        torch.testing.assert_close(g, r[:, :, :b], **TOL[torch.float64])


def test_a_causal_row_chunks_values_poison_only_the_rows_that_attend_them():
    """A NaN and an inf among a row chunk's keys show in exactly the rows that attend them,
    an inf as inf (the reference's IEEE sum), as in the square block's rows."""
    import ring_attention as ra

    q, k, v = (_rand((1, 24, 1, 8), torch.float64, s) for s in range(3))
    v[0, 3, 0, 1], v[0, 12, 0, 2] = float("inf"), float("nan")
    ref = ra.reference_attention(q, k, v, causal=True)
    a, b = 9, 17
    out, _ = kernels.attention_forward(*(x.transpose(1, 2) for x in (q[:, a:b], k[:, :b], v[:, :b])),
                                       causal=True, scale=8 ** -0.5)
    torch.testing.assert_close(out.transpose(1, 2), ref[:, a:b], equal_nan=True)
    assert out[0, 0, :, 1].isposinf().all() and out[0, 0, :3, 2].isfinite().all() and out[0, 0, 3:, 2].isnan().all()


@pytest.mark.parametrize("causal", [False, True])
def test_math_backend_bounds_its_score_block(monkeypatch, causal):
    # a score budget of 3 rows x 16 keys x B*H: chunks of 3 query rows, same result
    q, k, v = (_rand((1, 2, 16, 8), torch.float64, s) for s in range(3))
    dout = _rand(q.shape, torch.float64, 5)
    whole_out, whole_lse = kernels._math_forward(q, k, v, causal=causal, scale=0.4)
    whole = kernels._math_backward(dout, q, k, v, whole_out, whole_lse, causal=causal, scale=0.4)
    monkeypatch.setattr(kernels, "MATH_SCORE_BYTES", 3 * 16 * 2 * 4)
    assert [length for _, length in kernels._row_chunks(q, k)] == [3, 3, 3, 3, 3, 1]
    widest = []
    real_matmul = torch.matmul

    def spy(a, b):
        res = real_matmul(a, b)
        widest.append(res.shape[-2] * res.shape[-1] if res.shape[-1] == 16 else 0)
        return res

    monkeypatch.setattr(torch, "matmul", spy)
    out, lse = kernels._math_forward(q, k, v, causal=causal, scale=0.4)
    grads = kernels._math_backward(dout, q, k, v, out, lse, causal=causal, scale=0.4)
    monkeypatch.undo()
    assert max(widest) == 3 * 16  # no L x L block
    torch.testing.assert_close(out, whole_out)
    torch.testing.assert_close(lse, whole_lse)
    for a, b in zip(grads, whole):
        torch.testing.assert_close(a, b)


def _op_names(fn) -> set[str]:
    from torch.utils._python_dispatch import TorchDispatchMode

    names = set()

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            names.add(func.__name__)
            return func(*args, **(kwargs or {}))

    with Record():
        fn()
    return names


def test_a_causal_block_of_finite_values_skips_the_quarantine():
    q, k, v = (_rand((1, 2, 32, 8), torch.float32, s) for s in range(3))
    ops = _op_names(lambda: kernels.attention_forward(q, k, v, causal=True, scale=0.3))
    assert "cumsum_.default" not in ops and "nan_to_num.default" not in ops
    v[0, 1, 20, 3] = float("nan")  # then it runs, and the NaN reaches rows 20 on only
    ops = _op_names(lambda: kernels.attention_forward(q, k, v, causal=True, scale=0.3))
    assert "cumsum_.default" in ops
    out, _ = kernels.attention_forward(q, k, v, causal=True, scale=0.3)
    assert out[0, 1, :20].isfinite().all() and out[0, 1, 20:, 3].isnan().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_cpu_backward_reads_a_strided_lse_as_it_is(dtype):
    # kernels passes the CPU op a strided LSE uncopied: it must read it through its strides
    q, k, v, dout = (_rand((2, 3, 40, 8), dtype, s) for s in range(4))
    out, lse = kernels.attention_forward(q, k, v, causal=False, scale=0.3)
    spaced = torch.full((2, 3, 80), float("nan"))
    spaced[..., ::2] = lse  # every other entry: a view no contiguous layout has
    rows_major = lse.transpose(1, 2).contiguous().transpose(1, 2)
    expected = kernels.attention_backward(dout, q, k, v, out, lse.contiguous(), causal=False, scale=0.3)
    for strided in (spaced[..., ::2], rows_major):
        got = kernels.attention_backward(dout, q, k, v, out, strided, causal=False, scale=0.3)
        for a, b in zip(got, expected):
            assert torch.equal(a, b)


def test_a_short_block_runs_on_the_cpu_op_only_when_its_keys_are_seen_finite():
    """Fewer than CPU_FEW_KEYS keys: the CPU op gives a finite 0 for a row whose every score is
    NaN, so such a block runs on math unless its keys are finite (a NaN query row is marked
    afterwards on every backend): many short documents then stay on the fused op."""
    q, k, v = (_rand((1, 2, 8, 8), torch.float32, s) for s in range(3))
    assert kernels.backend(q, 8, k) == "cpu"
    assert kernels.backend(q, 8) == "math"  # keys not given: not seen
    q[0, 1, 2, 5] = float("nan")
    out, _ = kernels.attention_forward(q, k, v, causal=True, scale=0.3)
    assert out[0, 1, 2].isnan().all() and out[0, 0].isfinite().all() and out[0, 1, 3:].isfinite().all()
    k[0, 0, 3, 1] = float("nan")
    assert kernels.backend(q, 8, k) == "math"
    out, _ = kernels.attention_forward(q, k, v, causal=True, scale=0.3)
    assert out[0, 0, :3].isfinite().all() and out[0, 0, 3:].isnan().all()



def test_a_short_block_whose_finite_scores_can_overflow_runs_on_math():
    """Finite q and k can still score ``inf - inf``: a row whose every score is NaN shows as NaN,
    as the reference gives it, not as the CPU op's finite 0."""
    import ring_attention as ra

    q, k, v = (_rand((1, 32, 1, 8), torch.float32, s) for s in range(3))
    q[0, 1, 0, :] = 2e19
    k[0, :2, 0, :] = torch.tensor([2e19, -2e19] * 4)
    assert kernels.backend(q.transpose(1, 2)[:, :, :2], 2, k.transpose(1, 2)[:, :, :2], 0.3) == "math"
    documents = (0, 2, 32)  # a document of two keys: a block of two
    out = ra.ring_attention(q, k, v, causal=True, cu_seqlens=documents)
    ref = ra.reference_attention(q, k, v, causal=True, cu_seqlens=documents)
    assert ref[0, 1].isnan().all()
    torch.testing.assert_close(out, ref, equal_nan=True, rtol=1e-5, atol=1e-5)


def _flash_on_cpu(kind, q, k, v, causal, scale, window=None):
    """flash with ``window`` emulated on CPU: its own mask (:func:`tests.fake_cuda.flash_keeps`),
    float64 softmax, and what it returns for a row without keys (out 0, LSE +inf)."""
    assert kind == "flash" and not causal and window is not None
    keep = flash_keeps(q.shape[-2], k.shape[-2], *window)
    s = (q.double() @ k.double().transpose(-1, -2) * scale).masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    out = torch.exp(s - lse.masked_fill(lse.isneginf(), 0).unsqueeze(-1)) @ v.double()
    return out.to(q.dtype), lse.masked_fill(lse.isneginf(), float("inf"))  # float64 here: flash never sees it


def _flash_backward_on_cpu(kind, dout, q, k, v, out, lse, causal, scale, window=None):
    """flash's backward emulated: its own mask, the rows' final ``out`` and ``lse`` (this
    block's share of the gradient, with the softmax's ``rowsum(dout * out)`` term)."""
    q, k, v, dout, out = (x.double() for x in (q, k, v, dout, out))
    keep = flash_keeps(q.shape[-2], k.shape[-2], *window)
    s = (q @ k.transpose(-1, -2) * scale).masked_fill(~keep, float("-inf"))
    p = torch.exp(s - lse.double().unsqueeze(-1))
    ds = p * (dout @ v.transpose(-1, -2) - (dout * out).sum(-1, keepdim=True)) * scale
    return tuple(g.to(dout.dtype) for g in (ds @ k, ds.transpose(-1, -2) @ q, p.transpose(-1, -2) @ dout))


@pytest.mark.parametrize("lq, lk, band", [
    (48, 112, (0, 64)), (40, 24, (-30, -8)), (64, 64, (1, 10**9)), (64, 100, (-10, 26)), (30, 30, (-40, -29)),
])
def test_a_band_on_flash_is_the_bands_attention(monkeypatch, lq, lk, band):
    """kernels' flash path for a band (rows and keys without pairs cut, results placed back,
    rows without keys out 0 / LSE -inf, no gradient outside the cut) with flash emulated by
    its own mask, against float64 attention with the band: exact wiring, on CPU."""
    from ring_attention import fused_cuda

    monkeypatch.setattr(kernels, "backend", lambda *args, **kwargs: "flash")
    monkeypatch.setattr(fused_cuda, "forward", _flash_on_cpu)
    monkeypatch.setattr(fused_cuda, "backward", _flash_backward_on_cpu)
    q, k, v = _rand((2, 3, lq, 16), torch.float64, 0), _rand((2, 3, lk, 16), torch.float64, 1), \
        _rand((2, 3, lk, 16), torch.float64, 2)
    dout = _rand((2, 3, lq, 16), torch.float64, 3)
    out, lse = kernels.attention_forward(q, k, v, causal=False, scale=0.3, band=band)
    grads = kernels.attention_backward(dout, q, k, v, out, lse, causal=False, scale=0.3, band=band)
    keep = band_keeps(lq, lk, band, torch.device("cpu"))
    ref, ref_lse = _plain(q, k, v, keep, 0.3)
    empty = ~keep.any(-1)
    ref = ref.masked_fill(empty.unsqueeze(-1), 0.0)
    torch.testing.assert_close(out, ref, **TOL[torch.float64])
    torch.testing.assert_close(lse, ref_lse, **TOL[torch.float64])  # -inf where no key
    qs, ks, vs = (x.clone().requires_grad_() for x in (q, k, v))
    rows = ~empty  # rows without keys: no gradient
    ref_rows = _plain(qs[:, :, rows], ks, vs, keep[rows], 0.3)[0]
    ref_grads = list(torch.autograd.grad(ref_rows, (qs, ks, vs), dout[:, :, rows]))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, **TOL[torch.float64])
