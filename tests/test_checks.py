"""ring_attention.checks: malformed inputs raise ValueError/TypeError naming the problem,
before any kernel runs, through every public function that validates with them."""

import pytest
import torch

import ring_attention as ra
from tests.inputs import qkv

PATTERN = ra.DilatedPattern((4, 8), (1, 2))


def _reference(q, k, v, pattern=PATTERN, **kw):
    return ra.reference_attention(q, k, v, pattern=pattern, **kw)


def _dense(q, k, v, pattern=None, **kw):
    return ra.dense_attention(q, k, v, **kw)


def _dilated(q, k, v, pattern=PATTERN, **kw):
    return ra.dilated_attention(q, k, v, pattern, **kw)


ALL = pytest.mark.parametrize("fn", [_reference, _dense, _dilated], ids=["reference", "dense", "dilated"])
PATTERNED = pytest.mark.parametrize("fn", [_reference, _dilated], ids=["reference", "dilated"])


def _qkv(b=1, n=8, h=4, hkv=2, d=4, dtype=torch.float32):
    return qkv(b, n, h, hkv, d, dtype=dtype)


# --- tensors ---------------------------------------------------------------------------


@ALL
@pytest.mark.parametrize("which", [0, 1, 2])
@pytest.mark.parametrize("shape", [(8, 4, 4), (1, 1, 8, 4, 4), (32,)])
def test_wrong_rank(fn, which, shape):
    t = list(_qkv())
    t[which] = torch.randn(shape)
    name = "qkv"[which]
    with pytest.raises(ValueError, match=rf"{name} must have 4 dimensions \[B, N, H, D\]"):
        fn(*t)


@ALL
def test_not_a_tensor(fn):
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        fn(q.tolist(), k, v)
    with pytest.raises(TypeError, match="v must be a torch.Tensor"):
        fn(q, k, None)


@ALL
@pytest.mark.parametrize(
    "kshape, vshape, match",
    [
        ((1, 8, 2, 4), (1, 4, 2, 4), "k and v must have the same shape"),
        ((1, 8, 2, 4), (1, 8, 2, 8), "k and v must have the same shape"),
        ((1, 4, 2, 4), (1, 4, 2, 4), "does not match q shape.*sequence length"),
        ((2, 8, 2, 4), (2, 8, 2, 4), "does not match q shape.*batch"),
        ((1, 8, 2, 8), (1, 8, 2, 8), "does not match q shape.*head dim"),
    ],
)
def test_mismatched_shapes(fn, kshape, vshape, match):
    q = torch.randn(1, 8, 4, 4)
    with pytest.raises(ValueError, match=match):
        fn(q, torch.randn(kshape), torch.randn(vshape))


@ALL
@pytest.mark.parametrize("h, hkv", [(3, 2), (4, 3), (2, 4)])
def test_heads_not_multiple_of_kv_heads(fn, h, hkv):
    q, k, v = _qkv(h=h, hkv=hkv)
    with pytest.raises(ValueError, match=rf"H={h} must be a multiple of key/value heads Hkv={hkv}"):
        fn(q, k, v, pattern=ra.DilatedPattern((4,), (1,)))


@ALL
def test_mismatched_dtypes(fn):
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="must share one dtype"):
        fn(q.double(), k, v)
    with pytest.raises(TypeError, match="must share one dtype"):
        fn(q, k, v.half())


@ALL
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_unsupported_dtype(fn, dtype):
    q, k, v = (t.to(dtype) for t in _qkv())
    with pytest.raises(TypeError, match="has dtype .*supported"):
        fn(q, k, v)


@ALL
def test_mismatched_devices(fn):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="must be on one device.*meta"):
        fn(q.to("meta"), k, v)
    with pytest.raises(ValueError, match="must be on one device.*meta"):
        fn(q, k, v.to("meta"))


@ALL
def test_empty_tensors(fn):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="empty input"):
        fn(q[:, :0], k[:, :0], v[:, :0])
    with pytest.raises(ValueError, match="empty input"):
        fn(q[:0], k[:0], v[:0])


# --- scale and flags ---------------------------------------------------------------------


@ALL
@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf"), "0.5", True, 1j, [0.5]])
def test_bad_scale(fn, scale):
    with pytest.raises(TypeError, match="scale must be a finite real number"):
        fn(*_qkv(), scale=scale)


@ALL
@pytest.mark.parametrize("causal", [1, 0, "yes", None, torch.tensor(True)])
def test_non_bool_causal(fn, causal):
    with pytest.raises(TypeError, match="causal must be a bool"):
        fn(*_qkv(), causal=causal)


@pytest.mark.parametrize("checkpoint", [1, "no", None])
def test_non_bool_checkpoint(checkpoint):
    with pytest.raises(TypeError, match="checkpoint must be a bool"):
        ra.dilated_attention(*_qkv(), PATTERN, checkpoint=checkpoint)


# --- patterns ------------------------------------------------------------------------------


@PATTERNED
@pytest.mark.parametrize(
    "ws, n, bad",
    [((4, 8), 12, 8), ((5,), 8, 5), ((3,), 16, 3), ((4, 6), 8, 6), ((16, 12), 16, 12)],
)
def test_sequence_not_divisible_by_segment(fn, ws, n, bad):
    q, k, v = _qkv(n=n)
    pattern = ra.DilatedPattern(ws, (1,) * len(ws))
    with pytest.raises(ValueError, match=rf"N={n} is not divisible by segment length w={bad}"):
        fn(q, k, v, pattern=pattern)


@PATTERNED
@pytest.mark.parametrize("h, k", [(1, 2), (2, 3), (3, 4)])
def test_head_groups_needs_enough_heads(fn, h, k):
    q, kk, v = _qkv(h=h, hkv=1)
    pattern = ra.DilatedPattern((4,) * k, (1,) * k, mode="head_groups")
    with pytest.raises(ValueError, match=rf"at least as many heads as pairs: H={h} < K={k}"):
        fn(q, kk, v, pattern=pattern)


@PATTERNED
@pytest.mark.parametrize("pattern", [((4,), (1,)), {"segment_lengths": (4,)}, "4:1", 4])
def test_not_a_pattern(fn, pattern):
    with pytest.raises(TypeError, match="pattern must be a ring_attention.DilatedPattern"):
        fn(*_qkv(), pattern=pattern)


def test_dilated_requires_pattern():
    with pytest.raises(TypeError, match="pattern must be a ring_attention.DilatedPattern"):
        ra.dilated_attention(*_qkv(), None)


@pytest.mark.parametrize(
    "ws, rs, mode, exc, match",
    [
        ((), (), "mixture", ValueError, "segment_lengths is empty"),
        ([], [], "mixture", ValueError, "segment_lengths is empty"),
        ((4, 8), (1,), "mixture", ValueError, "must pair up one to one"),
        ((4,), (1, 2), "mixture", ValueError, "must pair up one to one"),
        ((0,), (1,), "mixture", ValueError, r"segment_lengths\[0\] must be a positive integer"),
        ((4, -2), (1, 1), "mixture", ValueError, r"segment_lengths\[1\] must be a positive integer"),
        ((4,), (0,), "mixture", ValueError, r"dilation_rates\[0\] must be a positive integer"),
        ((4.0,), (1,), "mixture", TypeError, r"segment_lengths\[0\] must be an integer"),
        ((4,), (2.0,), "mixture", TypeError, r"dilation_rates\[0\] must be an integer"),
        ((True,), (1,), "mixture", TypeError, r"segment_lengths\[0\] must be an integer"),
        ((4,), (False,), "mixture", TypeError, r"dilation_rates\[0\] must be an integer"),
        ((4,), (5,), "mixture", ValueError, r"dilation_rates\[0\] = 5 exceeds segment_lengths\[0\] = 4"),
        ((4,), (1,), "Mixture", ValueError, "unknown mode 'Mixture'"),
        ((4,), (1,), "groups", ValueError, "unknown mode 'groups'"),
        (None, (1,), "mixture", TypeError, "segment_lengths must be a sequence"),
        ((4,), 1, "mixture", TypeError, "dilation_rates must be a sequence"),
    ],
)
def test_bad_pattern(ws, rs, mode, exc, match):
    with pytest.raises(exc, match=match):
        ra.DilatedPattern(ws, rs, mode=mode)


def test_errors_raised_before_any_work_on_large_bad_input():
    # validation is shape arithmetic only: a meta-device q fails fast, no kernel runs
    q = torch.empty(1, 1 << 20, 1, 8, device="meta")
    k = torch.empty(1, 1 << 20, 1, 8)
    with pytest.raises(ValueError, match="one device"):
        ra.dilated_attention(q, k, k, ra.DilatedPattern((64,), (1,)))
