"""The real CUDA path against a float64 reference; skipped where there is no CUDA device.

Run by the GPU workflow before benchmarking. Every check has the same shape:

    error(ours) <= K * error(SDPA) + eps

where ``error`` is the largest absolute difference from a float64 reference computed on
the CPU from the *same* (already rounded) inputs, and ``error(SDPA)`` is the error of
``torch.nn.functional.scaled_dot_product_attention`` in the same dtype, on the same device,
against the same kind of reference. So the bound follows each dtype and GPU instead of
being a fixed number.

- ``K = 8``: our result comes from one or more fused calls whose partial results merge
  in float32 and round to the dtype once, like SDPA's single call; a correct
  implementation lands within a small factor of SDPA (different block orders, the extra
  merges), while a wrong mask, scale, or a misplaced key shows up as an O(1) error,
  orders of magnitude above ``8 x`` SDPA's rounding error.
- ``eps = finfo(dtype).eps * max|reference|``: one unit of rounding of the result, for
  the cases where SDPA happens to be exact (``L = 1`` returns ``v`` itself).

Dilated variants use the dense SDPA error of the same shape (full or causal as the
variant) as the yardstick. A masked SDPA cannot express the mixture mode (a key covered by
two pairs has weight 2, not a boolean) and gives NaN on rows a pattern leaves empty. The
dense yardstick sums over at least as many keys per row as any dilated row does, so its
rounding error is no smaller than the one a correct dilated result can have.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import ring_attention as ra
from ring_attention import kernels, registry
from ring_attention.masks import band_keeps

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

K = 8
HEAD_DIMS = (36, 64, 80, 96, 128, 256)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LENGTHS = (1, 7, 128, 257)
HEADS, KV_HEADS = 8, 2


def _name(dtype):
    return str(dtype).removeprefix("torch.")


def _err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.detach().double().cpu() - ref.detach().double()).abs().max().item()


def _bound(err_sdpa: float, ref: torch.Tensor, dtype) -> float:
    return K * err_sdpa + torch.finfo(dtype).eps * ref.detach().abs().max().item()


def _randn(*shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).cuda()


def _float64_cpu(*tensors):
    """Float64 CPU leaf copies of the already-rounded inputs, requiring grad."""
    return [t.detach().double().cpu().requires_grad_() for t in tensors]


def _grads(out, inputs, dout):
    return torch.autograd.grad(out, inputs, dout)


# --- the block kernels: [B, H, L, D], equal heads ------------------------------------------


def _sdpa_errors(q, k, v, dout, *, causal, scale=None):
    """SDPA's output and gradient errors against float64, in q's dtype on q's device.

    ``[B, H, L, D]``; k/v may have fewer heads. The backends are pinned to flash and
    mem-efficient, the fused kernels our code calls (newer torch prefers cuDNN on sm90).
    kv heads are expanded with ``repeat_interleave`` (differentiable, so the k/v gradients
    fold back) because mem-efficient has no grouped-query support.
    """
    groups = q.size(1) // k.size(1)

    def sdpa(q, k, v):
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)

    qs, ks, vs = (t.detach().requires_grad_() for t in (q, k, v))
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        out = sdpa(qs, ks, vs)
        grads = _grads(out, (qs, ks, vs), dout)
    q64, k64, v64 = _float64_cpu(q, k, v)
    ref = sdpa(q64, k64, v64)
    ref_grads = _grads(ref, (q64, k64, v64), dout.double().cpu())
    return _err(out, ref), [_err(g, r) for g, r in zip(grads, ref_grads)]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("length", LENGTHS, ids=lambda n: f"L{n}")
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("d", HEAD_DIMS, ids=lambda d: f"D{d}")
def test_kernels_against_float64(d, dtype, length, causal):
    b, h, scale = 2, 3, d**-0.5
    q, k, v, dout = (_randn(b, h, length, d, dtype=dtype, seed=s) for s in range(4))
    out, lse = kernels.attention_forward(q, k, v, causal=causal, scale=scale)
    dq, dk, dv = kernels.attention_backward(dout, q, k, v, out, lse, causal=causal, scale=scale)

    q64, k64, v64 = _float64_cpu(q, k, v)
    # reference_attention takes [B, N, H, D]: transpose in and out
    ref = ra.reference_attention(*(t.transpose(1, 2) for t in (q64, k64, v64)), causal=causal, scale=scale)
    ref = ref.transpose(1, 2)
    ref_grads = _grads(ref, (q64, k64, v64), dout.double().cpu())
    scores = q64.detach() @ k64.detach().transpose(-1, -2) * scale
    if causal:
        scores = scores.masked_fill(~torch.ones(length, length, dtype=torch.bool).tril(), float("-inf"))
    ref_lse = torch.logsumexp(scores, dim=-1)

    err_out, err_grads = _sdpa_errors(q, k, v, dout, causal=causal, scale=scale)
    assert _err(out, ref) <= _bound(err_out, ref, dtype)
    # An LSE off by delta scales every weight by exp(delta) ~ 1 + delta: it must be as
    # accurate as SDPA's output is relative to its size.
    rel_out = err_out / max(ref.detach().abs().max().item(), 1e-30)
    assert _err(lse, ref_lse) <= K * rel_out + torch.finfo(torch.float32).eps * ref_lse.abs().max().item()
    for name, g, r, e in zip("qkv", (dq, dk, dv), ref_grads, err_grads):
        assert _err(g, r) <= _bound(e, r, dtype), f"d{name}"


# Bands (a block cut by a sliding window): a tile of a causal window (keys up to the last
# query, bottom-right aligned as flash's window is), one of a two-sided window, one whose
# first rows have no key (out 0, LSE -inf), a window's far edge (j > i: flash runs it
# without its last row and first key), one whose last keys no row keeps, and one flash
# cannot run (more queries than keys, top-left aligned: math); and a causal block's row chunk
# (rows [64, 112) against keys [0, 112): the band a causal call with fewer queries than keys
# runs as, Options.causal_chunks).
BANDS = {"causal-tile": (48, 112, (0, 64)), "two-sided": (64, 64, (-5, 9)), "rows-without-keys": (40, 24, (-30, -8)),
         "far-edge": (64, 64, (1, 10**9)), "keys-cut": (64, 100, (-10, 26)), "math": (64, 8, (-100, 0)),
         "causal-chunk": (48, 112, (-47, 64))}


@pytest.mark.parametrize("case", BANDS, ids=list(BANDS))
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("d", [64, 128], ids=lambda d: f"D{d}")
def test_band_kernels_against_float64(d, dtype, case):
    lq, lk, band = BANDS[case]
    b, h, scale = 2, 3, d**-0.5
    q, dout = (_randn(b, h, lq, d, dtype=dtype, seed=s) for s in (0, 3))
    k, v = (_randn(b, h, lk, d, dtype=dtype, seed=s) for s in (1, 2))
    out, lse = kernels.attention_forward(q, k, v, causal=False, scale=scale, band=band)
    grads = kernels.attention_backward(dout, q, k, v, out, lse, causal=False, scale=scale, band=band)
    q64, k64, v64 = _float64_cpu(q, k, v)
    keep = band_keeps(lq, lk, band, torch.device("cpu"))
    scores = (q64 @ k64.transpose(-1, -2) * scale).masked_fill(~keep, float("-inf"))
    ref_lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - ref_lse.masked_fill(ref_lse == float("-inf"), 0.0).unsqueeze(-1))
    ref = probs @ v64
    ref_grads = _grads(ref, (q64, k64, v64), dout.double().cpu())
    # yardstick: dense SDPA of the same shape (at least as many keys per row)
    err_out, err_grads = _sdpa_errors(q, k, v, dout, causal=False, scale=scale)
    assert _err(out, ref) <= _bound(err_out, ref, dtype)
    assert torch.equal(lse.isneginf().cpu(), ~keep.any(-1).expand_as(ref_lse)), "rows without keys: LSE -inf"
    finite = ~ref_lse.isneginf()
    rel_out = err_out / max(ref.detach().abs().max().item(), 1e-30)
    assert _err(lse.cpu()[finite], ref_lse.detach()[finite]) <= K * rel_out + 1e-6 * ref_lse[finite].abs().max().item()
    for name, g, r, e in zip("qkv", grads, ref_grads, err_grads):
        assert _err(g, r) <= _bound(e, r, dtype), f"d{name}"


def _kernel_case(b, h, length, d, dtype, causal, *, relayout=lambda out: out):
    """Our block kernels' forward and backward (``out`` handed to the backward through
    ``relayout``) against float64, with SDPA's errors as the yardstick."""
    scale = d**-0.5
    q, k, v, dout = (_randn(b, h, length, d, dtype=dtype, seed=s) for s in range(4))
    out, lse = kernels.attention_forward(q, k, v, causal=causal, scale=scale)
    grads = kernels.attention_backward(dout, q, k, v, relayout(out), lse, causal=causal, scale=scale)
    q64, k64, v64 = _float64_cpu(q, k, v)
    ref = ra.reference_attention(*(t.transpose(1, 2) for t in (q64, k64, v64)), causal=causal, scale=scale)
    ref = ref.transpose(1, 2)
    ref_grads = _grads(ref, (q64, k64, v64), dout.double().cpu())
    err_out, err_grads = _sdpa_errors(q, k, v, dout, causal=causal, scale=scale)
    assert _err(out, ref) <= _bound(err_out, ref, dtype)
    for name, g, r, e in zip("qkv", grads, ref_grads, err_grads):
        assert _err(g, r) <= _bound(e, r, dtype), f"d{name}"


def _head_slice(out):
    """``out`` as heads ``[0, H)`` of a ``[B, L, 2H, D]`` tensor: a row stride of ``2 H D``."""
    b, h, length, d = out.shape
    wide = out.new_zeros(b, length, 2 * h, d)
    wide[:, :, :h] = out.transpose(1, 2)
    return wide[:, :, :h].transpose(1, 2)


@pytest.mark.parametrize("d", [36, 64], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("layout", ["bhld-contiguous", "head-slice"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_efficient_backward_whatever_the_layout_of_out(dtype, layout, d):
    """Issue 28, defect 1: the efficient backward assumes out's row stride is H x D (it reads
    out for the delta term), so any other layout must be laid out before the call."""
    if dtype == torch.bfloat16 and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("no fused kernel takes bfloat16 before sm80")
    relayout = (lambda out: out.contiguous()) if layout == "bhld-contiguous" else _head_slice
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):  # flash off: every block runs efficient
        assert kernels.backend(_randn(1, 1, 1, d, dtype=dtype, seed=0)) == "efficient"
        _kernel_case(2, 3, 129, d, dtype, True, relayout=relayout)


@pytest.mark.parametrize("d", [200, 224], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_name)
def test_backward_with_head_dim_above_192(dtype, d):
    """Issue 28, defect 2: flash's backward for 192 < D <= 224 runs only on sm80 and sm90;
    elsewhere (sm86/89, sm100, sm120) the blocks' backward goes to the efficient kernel."""
    if dtype == torch.bfloat16 and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("no fused kernel takes bfloat16 before sm80")
    _kernel_case(2, 3, 129, d, dtype, False)
    _kernel_case(2, 3, 64, d, dtype, True)


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("name", ["dense", "RingDilatedV2-ring4", "ring-zigzag-causal4", "longnet"])
def test_query_row_holding_inf(name, dtype):
    """Issue 28, defect 5: a query row with +inf in a dim where every key is negative scores
    -inf against every key. The fused kernels take that for a row without keys (0); the
    reference says NaN (0 where the pattern gives the cell no keys). Exactly the
    reference's NaN cells, and the other cells as usual."""
    if dtype == torch.bfloat16 and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("no fused kernel takes bfloat16 before sm80")
    variant, b, length, d = registry.VARIANTS[name], 2, 128, 64
    q = _randn(b, length, HEADS, d, dtype=dtype, seed=0)
    k, v = (_randn(b, length, KV_HEADS, d, dtype=dtype, seed=s) for s in (1, 2))
    k[..., 0] = -k[..., 0].abs() - 0.5
    q[0, 5, :, 0] = float("inf")  # every head: a dilated pattern leaves some cells without keys
    q[1, 77, :, 3] = float("nan")
    with torch.no_grad():
        out = variant(q, k, v)
    ref = variant.reference(*_float64_cpu(q, k, v)).detach()
    assert ref[0, 5].isnan().any() and ref[1, 77].isnan().any()
    assert torch.equal(out.isnan().cpu(), ref.isnan()), "NaN cells differ from the reference's"
    finite_q = q.nan_to_num(0.0, 0.0, 0.0)  # the yardstick: SDPA's error on finite inputs
    err_out, _ = _sdpa_errors(finite_q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                              finite_q.transpose(1, 2), causal=variant.causal)
    finite = ~ref.isnan()
    assert _err(out.cpu()[finite], ref[finite]) <= _bound(err_out, ref[finite], dtype)


@pytest.mark.parametrize("scale", [0.0, -0.5], ids=["zero", "negative"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_kernels_causal_with_nonpositive_scale(dtype, scale):
    """Issue 11: the fused ops multiply the -inf causal mask by the scale. SDPA itself is
    wrong here, so the yardstick is SDPA's error at the default scale, same shape."""
    b, h, length, d = 2, 3, 33, 64
    q, k, v, dout = (_randn(b, h, length, d, dtype=dtype, seed=s) for s in range(4))
    out, lse = kernels.attention_forward(q, k, v, causal=True, scale=scale)
    q64, k64, v64 = _float64_cpu(q, k, v)
    ref = ra.reference_attention(*(t.transpose(1, 2) for t in (q64, k64, v64)), causal=True, scale=scale)
    err_out, _ = _sdpa_errors(q, k, v, dout, causal=True, scale=d**-0.5)
    assert torch.isfinite(out).all()
    assert _err(out, ref.transpose(1, 2)) <= _bound(err_out, ref, dtype)


# --- every registry variant: [B, N, H, D], grouped-query heads ---------------------------


def _variant_cases():
    for name, variant in registry.VARIANTS.items():
        for length in LENGTHS:
            for dtype in DTYPES:
                for d in HEAD_DIMS:
                    marks = () if variant.supports(length, HEADS) else pytest.mark.skip(
                        reason=f"{name} does not support N={length}, H={HEADS}"
                    )
                    yield pytest.param(name, length, dtype, d, id=f"{name}-N{length}-{_name(dtype)}-D{d}", marks=marks)


@pytest.mark.parametrize("name, length, dtype, d", list(_variant_cases()))
def test_variant_against_float64(name, length, dtype, d):
    variant = registry.VARIANTS[name]
    b = 2
    q = _randn(b, length, HEADS, d, dtype=dtype, seed=0)
    k, v = (_randn(b, length, KV_HEADS, d, dtype=dtype, seed=s) for s in (1, 2))
    dout = _randn(b, length, HEADS, d, dtype=dtype, seed=3)

    qs, ks, vs = (t.detach().requires_grad_() for t in (q, k, v))
    out = variant(qs, ks, vs)
    assert out.shape == q.shape and out.dtype == dtype and out.is_cuda
    grads = _grads(out, (qs, ks, vs), dout)

    q64, k64, v64 = _float64_cpu(q, k, v)
    ref = variant.reference(q64, k64, v64)
    ref_grads = _grads(ref, (q64, k64, v64), dout.double().cpu())

    # yardstick: dense SDPA of the same shape (see the module docstring)
    bhld = [t.transpose(1, 2) for t in (q, k, v)]
    err_out, err_grads = _sdpa_errors(*bhld, dout.transpose(1, 2), causal=variant.causal)
    assert _err(out, ref) <= _bound(err_out, ref, dtype)
    for name_, g, r, e in zip("qkv", grads, ref_grads, err_grads):
        assert _err(g, r) <= _bound(e, r, dtype), f"d{name_}"
