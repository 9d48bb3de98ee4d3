"""Every registered variant agrees with the dense reference, forward and backward."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ring_attention import registry

SEED_NAMES = [
    "StandardRingAttention",
    "RingAttention-ring1",
    "RingAttention-ring2",
    "RingAttention-ring4",
    "ImprovedDilatedAttention",
    "RingDilatedV2-single",
    "RingDilatedV2-ring2",
    "RingDilatedV2-ring4",
    "Production",
    "Production-checkpoint",
    "Production-ring4",
]


def _inputs(seed, b, n, h, hkv, d, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, n, h, d, generator=gen, dtype=dtype, requires_grad=True)
    k = torch.randn(b, n, hkv, d, generator=gen, dtype=dtype, requires_grad=True)
    v = torch.randn(b, n, hkv, d, generator=gen, dtype=dtype, requires_grad=True)
    g = torch.randn(b, n, h, d, generator=gen, dtype=dtype)
    return q, k, v, g


def _check_against_reference(variant, q, k, v, g, atol):
    out = variant(q, k, v)
    ref = variant.reference(q, k, v)
    torch.testing.assert_close(out, ref, atol=atol, rtol=0)
    got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(ref, (q, k, v), g)
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=lambda m, n=name: f"d{n}: {m}")


def test_seed_variants_are_registered():
    missing = [n for n in SEED_NAMES + ["dense"] if n not in registry.VARIANTS]
    assert not missing
    assert all(registry.VARIANTS[n].seed for n in SEED_NAMES)


def test_every_variant_describes_itself():
    for v in registry.VARIANTS.values():
        assert v.description and v.kind in ("dense", "dilated", "ring", "ring_dilated")


@pytest.mark.parametrize("name", list(registry.VARIANTS))
def test_variant_matches_reference(name):
    variant = registry.get(name)
    n = 64
    assert variant.supports(n, 4)
    q, k, v, g = _inputs(0, 2, n, 4, 2, 8)
    _check_against_reference(variant, q, k, v, g, atol=1e-10)


@given(
    name=st.sampled_from(list(registry.VARIANTS)),
    n=st.sampled_from([16, 32, 48, 96]),
    hkv_heads=st.sampled_from([(4, 4), (4, 1), (6, 3), (8, 2)]),
    seed=st.integers(0, 2**16),
)
def test_variant_matches_reference_property(name, n, hkv_heads, seed):
    variant = registry.get(name)
    h, hkv = hkv_heads
    if not variant.supports(n, h):
        return
    q, k, v, g = _inputs(seed, 1, n, h, hkv, 4)
    _check_against_reference(variant, q, k, v, g, atol=1e-10)


@pytest.mark.parametrize("name", ["Production", "RingDilatedV2-ring4", "longnet-ring4-zigzag-causal"])
def test_variant_in_float32(name):
    variant = registry.get(name)
    q, k, v, g = _inputs(1, 1, 128, 8, 8, 16, dtype=torch.float32)
    _check_against_reference(variant, q, k, v, g, atol=2e-5)


def test_supports_rejects_what_the_variant_cannot_run():
    assert not registry.get("RingAttention-ring4").supports(30, 4)  # 30 % 4
    assert not registry.get("ring-zigzag-causal4").supports(36, 4)  # 36 % 8
    assert not registry.get("ImprovedDilatedAttention").supports(64, 1)  # head_groups: H < K
    assert registry.get("dense").supports(30, 1)


def test_flops_count_the_computed_scores():
    b, n, h, d = 2, 64, 4, 8
    assert registry.get("dense").flops(b, n, h, d) == 4 * d * b * h * n * n
    assert registry.get("StandardRingAttention").flops(b, n, h, d) == 4 * d * b * h * n * (n + 1) // 2
    # head_groups (N/4, N/2) / (1, 2): half the heads see 4 segments of 16 rows, the other
    # half 2 segments of 32 rows at rate 2, i.e. 16 kept rows each.
    want = 4 * d * b * (2 * 4 * 16 * 16 + 2 * 2 * 16 * 16)
    assert registry.get("ImprovedDilatedAttention").flops(b, n, h, d) == want
    fwd = registry.get("dense").flops(b, n, h, d)
    assert registry.get("dense").flops(b, n, h, d, backward=True) == pytest.approx(3.5 * fwd)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(KeyError, match="StandardRingAttention"):
        registry.get("NoSuchAttention")
