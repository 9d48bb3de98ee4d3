"""perf/flex.py: the FlexAttention anchor computes the masked row's attention."""

from __future__ import annotations

import pytest
import torch

from perf import flex
from ring_attention import registry
from ring_attention.masks import SequenceMask

MASKED = [n for n, v in registry.VARIANTS.items() if v.masked]


@pytest.mark.parametrize("name", MASKED)
def test_the_mask_mod_keeps_what_the_sequence_mask_keeps(name):
    from torch.nn.attention.flex_attention import create_mask

    mask, n = registry.VARIANTS[name].mask(512), 512
    pos = torch.arange(n)
    got = create_mask(flex.mask_mod(mask, n, "cpu"), None, None, n, n, device="cpu")[0, 0]
    assert got.equal(mask.keeps(pos, pos))


@pytest.mark.parametrize("name", MASKED)
def test_the_flex_anchor_matches_the_reference(name):
    from tests.inputs import qkv

    variant = registry.VARIANTS[name]
    q, k, v = qkv(1, 256, 4, 2, 16, dtype=torch.float32, seed=3)
    attend, note = flex.anchor(variant.mask(256), 256, "cpu", backward=False)
    assert note == "flex_attention+block_mask"
    want = variant.reference(q.double(), k.double(), v.double())
    torch.testing.assert_close(attend(q, k, v).double(), want, rtol=2e-5, atol=2e-5)


def test_no_flex_anchor_for_a_cpu_backward():
    assert flex.anchor(SequenceMask(causal=True), 256, "cpu", backward=True) == (None, "no FlexAttention backward on CPU")
