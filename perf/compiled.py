"""Registry variants called through ``torch.compile``: what a model that compiles its layers runs.

The CUDA profile benchmarks a few variants twice, eagerly and compiled with
``mode="reduce-overhead"`` (CUDA graphs: one replay instead of a launch per op), so the
report shows what compiling buys where eager launches dominate. A compiled benchmark is
named ``<variant>+compiled``; it has no cost counters (dynamo does not trace under the
counting dispatch mode), and its error is measured like any other variant's.
"""

from __future__ import annotations

import torch

SUFFIX = "+compiled"


def base_name(name: str) -> str:
    """The registry name of a benchmark's variant (``longnet+compiled`` -> ``longnet``)."""
    return name.removesuffix(SUFFIX)


def is_compiled(name: str) -> bool:
    return name.endswith(SUFFIX)


class CompiledVariant:
    """``variant`` through ``torch.compile(fullgraph=True, mode=mode)``; every other attribute is the variant's."""

    def __init__(self, variant, mode: str):
        self.variant, self.mode = variant, mode
        self.name = variant.name + SUFFIX
        self._compiled = torch.compile(variant, mode=mode, fullgraph=True)

    def __call__(self, q, k, v):
        return self._compiled(q, k, v)

    def __getattr__(self, attr):
        return getattr(self.variant, attr)
