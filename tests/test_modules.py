"""The nn.Module wrappers compute what their functional counterparts and the reference do."""

import numpy as np
import pytest
import torch
from torch import nn

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


def _manual_mha(mod, x, causal, **masks):
    b, n, e = x.shape
    q = mod.q_proj(x).view(b, n, mod.num_heads, mod.head_dim)
    k = mod.k_proj(x).view(b, n, mod.num_kv_heads, mod.head_dim)
    v = mod.v_proj(x).view(b, n, mod.num_kv_heads, mod.head_dim)
    a = ra.reference_attention(q, k, v, pattern=PATTERN, causal=causal, **masks)
    return mod.out_proj(a.reshape(b, n, e))


@pytest.mark.parametrize("num_kv_heads", [None, 2])
@pytest.mark.parametrize("causal", [False, True])
def test_multihead_dilated_attention_matches_projections_and_reference(num_kv_heads, causal):
    torch.manual_seed(0)
    mod = ra.MultiheadDilatedAttention(
        32, 4, PATTERN, batch_first=True, num_kv_heads=num_kv_heads, causal=causal, dtype=torch.float64
    )
    x = torch.randn(2, 32, 32, dtype=torch.float64, requires_grad=True)
    out, weights = mod(x)
    assert weights is None
    want = _manual_mha(mod, x, causal)
    torch.testing.assert_close(out, want)
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, g)
    (wx,) = torch.autograd.grad(want, x, g)
    torch.testing.assert_close(gx, wx)


CU_SEQLENS = [0, 8, 24, 32]  # documents of 8, 16 and 8: PATTERN's segments fit each


@pytest.mark.parametrize("window", [None, (5, 0), (2, 3)])
def test_modules_hold_a_window_and_take_documents_per_call(window):
    """The window is the layer's (checked at construction); ``cu_seqlens`` comes with each
    batch, as a tensor or a list: outputs and gradients as the reference's with both."""
    q, k, v = _qkv()
    want = ra.reference_attention(q, k, v, pattern=PATTERN, causal=True, window=window, cu_seqlens=CU_SEQLENS)
    g = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, (q, k, v), g)
    for mod in (ra.DilatedAttention(PATTERN, causal=True, window=window),
                ra.RingDilatedAttention(PATTERN, ring_size=2, layout="zigzag", causal=True, window=window),
                ra.RingDilatedAttention(PATTERN, ring_size=4, causal=True, window=window, checkpoint=True)):
        for cu in (CU_SEQLENS, torch.tensor(CU_SEQLENS, dtype=torch.int32)):
            out = mod(q, k, v, cu_seqlens=cu)
            torch.testing.assert_close(out, want)
            for a, b in zip(torch.autograd.grad(out, (q, k, v), g), want_grads):
                torch.testing.assert_close(a, b)
        assert (f"window={window}" in repr(mod)) == (window is not None)
        with pytest.raises(ValueError, match="cu_seqlens"):
            mod(q, k, v, cu_seqlens=[0, 8, 4, 32])


@pytest.mark.parametrize("checkpoint, batch_first", [(False, True), (True, False)])
def test_multihead_holds_a_window_and_takes_documents_per_call(checkpoint, batch_first):
    torch.manual_seed(0)
    mod = ra.MultiheadDilatedAttention(32, 4, PATTERN, batch_first=batch_first, num_kv_heads=2, causal=True,
                                       window=(6, 0), checkpoint=checkpoint, ring_size=2, dtype=torch.float64)
    x = torch.randn(2, 32, 32, dtype=torch.float64, requires_grad=True)
    out, _ = mod(x if batch_first else x.transpose(0, 1), cu_seqlens=torch.tensor(CU_SEQLENS))
    out = out if batch_first else out.transpose(0, 1)
    want = _manual_mha(mod, x, True, window=(6, 0), cu_seqlens=CU_SEQLENS)
    torch.testing.assert_close(out, want)
    g = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(want, x, g)[0])


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
    a = ra.MultiheadDilatedAttention(16, 2, PATTERN, batch_first=True, dtype=torch.float64)
    b = ra.MultiheadDilatedAttention(16, 2, PATTERN, batch_first=True, checkpoint=True, dtype=torch.float64)
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
    mod = ra.MultiheadDilatedAttention(16, 2, PATTERN, batch_first=True)
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
        ra.MultiheadDilatedAttention(*args, PATTERN, batch_first=True, **kwargs)


def test_multihead_rejects_wrong_embed_dim_input():
    mod = ra.MultiheadDilatedAttention(16, 2, PATTERN, batch_first=True)
    with pytest.raises(ValueError, match="embed_dim=16"):
        mod(torch.randn(1, 32, 8))


def test_modules_reject_non_patterns():
    with pytest.raises(TypeError, match="DilatedPattern"):
        ra.DilatedAttention(((8,), (1,)))


# --- construction: every argument checked up front, with the functional API's messages ------


def _function_error(**kwargs):
    """What ring_dilated_attention raises for the same bad argument (the message to match)."""
    q, k, v = _qkv(b=1, n=16, h=4, hkv=2, d=4)
    with pytest.raises((TypeError, ValueError)) as info:
        ra.ring_dilated_attention(q, k, v, PATTERN, **{"ring_size": 2, **kwargs})
    return info.type, str(info.value)


BAD_OPTIONS = [
    dict(causal=1),
    dict(causal="yes"),
    dict(checkpoint="x"),
    dict(checkpoint=None),
    dict(scale="0.5"),
    dict(scale=float("nan")),
    dict(layout="spiral"),
    dict(layout=None),
    dict(ring_size=0),
    dict(ring_size=2.0),
    dict(ring_size=True),
    dict(window=(-2, 0)),
    dict(window=(1.5, 0)),
    dict(window=3),
]


# (module, constructor, the options it takes)
BUILDERS = [
    ("DilatedAttention", lambda **kw: ra.DilatedAttention(PATTERN, **kw),
     {"causal", "checkpoint", "scale", "window"}),
    ("RingDilatedAttention", lambda **kw: ra.RingDilatedAttention(PATTERN, **kw),
     {"causal", "checkpoint", "scale", "layout", "ring_size", "window"}),
    ("MultiheadDilatedAttention", lambda **kw: ra.MultiheadDilatedAttention(16, 4, PATTERN, batch_first=True, **kw),
     {"causal", "checkpoint", "layout", "ring_size", "window"}),
]


@pytest.mark.parametrize(
    "build, bad",
    [
        pytest.param(build, bad, id=f"{name}-" + "-".join(f"{k}={v!r}" for k, v in bad.items()))
        for name, build, takes in BUILDERS
        for bad in BAD_OPTIONS
        if set(bad) <= takes
    ],
)
def test_modules_refuse_bad_options_at_construction_as_the_functions_do(build, bad):
    exc, message = _function_error(**bad)
    with pytest.raises(exc) as info:
        build(**bad)
    assert str(info.value) == message


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(batch_first=1), TypeError, "batch_first must be a bool"),
        (dict(batch_first="False"), TypeError, "batch_first must be a bool"),
        (dict(bias="x"), TypeError, "bias must be a bool"),
        (dict(num_kv_heads="2"), TypeError, "num_kv_heads must be an integer"),
        (dict(num_kv_heads=0), ValueError, "num_kv_heads must be a positive integer"),
        (dict(pattern=ra.DilatedPattern((4, 8, 16), (1, 2, 4), mode="head_groups"), num_heads=2),
         ValueError, "at least as many heads as pairs: H=2 < K=3"),
        (dict(pattern=((8,), (1,))), TypeError, "pattern must be a ring_attention.DilatedPattern"),
        (dict(embed_dim=16.0), TypeError, "embed_dim must be an integer"),
        (dict(num_heads=True), TypeError, "num_heads must be an integer"),
        (dict(num_heads=-2), ValueError, "num_heads must be a positive integer"),
        (dict(group=object()), TypeError, "group must be a torch.distributed ProcessGroup"),
    ],
)
def test_multihead_refuses_bad_arguments_at_construction(kwargs, exc, match):
    args = dict(embed_dim=16, num_heads=4, pattern=PATTERN, batch_first=True)
    with pytest.raises(exc, match=match):
        ra.MultiheadDilatedAttention(**{**args, **kwargs})


def test_multihead_accepts_integers_as_users_pass_them():
    mod = ra.MultiheadDilatedAttention(np.int64(16), torch.tensor(4), PATTERN, batch_first=True, num_kv_heads=np.int32(2))
    assert (mod.embed_dim, mod.num_heads, mod.num_kv_heads, mod.head_dim) == (16, 4, 2, 4)


def test_ring_module_refuses_a_group_that_is_not_a_process_group():
    with pytest.raises(TypeError, match="group must be a torch.distributed ProcessGroup or None, got object"):
        ra.RingDilatedAttention(PATTERN, group=object())


def test_multihead_batch_first_is_required():
    """Neither default is safe: nn.MultiheadAttention's False, or the True most code uses."""
    with pytest.raises(TypeError, match="batch_first"):
        ra.MultiheadDilatedAttention(16, 2, PATTERN)


def test_multihead_batch_first_false_reads_what_nn_multihead_attention_reads():
    """With a pattern that is full attention, loading nn.MultiheadAttention's weights gives its
    output on the same [N, B, E] input: code written for it reads the layout the same way."""
    torch.manual_seed(0)
    n, b, e, h = 16, 3, 16, 4
    torch_mha = nn.MultiheadAttention(e, h, batch_first=False, dtype=torch.float64)
    mod = ra.MultiheadDilatedAttention(e, h, ra.DilatedPattern((n,), (1,)), batch_first=False, dtype=torch.float64)
    wq, wk, wv = torch_mha.in_proj_weight.chunk(3)
    bq, bk, bv = torch_mha.in_proj_bias.chunk(3)
    with torch.no_grad():
        for proj, w, bias in ((mod.q_proj, wq, bq), (mod.k_proj, wk, bk), (mod.v_proj, wv, bv)):
            proj.weight.copy_(w)
            proj.bias.copy_(bias)
        mod.out_proj.weight.copy_(torch_mha.out_proj.weight)
        mod.out_proj.bias.copy_(torch_mha.out_proj.bias)
    x = torch.randn(n, b, e, dtype=torch.float64)  # [N, B, E]
    want, _ = torch_mha(x, x, x, need_weights=False)
    got, _ = mod(x)
    torch.testing.assert_close(got, want)


# --- forward: query, key, value against each other, in the user's terms ---------------------


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize(
    "key_shape, value_shape, exc, match",
    [
        ((3, 32), (3, 32), ValueError, "key has batch size 3 but query has 2"),
        ((2, 32), (1, 32), ValueError, "value has batch size 1 but query has 2"),
        ((2, 16), (2, 16), ValueError, "key has length 16 but query has length 32.*cross-attention"),
        ((2, 32), (2, 16), ValueError, "key and value must have the same length, got 32 and 16"),
    ],
)
def test_multihead_checks_query_key_value_against_each_other(batch_first, key_shape, value_shape, exc, match):
    mod = ra.MultiheadDilatedAttention(16, 2, PATTERN, batch_first=batch_first)

    def make(batch, length):
        return torch.randn(batch, length, 16) if batch_first else torch.randn(length, batch, 16)

    dims = "[B, N, E]" if batch_first else "[N, B, E]"
    with pytest.raises(exc, match=match) as info:
        mod(make(2, 32), make(*key_shape), make(*value_shape))
    assert f"batch_first={batch_first}: {dims}" in str(info.value)


@pytest.mark.parametrize(
    "args, exc, match",
    [
        ((torch.randn(2, 32, 8),), ValueError, r"query must be a 3-d tensor \[B, N, E\] with embed_dim=16"),
        ((torch.randn(2, 32, 16), torch.randn(2, 32)), ValueError, r"key must be a 3-d tensor"),
        ((torch.randn(2, 32, 16), [[0.0]]), TypeError, "key must be a torch.Tensor"),
        ((torch.randn(2, 32, 16), None, torch.randn(2, 32, 16).double()), TypeError, "share one dtype"),
    ],
)
def test_multihead_refuses_malformed_inputs(args, exc, match):
    mod = ra.MultiheadDilatedAttention(16, 2, PATTERN, batch_first=True)
    with pytest.raises(exc, match=match):
        mod(*args)


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_value_defaults_to_key_and_key_to_query(batch_first):
    torch.manual_seed(0)
    mod = ra.MultiheadDilatedAttention(16, 2, PATTERN, batch_first=batch_first, dtype=torch.float64)
    x, y = (torch.randn(2, 32, 16, dtype=torch.float64) for _ in range(2))
    if not batch_first:
        x, y = x.transpose(0, 1), y.transpose(0, 1)
    torch.testing.assert_close(mod(x, y)[0], mod(x, y, y)[0], rtol=0, atol=0)
    torch.testing.assert_close(mod(x)[0], mod(x, x, x)[0], rtol=0, atol=0)
    # guards the check: the value does matter
    assert not torch.allclose(mod(x, y, y)[0], mod(x, y, x)[0])
