"""A pytest plugin that plants a regression in the block kernel every non-dense variant calls.

The end-to-end gate test loads it into a real benchmark run
(``python -m perf ... -- -p perf.tests.planted_regression``) and checks that the gate
fails on each arm, as it would on a bad change to ``ring_attention/kernels.py``:

* time: every block forward sleeps ``DELAY_S`` (a sleep only grows under load, so no noise
  can hide it: at N=512 a forward takes a few ms, the planted one over 50 ms);
* memory: it holds an 8 MiB buffer while it runs;
* correctness: its output is off by ``ERROR`` (above the float32 tolerance of 1e-3);
* counters: the ballast and the added error are two more launches per block (and the
  ballast raises the live-bytes peak), which the exact counter arm fails on.

``dense`` runs torch SDPA, not this kernel, so it stays as it was: the ratio to SDPA
grows with the variant's time.
"""

from __future__ import annotations

import time

import torch

from ring_attention import kernels

ERROR = 1e-2
BALLAST_BYTES = 8 << 20
DELAY_S = 0.05


def pytest_configure(config):
    original = kernels.attention_forward

    def regressed_forward(q, k, v, **kwargs):
        ballast = torch.ones(BALLAST_BYTES, dtype=torch.uint8, device=q.device)
        time.sleep(DELAY_S)
        out, lse = original(q, k, v, **kwargs)
        del ballast
        return out + ERROR, lse

    kernels.attention_forward = regressed_forward
    config.add_cleanup(lambda: setattr(kernels, "attention_forward", original))
