"""The nn.Module wrappers compute what their functional counterparts and the reference do."""

import pytest
import torch

import ring_attention as ra
from tests.inputs import qkv

PATTERN = ra.DilatedPattern((8, 16), (1, 2), mode="mixture")


def _qkv(b=2, n=32, h=4, hkv=2, d=8, seed=0):
    return qkv(b, n, h, hkv, d, seed=seed, requires_grad=True)


@pytest.mark.parametrize("causal", [False, True])
def test_dilated_attention_module(causal):
    q, k, v = _qkv()
    mod = ra.DilatedAttention(PATTERN, causal=causal)
    torch.testing.assert_close(mod(q, k, v), ra.reference_attention(q, k, v, pattern=PATTERN, causal=causal))
    assert "pattern=" in repr(mod)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_ring_dilated_attention_module(layout):
    q, k, v = _qkv()
    mod = ra.RingDilatedAttention(PATTERN, ring_size=2, layout=layout, causal=True)
    torch.testing.assert_close(mod(q, k, v), ra.reference_attention(q, k, v, pattern=PATTERN, causal=True))


def _manual_mha(mod, x, causal):
    b, n, e = x.shape
    q = mod.q_proj(x).view(b, n, mod.num_heads, mod.head_dim)
    k = mod.k_proj(x).view(b, n, mod.num_kv_heads, mod.head_dim)
    v = mod.v_proj(x).view(b, n, mod.num_kv_heads, mod.head_dim)
    a = ra.reference_attention(q, k, v, pattern=PATTERN, causal=causal)
    return mod.out_proj(a.reshape(b, n, e))


@pytest.mark.parametrize("num_kv_heads", [None, 2])
@pytest.mark.parametrize("causal", [False, True])
def test_multihead_dilated_attention_matches_projections_and_reference(num_kv_heads, causal):
    torch.manual_seed(0)
    mod = ra.MultiheadDilatedAttention(32, 4, PATTERN, num_kv_heads=num_kv_heads, causal=causal, dtype=torch.float64)
    x = torch.randn(2, 32, 32, dtype=torch.float64, requires_grad=True)
    out, weights = mod(x)
    assert weights is None
    want = _manual_mha(mod, x, causal)
    torch.testing.assert_close(out, want)
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, g)
    (wx,) = torch.autograd.grad(want, x, g)
    torch.testing.assert_close(gx, wx)


def test_multihead_batch_first_false_and_ring():
    torch.manual_seed(0)
    mod = ra.MultiheadDilatedAttention(16, 2, PATTERN, batch_first=False, ring_size=2, dtype=torch.float64)
    x = torch.randn(32, 3, 16, dtype=torch.float64)  # [N, B, E]
    out, _ = mod(x)
    assert out.shape == (32, 3, 16)
    want = _manual_mha(mod, x.transpose(0, 1), causal=False).transpose(0, 1)
    torch.testing.assert_close(out, want)


def test_multihead_checkpoint_gives_same_gradients():
    torch.manual_seed(0)
    a = ra.MultiheadDilatedAttention(16, 2, PATTERN, dtype=torch.float64)
    b = ra.MultiheadDilatedAttention(16, 2, PATTERN, checkpoint=True, dtype=torch.float64)
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 32, 16, dtype=torch.float64)
    a(x)[0].square().sum().backward()
    b(x)[0].square().sum().backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=name)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"key_padding_mask": torch.zeros(1, 32, dtype=torch.bool)}, "key_padding_mask"),
        ({"attn_mask": torch.zeros(32, 32, dtype=torch.bool)}, "attn_mask"),
        ({"need_weights": True}, "need_weights"),
    ],
)
def test_multihead_rejects_masks_and_weights(kwargs, match):
    mod = ra.MultiheadDilatedAttention(16, 2, PATTERN)
    with pytest.raises(ValueError, match=match):
        mod(torch.randn(1, 32, 16), **kwargs)


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((30, 4), {}, "divisible by num_heads"),
        ((0, 4), {}, "embed_dim"),
        ((32, 4), {"num_kv_heads": 3}, "multiple of num_kv_heads"),
    ],
)
def test_multihead_rejects_bad_sizes(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ra.MultiheadDilatedAttention(*args, PATTERN, **kwargs)


def test_multihead_rejects_wrong_embed_dim_input():
    mod = ra.MultiheadDilatedAttention(16, 2, PATTERN)
    with pytest.raises(ValueError, match="embed_dim=16"):
        mod(torch.randn(1, 32, 8))


def test_modules_reject_non_patterns():
    with pytest.raises(TypeError, match="DilatedPattern"):
        ra.DilatedAttention(((8,), (1,)))
