"""ring_attention.entry: every packed-plan public function goes through ``attend``."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

import ring_attention as ra
from ring_attention import entry
from tests.inputs import qkv

PATTERN = ra.DilatedPattern((8, 16), (1, 2))

CALLS = {
    "dilated_attention": (lambda q, k, v: ra.dilated_attention(q, k, v, PATTERN, causal=True),
                          dict(pattern=PATTERN, ring_size=1, causal=True)),
    "ring_attention": (lambda q, k, v: ra.ring_attention(q, k, v, ring_size=2, layout="zigzag"),
                       dict(pattern=entry.FULL, ring_size=2, layout="zigzag")),
    "ring_dilated_attention": (lambda q, k, v: ra.ring_dilated_attention(q, k, v, PATTERN, ring_size=2),
                               dict(pattern=PATTERN, ring_size=2)),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_public_functions_go_through_attend(name):
    call, expected = CALLS[name]
    q, k, v = qkv(1, 32, 4, 2, 8, seed=1)
    with mock.patch.object(entry, "attend", wraps=entry.attend) as attend:
        module = {"dilated_attention": "dilated", "ring_attention": "ring",
                  "ring_dilated_attention": "ring_dilated"}[name]
        with mock.patch(f"ring_attention.{module}.attend", attend):
            out = call(q, k, v)
    assert attend.call_count == 1
    (_, _, _, pattern), kwargs = attend.call_args
    assert pattern is expected.pop("pattern")
    assert expected.items() <= kwargs.items()
    ref_kwargs = {"causal": kwargs.get("causal", False)}
    ref = ra.reference_attention(q, k, v, pattern=None if pattern is entry.FULL else pattern, **ref_kwargs)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("pattern", [None, "mixture"], ids=["None", "a-string"])
def test_a_pattern_argument_that_is_not_a_pattern_is_refused_not_taken_for_full(pattern):
    q, k, v = qkv(1, 32, 4, 2, 8, seed=1)
    for fn in (ra.dilated_attention, lambda q, k, v, p: ra.ring_dilated_attention(q, k, v, p, ring_size=2)):
        with pytest.raises(TypeError, match="pattern must be a ring_attention.DilatedPattern"):
            fn(q, k, v, pattern)
