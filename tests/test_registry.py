"""Every registered variant agrees with the dense reference, forward and backward."""

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from ring_attention import registry
from ring_attention.checks import check_documents

SEED_NAMES = [
    "StandardRingAttention",
    "RingAttention-ring1",
    "RingAttention-ring2",
    "RingAttention-ring4",
    "ImprovedDilatedAttention",
    "RingDilatedV2-ring2",
    "RingDilatedV2-ring4",
    "Production",
    "Production-checkpoint",
    "Production-ring4",
]

# The earlier project's report names and the configuration each ran (its benchmark scripts:
# RingDilatedV2 = RingDilatedAttentionV2 with ring_size=1; Production_* =
# RingDilatedAttentionProduction, mixture weights, use_gradient_checkpointing False for NoCP
# and True for CP and Ring4; ImprovedDilated = the head_groups dilated baseline).
# (kind, ring size, causal, checkpoint, pattern mode or None for full attention)
EARLIER_PROJECT = {
    "Production_NoCP": ("ring_dilated", 1, False, False, "mixture"),
    "Production_CP": ("ring_dilated", 1, False, True, "mixture"),
    "Production_WithCP": ("ring_dilated", 1, False, True, "mixture"),
    "Production_Ring4": ("ring_dilated", 4, False, True, "mixture"),
    "RingDilatedV2": ("dilated", None, False, False, "head_groups"),
    "RingDilatedV2_single": ("dilated", None, False, False, "head_groups"),
    "RingDilatedV2_ring2": ("ring_dilated", 2, False, False, "head_groups"),
    "RingDilatedV2_Ring4": ("ring_dilated", 4, False, False, "head_groups"),
    "ImprovedDilated": ("dilated", None, False, False, "head_groups"),
    "StandardRingAttention": ("ring", 4, True, False, None),
    "RingAttention_ring1": ("ring", 1, False, False, None),
    "RingAttention_ring2": ("ring", 2, False, False, None),
    "RingAttention_ring4": ("ring", 4, False, False, None),
}


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
    assert all(registry.VARIANTS[n].from_earlier_project for n in SEED_NAMES)


def test_every_variant_describes_itself():
    for v in registry.VARIANTS.values():
        assert v.description and v.kind in ("dense", "dilated", "ring", "ring_dilated")
        assert isinstance(v.kind, registry.Kind)


@pytest.mark.parametrize("alias", sorted(EARLIER_PROJECT))
def test_earlier_project_names_resolve_to_their_configuration(alias):
    kind, ring_size, causal, checkpoint, mode = EARLIER_PROJECT[alias]
    v = registry.get(alias)
    assert registry.resolve(alias) == v.name and v.name in registry.VARIANTS
    assert (v.kind.value, v.ring_size, v.causal, v.checkpoint) == (kind, ring_size, causal, checkpoint)
    n = 1024
    p = v.pattern_for(n)
    if mode is None:
        assert p is None
    else:  # the earlier project's (N/4, N/2) / (1, 2)
        assert (p.mode, tuple(p.segment_lengths), tuple(p.dilation_rates)) == (mode, (n // 4, n // 2), (1, 2))


def test_no_two_variants_compute_the_same_thing_by_the_same_route():
    def signature(v):
        p = v.pattern_for(1024)
        pat = None if p is None else (p.mode, tuple(p.segment_lengths), tuple(p.dilation_rates))
        return v.kind, v.ring_size or 1, v.causal, v.layout, v.checkpoint, pat, v.window(1024), v.documents(1024)

    # ring_dilated on one rank computes what dilated computes (the twins the registry had):
    # count them as one route.
    def route(v):
        kind, ring, *rest = signature(v)
        if kind is registry.Kind.RING_DILATED and ring == 1 and not v.checkpoint:
            kind = registry.Kind.DILATED
        return (kind, ring, *rest)

    seen = {}
    for v in registry.VARIANTS.values():
        assert route(v) not in seen, f"{v.name} duplicates {seen.get(route(v))}"
        seen[route(v)] = v.name


def test_aliases_point_to_registered_variants_and_are_not_registered():
    for alias, target in registry.ALIASES.items():
        assert target in registry.VARIANTS and alias not in registry.VARIANTS
        assert alias in registry.aliases_of(target)
    assert registry.get("dilated-mixture") is registry.get("Production")
    assert registry.get("RingDilatedV2-single") is registry.get("ImprovedDilatedAttention")


def test_unknown_kind_raises_at_construction_and_at_call():
    with pytest.raises(ValueError, match="unknown kind 'flash'"):
        registry.Variant("x", "not a kind", "flash")
    v = registry.Variant("x", "a ring", "ring", ring_size=2)
    assert v.kind is registry.Kind.RING
    object.__setattr__(v, "kind", "flash")  # bypassing the check: __call__ must not guess
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(ValueError, match="unknown kind"):
        v(q, q, q)


def test_large_n_devices_is_an_attribute_of_the_variant():
    import dataclasses

    renamed = dataclasses.replace(registry.get("longnet"), name="longnet-renamed")
    assert renamed.large_n_devices == {"cpu", "cuda"}
    assert registry.get("Production-checkpoint").large_n_devices == {"cuda"}
    assert registry.get("RingAttention-ring2").large_n_devices == frozenset()


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
    assume(variant.supports(n, h))  # Hypothesis draws another example instead of passing vacuously
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
    with pytest.raises(KeyError, match="StandardRingAttention") as info:
        registry.get("NoSuchAttention")
    assert "Production_CP" in str(info.value)  # and the aliases


def test_packed_documents_are_valid_deterministic_and_long_tailed():
    cu = registry.packed_documents(128 * 1024, 64)
    assert check_documents(cu, 128 * 1024) == cu and len(cu) == 65
    assert registry.packed_documents(128 * 1024, 64) == cu and registry.packed_documents(128 * 1024, 64, seed=1) != cu
    lengths = sorted(b - a for a, b in zip(cu, cu[1:]))
    assert lengths[-1] > 10 * lengths[len(lengths) // 2]  # the longest far above the median
    assert lengths[0] >= 1
    assert registry.packed_documents(10, 10) == tuple(range(11))  # every document of length 1


def test_packed_documents_refuse_a_bad_count():
    with pytest.raises(ValueError, match="count"):
        registry.packed_documents(8, 9)


@pytest.mark.parametrize("name", list(registry.VARIANTS))
def test_the_ranks_share_the_variants_pairs(name):
    """The ranks' attended pairs, from their plans' calls, add up to the pairs ``flops`` counts."""
    v = registry.VARIANTS[name]
    n, h = 1024, 4
    assert sum(v.rank_pairs(n, h, 2)) * 4 * 8 == v.flops(1, n, h, 8)
