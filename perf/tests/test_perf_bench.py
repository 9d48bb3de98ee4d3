"""perf/test_bench_attention.py's helpers: the SDPA anchor a row is timed against."""

from __future__ import annotations

import pytest
import torch

from ring_attention import registry


@pytest.mark.parametrize("name", [n for n, v in registry.VARIANTS.items() if v.masked])
def test_a_masked_row_is_timed_against_sdpa_with_its_boolean_mask(name):
    """The anchor of a window or packed-documents row computes the variant's attention
    (against the reference), densely with a boolean mask; past the mask's size limit, SDPA."""
    from perf import test_bench_attention as bench
    from tests.inputs import qkv

    variant = registry.VARIANTS[name]
    q, k, v = qkv(1, 256, 4, 2, 8, seed=3)
    anchor, backend, kind = bench._anchor(variant, 256, "cpu", "flash")
    assert (kind, backend) == ("sdpa+mask", None)  # flash takes no mask
    torch.testing.assert_close(anchor(q, k, v), variant.reference(q, k, v), rtol=1e-10, atol=1e-10)
    assert bench._anchor(variant, 2 * bench.MASKED_ANCHOR_MAX_N, "cpu", "flash")[1:] == ("flash", "sdpa")
