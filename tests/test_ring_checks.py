"""ring_attention.ring_checks: every rank's checks, and how the ranks agree on them.

What a real process group does with a rank that disagrees (every rank raises the same
error, before any P2P) is tests/test_distributed.py's; here what runs in one process.
"""

import pytest

import ring_attention as ra
from ring_attention import ring_checks
from tests.inputs import qkv


@pytest.mark.parametrize("value, expected", [("every_call", "EVERY_CALL"), (" Cached ", "CACHED")])
def test_agreement_policy_from_the_environment(monkeypatch, value, expected):
    monkeypatch.setenv(ring_checks.AGREEMENT_ENV, value)
    assert ring_checks.agreement_policy(None) is ring_checks.Agreement[expected]


def test_unknown_agreement_policy_names_the_variable(monkeypatch):
    monkeypatch.setenv(ring_checks.AGREEMENT_ENV, "sometimes")
    with pytest.raises(ValueError, match="RING_ATTENTION_AGREEMENT='sometimes'.*every_call"):
        ring_checks.agreement_policy(None)


def test_a_simulated_ring_checks_the_whole_sequence():
    """Without a group, the checks see the whole sequence: its length must divide into the
    ring's shards in the layout (zigzag: 2R chunks)."""
    q, k, v = qkv(1, 12, 2, 2, 4)
    ring, checked = ring_checks.check_ring_inputs(q, k, v, group=None, ring_size=3, causal=True, scale=None,
                                                 layout="contiguous")
    assert ring.size == 3 and checked.shapes.seq_len == 12 and checked.causal and checked.scale == 0.5
    q, k, v = qkv(1, 15, 2, 2, 4)  # 3 contiguous shards of 5, but not 6 zigzag chunks
    ra.ring_attention(q, k, v, ring_size=3)
    with pytest.raises(ValueError, match="divisible by 6"):
        ra.ring_attention(q, k, v, ring_size=3, layout="zigzag")


def test_the_full_pattern_is_the_libraries_alone():
    """ring_attention passes FULL; a user's None is no pattern, named as such."""
    q, k, v = qkv(1, 8, 2, 2, 4)
    with pytest.raises(TypeError, match="pattern"):
        ra.dilated_attention(q, k, v, None)
    _, checked = ring_checks.check_ring_inputs(q, k, v, group=None, ring_size=1, causal=False, scale=None,
                                               layout="contiguous", pattern=ring_checks.FULL)
    assert checked.shapes.seq_len == 8
