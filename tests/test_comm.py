"""The simulated ring hands tensors over as a process group would: same shapes, same dtypes.

A process group receives into buffers allocated from the receiver's spec, so a sender whose
dtype differs (float32 dK/dV received as bfloat16) fails or is misread there; the simulated
ring must refuse it too, or one-process tests would pass a ring that breaks on real ranks.
"""

import pytest
import torch

from ring_attention.comm import SimulatedRing


def _exchange(sent, spec, shift=1):
    ring = SimulatedRing(2)
    return ring.exchange(shift, {0: sent, 1: sent}, {0: spec, 1: spec}, torch.device("cpu")).wait()


def test_exchange_hands_over_matching_tensors():
    sent = [torch.zeros(2, 3), torch.ones(4, dtype=torch.bfloat16)]
    received = _exchange(sent, [((2, 3), torch.float32), ((4,), torch.bfloat16)])
    assert set(received) == {0, 1}
    assert all(a is b for a, b in zip(received[0], sent))


@pytest.mark.parametrize(
    "spec, match",
    [
        ([((2, 3), torch.bfloat16), ((4,), torch.bfloat16)], r"tensor 0: sent \(\(2, 3\), torch.float32\), expected \(\(2, 3\), torch.bfloat16\)"),
        ([((2, 3), torch.float32), ((4,), torch.float32)], r"tensor 1: sent \(\(4,\), torch.bfloat16\)"),
        ([((3, 2), torch.float32), ((4,), torch.bfloat16)], r"tensor 0: sent \(\(2, 3\)"),
        ([((2, 3), torch.float32)], r"sends 2 tensors, rank \d expects 1; tensor 1: sent \(\(4,\), torch.bfloat16\), expected nothing"),
    ],
    ids=["dtype", "dtype-second", "shape", "count"],
)
def test_exchange_refuses_what_a_process_group_could_not_receive(spec, match):
    sent = [torch.zeros(2, 3), torch.ones(4, dtype=torch.bfloat16)]
    with pytest.raises(RuntimeError, match="ring plan mismatch: " + ".*" + match):
        _exchange(sent, spec)
