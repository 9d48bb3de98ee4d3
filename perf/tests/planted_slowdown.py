"""A pytest plugin that makes one variant a few percent slower: the history's planted regression.

``PERF_PLANTED_SLOWDOWN=longnet:8 python -m perf --profile history -- -p perf.tests.planted_slowdown``
runs the history profile with every call of ``longnet`` followed by a busy wait of 8% of that
call's own time. A busy wait, not a sleep: it competes for the CPU as the call's work does,
so under a neighbour's load it stretches as the call does and the slowdown stays 8% of the
call, not a fixed delay that load could hide or inflate. Other variants, the SDPA anchor
and the cost counters (no aten op is added) are unchanged. Only the forward call is slowed;
a ``fwd+bwd`` benchmark's backward is not.
"""

from __future__ import annotations

import os
import time

from ring_attention import registry

ENV = "PERF_PLANTED_SLOWDOWN"


class SlowedVariant:
    """``variant`` with each call stretched by ``pct`` percent of its own duration."""

    def __init__(self, variant, pct: float):
        self._variant, self._factor = variant, 1 + pct / 100

    def __getattr__(self, name):  # name, kind, causal, supports, flops, ...: the variant's own
        return getattr(self._variant, name)

    def __call__(self, q, k, v):
        start = time.perf_counter()
        out = self._variant(q, k, v)
        end = start + (time.perf_counter() - start) * self._factor
        while time.perf_counter() < end:
            pass
        return out


def parse(text: str) -> tuple[str, float]:
    """``"longnet:8"`` -> ``("longnet", 8.0)`` (the registry name or an alias, a percentage)."""
    name, _, pct = text.partition(":")
    return registry.resolve(name.strip()), float(pct)


def pytest_configure(config):
    if not os.environ.get(ENV):
        raise RuntimeError(f"perf.tests.planted_slowdown needs {ENV}=<variant>:<percent>, e.g. longnet:8")
    name, pct = parse(os.environ[ENV])
    original = registry.VARIANTS[name]
    registry.VARIANTS[name] = SlowedVariant(original, pct)
    config.add_cleanup(lambda: registry.VARIANTS.__setitem__(name, original))
