"""The CUDA path, checked on a CPU-only build: fake CUDA tensors and a fused-kernel checker.

Every test runs code under :func:`tests.fake_cuda.fake_cuda`: tensors are fake CUDA
tensors (shapes, strides, dtypes, no values), every fused attention call is checked
against what the real kernel checks, host synchronization is flagged, and the backward
path runs through ``PackedAttention.backward`` directly (see ``tests/fake_cuda.py``).

Sections:

1. the harness itself: rerouted indexing matches torch's, launch counting, the backward
   driver, and each checker rule fires on a hand-made bad call and stays quiet on good ones;
2. ``kernels.attention_forward``/``attention_backward`` over head dims x dtypes x lengths,
   offset and fused-qkv views, a batch above the grid limit, scales <= 0 with causal;
3. the public functions and modules, forward and backward, over the same matrix for two
   representative functions and at two (D, dtype) points for the others, plus offset and
   fused-qkv views, odd lengths and grouped-query heads;
4. every registry variant at two (D, dtype) points, at an odd length where its pattern
   allows, and LongNet at N = 128K and at a batch whose runs overflow the launch grid.

Nothing here is xfail: a failure names the op, the rule and the library line that broke it.
"""

from __future__ import annotations

import functools
import gc
import warnings
from unittest import mock

import pytest
import torch

import ring_attention as ra
from ring_attention import executable, kernels, nonfinite, registry, schedule
from tests.fake_cuda import CAPABILITIES, MAX_GRID_YZ, FakeCuda, fake_cuda

aten = torch.ops.aten

HEAD_DIMS = (36, 64, 80, 96, 128, 256)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEADS, KV_HEADS = 8, 2  # grouped-query attention everywhere
N = 96  # 3 * 32: divisible by every simulated ring's parts and the (N/4, N/2) segments
ODD_N = 105  # 3 * 5 * 7: only patterns whose segments divide it


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _reasons(fc: FakeCuda) -> list[str]:
    return [f"{v.op}: {v.reason}" for v in fc.violations]


# --- 1. the harness ---------------------------------------------------------------------

INDEX_KEYS = [
    (slice(None), slice(1, None)),
    (0,),
    (Ellipsis, 3),
    (slice(None), None, Ellipsis, slice(2, None, 2)),
    (slice(None), [0, 2, 5]),
    (slice(None), [[0], [2]], [1, 3]),
    (1, slice(None), [0, 3]),
    (Ellipsis, None),
    (-1, slice(-3, None)),
]


@pytest.mark.parametrize("key", INDEX_KEYS, ids=[repr(k) for k in INDEX_KEYS])
def test_rerouted_getitem_matches_torch_indexing(key):
    real = torch.empty(2, 6, 4, 5)[key]
    with fake_cuda() as fc:
        x = fc.empty(2, 6, 4, 5, dtype=torch.float32)
        got = x[key]
        assert got.device.type == "cuda"
        assert (got.shape, got.stride(), got.storage_offset()) == (
            real.shape, real.stride(), real.storage_offset()
        )
    fc.assert_clean()


def test_rerouted_setitem_copy_contiguous_and_to():
    with fake_cuda() as fc:
        x = fc.empty(2, 6, 4, dtype=torch.float16)
        x[:, 1:3] = 0.0
        x[:, 1:3] = x[:, 3:5]
        x[:, torch.arange(2, device="cuda")] = x[:, :2]
        x[:, 1:] += x[:, :-1]
        x.copy_(torch.zeros_like(x))
        t = x.transpose(1, 2).contiguous()
        assert t.is_contiguous() and t.shape == (2, 4, 6)
        assert torch.arange(3).to("cuda").device.type == "cuda"
        assert (~(x > 0)).dtype == torch.bool
    fc.assert_clean()


def test_launch_counts_skip_views_and_allocations():
    with fake_cuda() as fc:
        x = fc.empty(2, 8, 16, 64, dtype=torch.float16)  # no launch
        y = x[:, :, 1:].transpose(1, 2)  # views: no launch
        before = fc.checker.launches
        z = y + 1  # one elementwise kernel
        assert fc.checker.launches == before + 1
        aten._scaled_dot_product_flash_attention.default(x, x, x, 0.0, False, False, scale=0.1)
        assert fc.checker.launches == before + 2
        del z
    assert fc.checker.fused_calls == {"aten._scaled_dot_product_flash_attention.default": 1}


class _Square(torch.autograd.Function):
    """A Function whose backward returns a configurable (possibly wrong) gradient."""

    grad_dtype = None

    @staticmethod
    def forward(ctx, x, tag):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        g = 2 * x * dy
        return (g if _Square.grad_dtype is None else g.to(_Square.grad_dtype)), None


@pytest.mark.parametrize("wrong", [False, True], ids=["right-grads", "wrong-dtype-grads"])
def test_backward_driver_checks_gradients(wrong):
    _Square.grad_dtype = torch.float32 if wrong else None
    try:
        with fake_cuda() as fc:
            x = fc.empty(3, 4, dtype=torch.float16)
            out = fc.drive(_Square, x, "tag")
            assert out.shape == x.shape
    finally:
        _Square.grad_dtype = None
    assert fc.backward_calls == 1
    assert bool(fc.grad_problems) == wrong, fc.grad_problems


def _flash(q, k, v, causal=False, scale=0.125):
    return aten._scaled_dot_product_flash_attention.default(q, k, v, 0.0, causal, False, scale=scale)


def _flash_bwd(q, k, v, out, lse, causal=False, scale=0.125):
    empty = torch.empty(0, dtype=torch.int64, device=q.device)
    return aten._scaled_dot_product_flash_attention_backward.default(
        out, q, k, v, out, lse, None, None, q.size(2), k.size(2), 0.0, causal, empty, empty, scale=scale
    )


def _efficient(q, k, v, causal=False, scale=0.125):
    return aten._scaled_dot_product_efficient_attention.default(q, k, v, None, True, 0.0, causal, scale=scale)


def _efficient_bwd(q, k, v, out, lse, causal=False, scale=0.125):
    seed = torch.empty((), dtype=torch.int64, device=q.device)
    return aten._scaled_dot_product_efficient_attention_backward.default(
        out, q, k, v, None, out, lse, seed, seed, 0.0, [True, True, True, False], causal, scale=scale
    )


def _flash_window(q, k, v, left=3, right=5, causal=False, **extra):
    """The direct flash op on ``[B, H, L, D]`` blocks, passed as its ``[B, L, H, D]`` views."""
    cum = extra.pop("cum", None)
    return aten._flash_attention_forward.default(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), cum, cum,
        extra.pop("max_q", q.size(2)), k.size(2), 0.0, causal, False, scale=0.125,
        window_size_left=left, window_size_right=right, **extra,
    )


def _flash_window_bwd(q, k, v, out, lse, left=3, right=5):
    empty = torch.empty(0, dtype=torch.int64, device=q.device)
    return aten._flash_attention_backward.default(
        *(x.transpose(1, 2) for x in (out, q, k, v, out)), lse, None, None, q.size(2), k.size(2), 0.0, False,
        empty, empty, scale=0.125, window_size_left=left, window_size_right=right,
    )


def _good_flash_window_pair(fc):
    q, k, v = _bhld(fc, lq=16, lk=40, hkv=2)
    out, lse = _flash_window(q, k, v)[:2]
    _flash_window_bwd(q, k, v, out.transpose(1, 2), lse)


def _bhld(fc, b=2, h=4, lq=16, d=64, dtype=torch.float16, lk=None, hkv=None):
    q = fc.empty(b, h, lq, d, dtype=dtype)
    kv = fc.empty(b, hkv or h, lk or lq, d, dtype=dtype)
    return q, kv, kv


def _good_flash_pair(fc):
    q, k, v = _bhld(fc, hkv=2)
    out, lse = _flash(q, k, v, causal=True)[:2]
    _flash_bwd(q, k, v, out, lse, causal=True)


def _good_efficient_pair(fc):
    q, k, v = _bhld(fc, d=36, lq=33, dtype=torch.float32)  # 36 * 4 bytes is 16-byte aligned
    out, lse = _efficient(q, k, v, causal=True)[:2]
    _efficient_bwd(q, k, v, out, lse, causal=True)


@pytest.mark.parametrize("make_calls", [_good_flash_pair, _good_efficient_pair, _good_flash_window_pair],
                         ids=["flash", "efficient", "flash-window"])
def test_checker_accepts_good_calls(make_calls):
    with fake_cuda() as fc:
        make_calls(fc)
    fc.assert_clean()
    assert sum(fc.checker.fused_calls.values()) == 2


def _misaligned_view(fc):
    big = fc.empty(2, 4, 16, 65, dtype=torch.float16)
    q = big[..., 1:]  # unit last stride, storage offset 1 element, strides 65 * 2 bytes
    _flash(q, q, q)


def _flash_bwd_strided_lse(fc):
    q, k, v = _bhld(fc)
    out, lse = _flash(q, k, v)[:2]
    _flash_bwd(q, k, v, out, fc.empty(2, 16, 4, dtype=torch.float32).transpose(1, 2))


def _efficient_bwd_unpadded_lse(fc):
    q, k, v = _bhld(fc, lq=33, dtype=torch.float32)
    out, lse = _efficient(q, k, v)[:2]
    _efficient_bwd(q, k, v, out, lse[..., :33].contiguous())


def _efficient_bwd_out(fc, relayout):
    q, k, v = _bhld(fc, lq=33, dtype=torch.float32)
    out, lse = _efficient(q, k, v)[:2]
    _efficient_bwd(q, k, v, relayout(out), lse)


def _efficient_bwd_lse_view(fc):
    q, k, v = _bhld(fc, h=3, lq=33, dtype=torch.float32)
    out, lse = _efficient(q, k, v)[:2]
    wide = fc.empty(2, 3, 68, dtype=torch.float32)  # head stride 68: not a multiple of 8
    _efficient_bwd(q, k, v, out, wide[..., :64])


def _head_slice(out):
    wide = torch.empty(out.shape[0], out.shape[2], 2 * out.shape[1], out.shape[3], dtype=out.dtype, device=out.device)
    return wide.transpose(1, 2)[:, : out.shape[1]]


BAD_CALLS = {
    "flash-D36": (lambda fc: _flash(*_bhld(fc, d=36)), "head dim 36 % 8 != 0"),
    "flash-D264": (lambda fc: _flash(*_bhld(fc, d=264)), "head dim 264 > 256"),
    "flash-fp32": (lambda fc: _flash(*_bhld(fc, dtype=torch.float32)), "takes float16, bfloat16; got torch.float32"),
    "flash-misaligned-view": (_misaligned_view, "data pointer not 16-byte aligned"),
    "flash-batch-65536": (lambda fc: _flash(*_bhld(fc, b=MAX_GRID_YZ + 1, h=1, lq=1, d=8)), "batch 65536 > 65535"),
    "flash-causal-non-square": (lambda fc: _flash(*_bhld(fc, lq=4, lk=8), causal=True), "not square"),
    "flash-causal-scale-0": (lambda fc: _flash(*_bhld(fc), causal=True, scale=0.0), "<= 0"),
    "flash-causal-scale-underflows": (lambda fc: _flash(*_bhld(fc), causal=True, scale=1e-50), "<= 0"),
    "flash-kv-heads-not-dividing": (lambda fc: _flash(*_bhld(fc, h=4, hkv=3)), "do not divide"),
    "flash-bwd-strided-lse": (_flash_bwd_strided_lse, "lse not contiguous"),
    "efficient-gqa": (lambda fc: _efficient(*_bhld(fc, hkv=2)), "no grouped-query support"),
    "efficient-fp16-D36": (lambda fc: _efficient(*_bhld(fc, d=36)), "not a multiple of 16"),
    "efficient-bwd-unpadded-lse": (_efficient_bwd_unpadded_lse, "lse shape (2, 4, 33), must be (2, 4, 64)"),
    "efficient-bwd-bhld-contiguous-out": (
        lambda fc: _efficient_bwd_out(fc, lambda o: o.contiguous()), "out row stride 64 != heads x head dim = 256"
    ),
    "efficient-bwd-head-slice-out": (
        lambda fc: _efficient_bwd_out(fc, _head_slice), "out row stride 512 != heads x head dim = 256"
    ),
    "flash-dropout": (
        lambda fc: aten._scaled_dot_product_flash_attention.default(*_bhld(fc), 0.1, False, False, scale=0.1),
        "dropout_p 0.1 != 0",
    ),
    "efficient-attn-bias": (
        lambda fc: aten._scaled_dot_product_efficient_attention.default(
            *_bhld(fc, dtype=torch.float32), fc.empty(2, 4, 16, 16, dtype=torch.float32), True, 0.0, False),
        "attn_bias given",
    ),
    "efficient-no-lse": (
        lambda fc: aten._scaled_dot_product_efficient_attention.default(*_bhld(fc, dtype=torch.float32), None, False),
        "compute_log_sumexp=False",
    ),
    "efficient-bwd-lse-head-stride": (
        lambda fc: _efficient_bwd_lse_view(fc), "lse strides",
    ),
    "flash-window-unbounded-side": (lambda fc: _flash_window(*_bhld(fc), left=-1), "each >= 0"),
    "flash-window-causal": (lambda fc: _flash_window(*_bhld(fc), causal=True), "is_causal with a window"),
    "flash-window-right-cut": (
        lambda fc: _flash_window(*_bhld(fc, lq=16, lk=8), right=9), "flash cuts it to seqlen_k"),
    "flash-window-varlen": (
        lambda fc: _flash_window(*_bhld(fc), cum=fc.empty(3, dtype=torch.int32)), "the varlen kernel"),
    "flash-window-max-q": (lambda fc: _flash_window(*_bhld(fc), max_q=8), "max_q/max_k (8, 16)"),
    "flash-window-D36": (lambda fc: _flash_window(*_bhld(fc, d=36)), "head dim 36 % 8 != 0"),
    "flash-window-misaligned": (
        lambda fc: _flash_window(*(3 * (fc.empty(2, 4, 16, 65, dtype=torch.float16)[..., 1:],))),
        "data pointer not 16-byte aligned"),
    "flash-window-bwd-strided-lse": (
        lambda fc: _flash_window_bwd(*_bhld(fc), fc.empty(2, 4, 16, 64, dtype=torch.float16),
                                     fc.empty(2, 16, 4, dtype=torch.float32).transpose(1, 2)),
        "lse not contiguous"),
    "cpu-op-on-cuda": (
        lambda fc: aten._scaled_dot_product_flash_attention_for_cpu.default(*_bhld(fc), 0.0, False, scale=0.1),
        "CPU fused op called on CUDA tensors",
    ),
    "bmm-on-cuda": (lambda fc: torch.matmul(fc.empty(4, 16, 64, dtype=torch.float32), fc.empty(4, 64, 16, dtype=torch.float32)), "unfused attention path"),
    "item": (lambda fc: fc.empty(3, dtype=torch.float32).sum().item(), "host sync: .item()"),
    "bool": (lambda fc: bool(fc.empty(3, dtype=torch.float32).sum() > 0), "host sync: .item()"),
    "nonzero": (lambda fc: fc.empty(3, dtype=torch.bool).nonzero(), "host sync: nonzero"),
    "boolean-mask": (
        lambda fc: fc.empty(3, dtype=torch.float32)[fc.empty(3, dtype=torch.bool)],
        "host sync: nonzero",
    ),
}


@pytest.mark.parametrize("make_call, expected", BAD_CALLS.values(), ids=BAD_CALLS.keys())
def test_checker_flags_bad_call(make_call, expected):
    with fake_cuda() as fc:
        make_call(fc)
    assert any(expected in r for r in _reasons(fc)), fc.report()


def _flash_pair_d224(fc):
    q, k, v = _bhld(fc, d=224)
    out, lse = _flash(q, k, v)[:2]
    _flash_bwd(q, k, v, out, lse)


CAPABILITY_BAD_CALLS = {
    "flash-bwd-D224-sm86": ((8, 6), _flash_pair_d224, "head dim 224 in (192, 224] on sm86"),
    "flash-bwd-D224-sm100": ((10, 0), _flash_pair_d224, "head dim 224 in (192, 224] on sm100"),
    "flash-sm75": ((7, 5), lambda fc: _flash(*_bhld(fc)), "flash attention on sm75"),
    "efficient-bf16-sm75": ((7, 5), lambda fc: _efficient(*_bhld(fc, dtype=torch.bfloat16)), "bfloat16 needs sm80"),
}


@pytest.mark.parametrize("capability, make_call, expected", CAPABILITY_BAD_CALLS.values(), ids=CAPABILITY_BAD_CALLS.keys())
def test_checker_flags_bad_call_per_capability(capability, make_call, expected):
    with fake_cuda(capability=capability) as fc:
        make_call(fc)
    assert any(expected in r for r in _reasons(fc)), fc.report()
    with fake_cuda(capability=(9, 0)) as fc:  # an H100 runs all of them
        make_call(fc)
    fc.assert_clean()


def test_checker_records_instead_of_raising():
    """Several violations in one call are all listed, and the call still returns."""
    with fake_cuda() as fc:
        out = _flash(*_bhld(fc, d=36, dtype=torch.float32, b=MAX_GRID_YZ + 1, h=1, lq=1))
        assert out[0].shape == (MAX_GRID_YZ + 1, 1, 1, 36)
    reasons = " | ".join(_reasons(fc))
    for expected in ("head dim 36", "got torch.float32", "batch 65536"):
        assert expected in reasons, fc.report()


def test_sdpa_backend_choice_is_not_checkable_on_a_cpu_build():
    """Why ``dense_attention`` is checked for shapes only.

    On a CPU-only build SDPA has no CUDA backend selection: on fake CUDA tensors it runs
    the math path (bmm + softmax), so the fused kernel a GPU would pick is never seen. If
    this test fails, torch started dispatching a fused op here: check dense like the rest.
    """
    with fake_cuda() as fc:
        q, k, v = fc.qkv(batch=2, seq_len=N, heads=HEADS, kv_heads=KV_HEADS, head_dim=64, dtype=torch.float16)
        out = ra.dense_attention(q, k, v, causal=True)
        assert out.shape == q.shape and out.dtype == q.dtype and out.device.type == "cuda"
    assert not fc.checker.fused_calls
    assert fc.checker.op_counts["aten.bmm.default"] > 0
    assert not [r for r in _reasons(fc) if "host sync" in r], fc.report()


# --- 2. the block kernels -----------------------------------------------------------------


def _kernel_inputs(fc, batch, heads, length, d, dtype, layout):
    """``[B, H, L, D]`` q, k, v: contiguous, offset views, or views of one fused qkv tensor."""
    if layout == "plain":
        return tuple(fc.empty(batch, heads, length, d, dtype=dtype) for _ in range(3))
    if layout == "offset":
        return tuple(fc.empty(batch, heads, length, d + 1, dtype=dtype)[..., 1:] for _ in range(3))
    fused = fc.empty(batch, length, 3, heads, d, dtype=dtype)  # [B, L, 3, H, D] projection output
    return tuple(t.transpose(1, 2) for t in fused.unbind(2))


def _run_kernels(fc, q, k, v, *, causal, scale):
    """Forward then backward (dout = ones); returns ``(q, k, v, out, lse, grads)`` to check after the run."""
    out, lse = kernels.attention_forward(q, k, v, causal=causal, scale=scale)
    grads = kernels.attention_backward(torch.ones_like(out), q, k, v, out, lse, causal=causal, scale=scale)
    return q, k, v, out, lse, grads


def _check_kernels(fc, q, k, v, out, lse, grads):
    """Violations first (they say why), then the outputs' metadata and that a fused kernel ran."""
    fc.assert_clean()
    b, h, length, d = q.shape
    assert (out.shape, out.dtype, out.device.type) == ((b, h, length, d), q.dtype, "cuda")
    assert (lse.shape, lse.dtype, lse.is_contiguous()) == ((b, h, length), torch.float32, True)
    for t, g in zip((q, k, v), grads):
        assert (g.shape, g.dtype, g.device) == (t.shape, t.dtype, t.device)
    assert fc.checker.fused_calls, "no fused kernel called"


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("length", [1, 7, 128, 257], ids=lambda n: f"L{n}")
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("d", HEAD_DIMS, ids=lambda d: f"D{d}")
def test_kernels_forward_backward(d, dtype, length, causal):
    with fake_cuda() as fc:
        ran = _run_kernels(fc, *_kernel_inputs(fc, 2, 3, length, d, dtype, "plain"), causal=causal, scale=d**-0.5)
    _check_kernels(fc, *ran)


@pytest.mark.parametrize("layout", ["offset", "fused"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("d", [36, 64, 80], ids=lambda d: f"D{d}")
def test_kernels_on_views(d, dtype, layout):
    with fake_cuda() as fc:
        ran = _run_kernels(fc, *_kernel_inputs(fc, 2, 4, 128, d, dtype, layout), causal=True, scale=d**-0.5)
    _check_kernels(fc, *ran)


@pytest.mark.parametrize("d, dtype", [(64, torch.float16), (36, torch.float32)], ids=["D64-float16", "D36-float32"])
def test_kernels_split_a_batch_above_the_grid_limit(d, dtype):
    with fake_cuda() as fc:
        ran = _run_kernels(fc, *_kernel_inputs(fc, 70_000, 1, 1, d, dtype, "plain"), causal=False, scale=0.1)
    _check_kernels(fc, *ran)


@pytest.mark.parametrize("scale", [0.0, -0.5, 1e-50], ids=["zero", "negative", "underflows-to-zero"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=_name)
def test_kernels_causal_with_nonpositive_scale(dtype, scale):
    with fake_cuda() as fc:
        ran = _run_kernels(fc, *_kernel_inputs(fc, 2, 3, 7, 64, dtype, "plain"), causal=True, scale=scale)
    _check_kernels(fc, *ran)


# --- 3. public functions and modules --------------------------------------------------------


def _quarter_half(n, mode="mixture"):
    return ra.DilatedPattern((n // 4, n // 2), (1, 2), mode)


# name -> fn(q, k, v) -> output; every one runs PackedAttention (forward and backward).
PUBLIC = {
    "dilated-mixture": lambda q, k, v: ra.dilated_attention(q, k, v, _quarter_half(q.shape[1])),
    "dilated-head_groups-causal": lambda q, k, v: ra.dilated_attention(
        q, k, v, _quarter_half(q.shape[1], "head_groups"), causal=True
    ),
    "ring1": lambda q, k, v: ra.ring_attention(q, k, v, ring_size=1),
    "ring2": lambda q, k, v: ra.ring_attention(q, k, v, ring_size=2),
    "ring2-causal": lambda q, k, v: ra.ring_attention(q, k, v, ring_size=2, causal=True),
    # ring_size 4 (causal, zigzag and plain) runs as the registry variants ring-zigzag-causal4,
    # StandardRingAttention and RingAttention-ring4 below.
    "ring_dilated-ring2": lambda q, k, v: ra.ring_dilated_attention(q, k, v, _quarter_half(q.shape[1]), ring_size=2),
    "ring_dilated-ring4-zigzag-causal": lambda q, k, v: ra.ring_dilated_attention(
        q, k, v, _quarter_half(q.shape[1], "head_groups"), ring_size=4, causal=True, layout="zigzag"
    ),
    "ring_dilated-checkpoint": lambda q, k, v: ra.ring_dilated_attention(
        q, k, v, _quarter_half(q.shape[1]), ring_size=2, checkpoint=True
    ),
    "DilatedAttention-causal": lambda q, k, v: ra.DilatedAttention(_quarter_half(q.shape[1]), causal=True)(q, k, v),
    "RingDilatedAttention-ring2": lambda q, k, v: ra.RingDilatedAttention(_quarter_half(q.shape[1]), ring_size=2)(
        q, k, v
    ),
}


def _run_public(fn, *, n, d, dtype, layout="plain", heads=HEADS, kv_heads=KV_HEADS) -> FakeCuda:
    with fake_cuda() as fc:
        q, k, v = fc.qkv(batch=2, seq_len=n, heads=heads, kv_heads=kv_heads, head_dim=d, dtype=dtype, layout=layout)
        out = fn(q, k, v)
    fc.assert_clean()  # first: a violation says why anything below would fail
    assert (out.shape, out.dtype, out.device.type) == (q.shape, q.dtype, "cuda")
    assert fc.checker.fused_calls and fc.backward_calls > 0
    return fc


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("d", HEAD_DIMS, ids=lambda d: f"D{d}")
@pytest.mark.parametrize("name", ["dilated-mixture", "ring2-causal"])
def test_public_full_matrix(name, d, dtype):
    _run_public(PUBLIC[name], n=N, d=d, dtype=dtype)


# These cost 12-16K aten calls per forward + backward on the executor of 2026-11 (about
# 0.3 ms each on fake tensors): one (D, dtype) point for them.
HEAVY = {"ring_dilated-ring4-zigzag-causal", "ring_dilated-ring3-N105"}
TWO_POINTS = [(64, torch.float16), (36, torch.float32)]


def _points(names, heavy=HEAVY):
    """(name, D, dtype) cases: two points for light functions, the first for heavy ones."""
    return [
        pytest.param(name, d, dtype, id=f"{name}-D{d}-{_name(dtype)}")
        for name in names
        for d, dtype in TWO_POINTS[: 1 if name in heavy else 2]
    ]


@pytest.mark.parametrize("name, d, dtype", _points(PUBLIC))
def test_public_function(name, d, dtype):
    _run_public(PUBLIC[name], n=N, d=d, dtype=dtype)


@pytest.mark.parametrize("layout", ["offset", "fused", "fused-gqa"])
@pytest.mark.parametrize("d, dtype", [(36, torch.float16), (80, torch.bfloat16)], ids=["D36-float16", "D80-bfloat16"])
@pytest.mark.parametrize("name", ["dilated-mixture", "ring2-causal", "ring_dilated-ring2"])
def test_public_on_views(name, d, dtype, layout):
    # "fused": unbind of one [B, N, 3, H, D] projection (equal heads); "fused-gqa": narrow
    # of one [B, N, H + 2 Hkv, D] projection.
    kv_heads = HEADS if layout == "fused" else KV_HEADS
    _run_public(PUBLIC[name], n=N, d=d, dtype=dtype, layout=layout.removesuffix("-gqa"), kv_heads=kv_heads)


ODD = {
    "dilated-N105": lambda q, k, v: ra.dilated_attention(q, k, v, ra.DilatedPattern((35, 105), (1, 3)), causal=True),
    "ring1-N105-causal": lambda q, k, v: ra.ring_attention(q, k, v, ring_size=1, causal=True),
    "ring3-N105-causal": lambda q, k, v: ra.ring_attention(q, k, v, ring_size=3, causal=True),
    "ring_dilated-ring3-N105": lambda q, k, v: ra.ring_dilated_attention(
        q, k, v, ra.DilatedPattern((35, 105), (1, 3)), ring_size=3
    ),
}


@pytest.mark.parametrize("name, d, dtype", _points(ODD))
def test_public_odd_length(name, d, dtype):
    _run_public(ODD[name], n=ODD_N, d=d, dtype=dtype)


@pytest.mark.parametrize("d, dtype", [(64, torch.bfloat16), (36, torch.float32)], ids=["D64-bfloat16", "D36-float32"])
def test_multihead_dilated_attention_module(d, dtype):
    embed = HEADS * d
    with fake_cuda() as fc:
        layer = fc.module(
            ra.MultiheadDilatedAttention, embed, HEADS, _quarter_half(N), num_kv_heads=KV_HEADS, batch_first=True,
            causal=True,
            ring_size=2, dtype=dtype,
        )
        x = fc.empty(2, N, embed, dtype=dtype)
        out, weights = layer(x)
    fc.assert_clean()
    assert (out.shape, out.dtype, out.device.type, weights) == (x.shape, dtype, "cuda", None)
    assert fc.checker.fused_calls and fc.backward_calls > 0


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_dense_attention_forward_shapes(dtype):
    """Forward only, shapes only: SDPA's CUDA kernel choice cannot run here (see above)."""
    with fake_cuda() as fc:
        q, k, v = fc.qkv(batch=2, seq_len=N, heads=HEADS, kv_heads=KV_HEADS, head_dim=36, dtype=dtype)
        out = ra.dense_attention(q, k, v, causal=True)
        assert (out.shape, out.dtype, out.device.type) == (q.shape, dtype, "cuda")
    assert not [r for r in _reasons(fc) if "host sync" in r], fc.report()


def test_plans_cached_under_one_fake_mode_do_not_leak_into_the_next():
    """Two runs of one shape in two fake modes: a cache holding the first mode's tensors breaks the second."""
    for _ in range(2):
        _run_public(PUBLIC["ring_dilated-ring2"], n=N, d=64, dtype=torch.float16)


# --- 4. registry variants -------------------------------------------------------------------

PACKED_VARIANTS = [name for name, v in registry.VARIANTS.items() if v.kind != "dense"]
DENSE_SKIP = (
    "torch SDPA: on a CPU-only build its CUDA backend selection falls back to the math path "
    "(test_sdpa_backend_choice_is_not_checkable_on_a_cpu_build); test_dense_attention_forward_shapes "
    "checks its shapes"
)


def _run_variant(name, *, n, d, dtype, batch=2, backward=True) -> FakeCuda:
    variant = registry.VARIANTS[name]
    with fake_cuda(backward=backward) as fc:
        q, k, v = fc.qkv(batch=batch, seq_len=n, heads=HEADS, kv_heads=KV_HEADS, head_dim=d, dtype=dtype)
        out = variant(q, k, v)
    fc.assert_clean()
    assert (out.shape, out.dtype, out.device.type) == (q.shape, dtype, "cuda")
    assert fc.checker.fused_calls
    assert (fc.backward_calls > 0) == backward
    return fc


# One (D, dtype) point per variant, rotating so every dtype and a padded head dim recur.
VARIANT_POINTS = [(36, torch.float32), (96, torch.bfloat16), (80, torch.float16), (36, torch.bfloat16)]
# N = 96 makes LongNet's segments (256, 512, 1024) collapse onto the whole sequence; on a
# 4-rank zigzag ring that is 78K aten calls (22 s on fake tensors) on the executor of 2026-11.
# At N = 8192 the same variant costs 10K calls.
VARIANT_N = {"longnet-ring4-zigzag-causal": 8192}


def _variant_cases():
    # A window's band blocks run on the math backend on CUDA for now (tests/test_windows.py
    # checks that and nothing else): the window variant is not held to fused calls only.
    for i, name in enumerate(n for n, v in registry.VARIANTS.items() if v.window(1024) is None):
        d, dtype = VARIANT_POINTS[i % len(VARIANT_POINTS)]
        yield pytest.param(name, d, dtype, id=f"{name}-D{d}-{_name(dtype)}")


@pytest.mark.parametrize("name, d, dtype", list(_variant_cases()))
def test_variant(name, d, dtype):
    if registry.VARIANTS[name].kind == "dense":
        pytest.skip(f"variant {name!r} is {DENSE_SKIP}")
    n = VARIANT_N.get(name, N)
    assert registry.VARIANTS[name].supports(n, HEADS)
    _run_variant(name, n=n, d=d, dtype=dtype)


@pytest.mark.parametrize("name", [n for n in PACKED_VARIANTS if registry.VARIANTS[n].supports(ODD_N, HEADS)])
def test_variant_odd_length(name):
    _run_variant(name, n=ODD_N, d=80, dtype=torch.float16)


def _capability_cases():
    for cap in CAPABILITIES:
        for dtype in DTYPES:
            if dtype == torch.bfloat16 and cap < (8, 0):
                continue  # no fused kernel takes bfloat16 before sm80: only the math path
            for d in (64, 224):
                yield pytest.param(cap, dtype, d, id=f"sm{cap[0]}{cap[1]}-{_name(dtype)}-D{d}")


@pytest.mark.parametrize("capability, dtype, d", list(_capability_cases()))
@pytest.mark.parametrize("name", ["RingDilatedV2-ring4", "ring-zigzag-causal4"])
def test_variant_per_capability(name, capability, dtype, d):
    """Forward and backward on each pretended GPU: every fused call within what its
    architecture runs (flash's backward for 192 < D <= 224 only on sm80 and sm90)."""
    with fake_cuda(capability=capability) as fc:
        q, k, v = fc.qkv(batch=2, seq_len=N, heads=HEADS, kv_heads=KV_HEADS, head_dim=d, dtype=dtype)
        registry.VARIANTS[name](q, k, v)
    fc.assert_clean()
    assert fc.backward_calls and fc.checker.fused_calls


@pytest.mark.parametrize("name", ["RingDilatedV2-ring4", "ring-zigzag-causal4", "longnet"])
def test_cuda_shards_mark_non_finite_query_rows(name):
    """A query row holding inf can score -inf against every key: the CUDA kernels return it
    as a row without keys (0), the reference as NaN. Each shard computes its query-row
    poison once (one reduction, no host sync), as on the CPU."""
    variant = registry.VARIANTS[name]
    with mock.patch.object(nonfinite, "query_row_poison", wraps=nonfinite.query_row_poison) as poison:
        fc = _run_variant(name, n=VARIANT_N.get(name, N), d=64, dtype=torch.float16, backward=False)
    shards = getattr(variant, "ring_size", None) or 1
    assert poison.call_count == shards, (poison.call_count, shards)
    assert not [r for r in _reasons(fc) if "host sync" in r], fc.report()


@pytest.mark.parametrize("name", ["longnet-ring4-zigzag-causal", "ring-zigzag-causal4"])
def test_causal_values_are_zeroed_once_per_shard(name):
    """On CUDA nothing tells that the values are finite: a causal call reads them zeroed
    where not finite and adds their poison (one scan). A shard zeroes its values once: the
    many causal calls of a dilated pattern read one split (their scans read it); a plain
    ring's one causal call quarantines its own keys (zeroed, then scanned in place: one copy,
    not a split's three), its forward's row chunks (Options.causal_chunks) reading that copy,
    each scanning its own rows."""
    variant = registry.VARIANTS[name]
    fc = _run_variant(name, n=8192, d=64, dtype=torch.float16, backward=False, batch=1)
    ops = fc.checker.op_counts
    if name.startswith("longnet"):
        assert ops["aten.nan_to_num.default"] == variant.ring_size, ops
        assert ops["aten.cumsum.default"] > variant.ring_size, ops
        assert ops["aten.cumsum_.default"] == 0, ops  # the per-call quarantine's scan
    else:
        # 2048 rows a shard: a causal block of two chunks of 1024 (Options.min_split_bytes of output)
        chunks = 2 * variant.ring_size
        assert ops["aten._flash_attention_forward.default"] == variant.ring_size, ops  # the second's band
        assert ops["aten.nan_to_num.default"] == variant.ring_size, ops  # one zeroed copy a shard
        assert ops["aten.cumsum_.default"] == chunks and ops["aten.cumsum.default"] == 0, ops  # a chunk's rows each


@pytest.mark.parametrize("capturing", [False, True], ids=["eager", "capturing"])
def test_cells_without_keys_reach_the_gpu_in_one_copy_or_are_built_there_under_capture(capturing):
    """A plan leaving cells without keys masks the query-row marks there. Eagerly its mask is
    one copy of a cached CPU tensor; while a CUDA graph is captured (no copy from pageable
    memory there, and nothing kept across calls) it is built on the device, a fill per run."""
    with mock.patch.object(schedule, "capturing_cuda_graph", lambda: capturing):
        fc = _run_variant("RingDilatedV2-ring4", n=8192, d=64, dtype=torch.float16, backward=False, batch=1)
    fills = fc.checker.op_counts["aten.fill_.Scalar"]
    assert (fills > 0) == capturing, fc.checker.op_counts


def _live_cuda_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():  # isinstance on torch.distributed's deprecated reduce_op warns
        warnings.simplefilter("ignore", FutureWarning)
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.device.type == "cuda")


@pytest.mark.parametrize("capability", CAPABILITIES, ids=lambda c: f"sm{c[0]}{c[1]}")
def test_no_cuda_tensor_survives_a_call_in_any_cache(capability):
    """Under torch.compile(mode="reduce-overhead") a tensor made during CUDA graph capture
    lives in the graph's pool, overwritten or freed by the next replay: index tensors and
    masks must not outlive the call that made them (grouped-query heads, dilated and ring,
    forward and backward)."""
    before = _live_cuda_tensors()
    for name in ("RingDilatedV2-ring4", "ring-zigzag-causal4"):
        for _ in range(2):
            with fake_cuda(capability=capability) as fc:
                q, k, v = fc.qkv(batch=2, seq_len=N, heads=HEADS, kv_heads=KV_HEADS, head_dim=64, dtype=torch.float16)
                registry.VARIANTS[name](q, k, v)
                del q, k, v
            fc.assert_clean()
        assert _live_cuda_tensors() == before, f"{name}: CUDA tensors kept after the call"


@pytest.mark.timeout(60)
def test_longnet_forward_at_128k():
    """Meta-sized: fake tensors cost nothing, so this measures plan and executor overhead."""
    _run_variant("longnet", n=128 * 1024, d=64, dtype=torch.float16, batch=1, backward=False)


@pytest.mark.timeout(60)
def test_longnet_batch_times_runs_above_the_grid_limit():
    """B = 256, N = 64K: 256 segments of 256 rows per batch row, 65,536 runs in one call unless split."""
    _run_variant("longnet", n=64 * 1024, d=64, dtype=torch.float16, batch=256, backward=False)


# --- 5. memory on a GPU -----------------------------------------------------------------


def _peak_bytes(fn, n: int, backward: bool) -> int:
    """Peak bytes above the inputs of ``fn(q, k, v)`` on fake CUDA float16 ``[1, n, 8, 64]``
    (the backward driven with ones as output gradients), after one warm call."""
    import gc

    from perf.counters import Meter

    with fake_cuda(backward=backward) as fc:
        q, k, v = fc.qkv(batch=1, seq_len=n, heads=8, kv_heads=8, head_dim=64, dtype=torch.float16)
        fn(q, k, v)
        gc.collect()
        gc.disable()  # storages are freed when their last reference goes, at the same point every run
        try:
            with Meter() as meter:
                fn(q, k, v)
        finally:
            gc.enable()
    fc.assert_clean()
    return meter.peak_bytes


def _flash_sdpa(backward: bool):
    """The flash kernel on the whole sequence (and its backward with ones as ``dout``)."""
    def run(q, k, v):
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        out, lse = aten._scaled_dot_product_flash_attention(qt, kt, vt, 0.0, False, False)[:2]
        if backward:
            none = torch.empty(0, dtype=torch.int64, device=q.device)
            aten._scaled_dot_product_flash_attention_backward(
                torch.ones_like(out), qt, kt, vt, out, lse, None, None, q.shape[1], q.shape[1], 0.0, False, none, none)
    return run


# Peak over the flash kernel's at the N = 128K, float16: float32 accumulators only per
# row tile, half-precision gradients where at most two add up per cell. Beside the limit, each
# shard may hold its query-row poison (float32 [B, n, H], 4 MiB here, 1/32 of out): the
# flash kernel returns a query row holding inf as a row without keys (0), the reference NaN.
MEMORY_LIMITS = {  # name: (forward, forward+backward)
    "ImprovedDilatedAttention": (1.3, 1.5),
    "Production": (1.3, 1.5),
    "longnet": (1.3, 1.5),
    "RingAttention-ring1": (1.0, 1.0),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", list(MEMORY_LIMITS))
def test_memory_on_a_gpu_stays_within_the_limits(name):
    n = 128 * 1024
    poison = n * 8 * 4  # B = 1, H = 8, float32
    for backward, limit in zip((False, True), MEMORY_LIMITS[name]):
        peak, sdpa = (_peak_bytes(fn, n, backward) for fn in (registry.VARIANTS[name], _flash_sdpa(backward)))
        assert peak <= limit * sdpa + poison, (
            f"{name} {'fwd+bwd' if backward else 'fwd'}: {peak / sdpa:.3f}x the flash kernel's, "
            f"{(peak - limit * sdpa) / 2**20:.2f} MiB over the limit"
        )


def _flash_anchor(n: int, window: tuple[int, int] | None = None, cu_seqlens=None, backward: bool = False) -> int:
    """Peak bytes of one ``aten._flash_attention_forward`` over the whole fake CUDA float16
    ``[1, n, 8, 64]``: with ``window`` (sides) or, varlen, ``cu_seqlens`` (then with
    ``[total, H, D]`` operands, which the library's rules do not take: not checked); with
    ``backward``, and its backward (a window's) with ones as the output gradient."""
    from perf.counters import Meter

    with fake_cuda(backward=False) as fc:
        q, k, v = fc.qkv(batch=1, seq_len=n, heads=8, kv_heads=8, head_dim=64, dtype=torch.float16)
        if cu_seqlens is None:
            args = (q, k, v, None, None)
            sides = dict(window_size_left=window[0], window_size_right=window[1])
        else:
            cu = torch.tensor(cu_seqlens, dtype=torch.int32, device=q.device)
            args = (*(t.reshape(n, 8, 64) for t in (q, k, v)), cu, cu)
            sides = {}
        with Meter() as meter:
            out, lse = aten._flash_attention_forward(*args, n, n, 0.0, cu_seqlens is not None, False, **sides)[:2]
            if backward:
                rng = torch.empty(0, dtype=torch.int64, device=q.device)
                aten._flash_attention_backward(torch.ones_like(out), q, k, v, out, lse, None, None, n, n, 0.0, False,
                                               rng, rng, **sides)
    return meter.peak_bytes


# Issue 30's goal: packed documents and a sliding window on fake CUDA float16 at N = 128K,
# forward, against one flash call that computes the same attention natively: 1.24x each
# (1.39x when each document ran whole: its output and zeroed values beside the shard's output;
# its forward now runs in row chunks, Options.causal_chunks). Causal attention without a mask
# holds one copy of the shard's values (zeroed: a NaN or inf must not reach rows before it;
# then scanned in place for the rows that attend it), 1.97x: the price of NaN-exact outputs
# (3.91x when one causal call split its source, three copies).
MASK_MEMORY_LIMITS = {"window": 1.3, "documents": 1.3, "causal": 2.0}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mask", list(MASK_MEMORY_LIMITS))
def test_masks_on_a_gpu_stay_near_flash_with_the_same_mask(mask):
    n = 128 * 1024
    if mask == "documents":
        cu = registry.packed_documents(n, 64)
        fn = functools.partial(ra.ring_attention, causal=True, cu_seqlens=cu)
        anchor = _flash_anchor(n, cu_seqlens=cu)
    else:
        window = (4095, 0) if mask == "window" else (n - 1, 0)  # the latter: every key before
        fn = functools.partial(ra.ring_attention, causal=True, window=window if mask == "window" else None)
        anchor = _flash_anchor(n, window=window)
    peak = _peak_bytes(fn, n, backward=False)  # every call within what the kernels take (assert_clean)
    assert peak <= MASK_MEMORY_LIMITS[mask] * anchor, f"{mask}: {peak / anchor:.3f}x flash's"


@pytest.mark.timeout(180)
def test_a_windows_backward_on_a_gpu_stays_near_flashs():
    """Forward and backward of window (4095, 0) at N = 128K: 1.06x flash's own (wide tiles,
    each query tile's band one call: its rows written once, nothing merged, and a key's
    gradient the sum of two calls', exact in half precision; 1.30x when a tile's two blocks
    merged, 1.89x in narrow tiles, whose float32 gradients the shard holds whole)."""
    n = 128 * 1024
    fn = functools.partial(ra.ring_attention, causal=True, window=(4095, 0))
    peak, anchor = _peak_bytes(fn, n, backward=True), _flash_anchor(n, window=(4095, 0), backward=True)
    assert peak <= 1.15 * anchor, f"{peak / anchor:.3f}x flash's forward and backward"


def test_a_window_on_a_gpu_takes_few_launches():
    """Flash runs a band on its own window, so a window's tiles are as wide as its band
    (Options.band_tiles, chosen by the backend) and each query tile meets its band in one
    call: window (4095, 0) at N = 128K, forward and backward, in 699 launches (970 in two
    merged calls a tile, in row tiles; 7,490 in the CPU op's sixteenth-of-a-band tiles)."""
    fn = functools.partial(ra.ring_attention, causal=True, window=(4095, 0))
    assert _launches(fn, 128 * 1024, backward=True) <= 800


def test_packed_documents_on_a_gpu_take_few_launches():
    """64 packed documents at N = 128K, forward and backward: 830 launches, about 13 a
    document (a causal call's quarantine scans its poison in the zeroed copy its kernel read,
    not in a second one: 900 when it made one)."""
    fn = functools.partial(ra.ring_attention, causal=True, cu_seqlens=registry.packed_documents(128 * 1024, 64))
    assert _launches(fn, 128 * 1024, backward=True) <= 850


def _launches(fn, n: int, backward: bool) -> int:
    """Launches of one call of ``fn`` on fake CUDA float16 ``[1, n, 8, 64]``, after a warm one."""
    with fake_cuda(backward=backward) as fc:
        q, k, v = fc.qkv(batch=1, seq_len=n, heads=8, kv_heads=8, head_dim=64, dtype=torch.float16)
        fn(q, k, v)
        before = fc.checker.launches
        fn(q, k, v)
    fc.assert_clean()
    return fc.checker.launches - before


@pytest.mark.parametrize("name", ["Production", "longnet"])
def test_shards_below_the_tiling_threshold_run_whole(name):
    """At N = 8192 a GPU is host-bound: row tiles would repeat every launch per tile."""
    executable.clear()
    _launches(registry.VARIANTS[name], 8192, backward=True)
    ranks = [rank for plan in executable._CACHE.values() for rank in plan.ranks.values()]
    assert ranks and all(rank.forward_tiles is None and rank.backward_tiles is None for rank in ranks)
