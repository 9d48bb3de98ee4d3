"""Named variants: every configuration the tests and the benchmarks iterate.

The earlier project published reports for StandardRingAttention, RingAttention (ring
1/2/4), ImprovedDilatedAttention, RingDilatedV2 (single, ring 2/4) and a "Production"
version with and without gradient checkpointing. Each name here maps to one real,
correct configuration of this library, so those reports can be redone with numbers that
mean something; ``dense`` (torch SDPA) is the anchor, and our own names cover LongNet's
fixed segments and the causal / zigzag rings.

Segment lengths that depend on ``N`` (the earlier project's ``(N/4, N/2)``) are given
as functions of ``N``. Simulated rings run every rank's steps in one process.

    from ring_attention import registry
    for v in registry.VARIANTS.values():
        out = v(q, k, v_)            # the variant
        ref = v.reference(q, k, v_)  # SEMANTICS.md's dense definition of what it computes
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Optional

from .dense import dense_attention
from .dilated import dilated_attention
from .pattern import DilatedPattern, computed_pairs
from .reference import reference_attention
from .ring import ring_attention
from .ring_dilated import ring_dilated_attention

PatternFn = Callable[[int], Optional[DilatedPattern]]

# Backward of fused attention costs about 2.5x its forward (recompute P, dP, dQ, dK, dV).
BACKWARD_FLOP_FACTOR = 2.5


@dataclasses.dataclass(frozen=True)
class Variant:
    """One named configuration.

    Attributes:
        name: registry key.
        description: what it computes, in SEMANTICS.md's terms, and what it replaces.
        kind: ``dense`` | ``dilated`` | ``ring`` | ``ring_dilated``: the public function run.
        pattern: ``N -> DilatedPattern`` (``None`` for full attention).
        ring_size: simulated ring size (``None`` for single-device functions).
        causal, layout, checkpoint: passed through.
        seed: whether the earlier project's reports had this variant.
    """

    name: str
    description: str
    kind: str
    pattern: PatternFn = lambda n: None
    ring_size: Optional[int] = None
    causal: bool = False
    layout: str = "contiguous"
    checkpoint: bool = False
    seed: bool = False

    def pattern_for(self, seq_len: int) -> Optional[DilatedPattern]:
        return self.pattern(seq_len)

    def __call__(self, q, k, v):
        """Run the variant on the whole sequence ``[B, N, H, D]``."""
        p = self.pattern_for(q.shape[1])
        if self.kind == "dense":
            return dense_attention(q, k, v, causal=self.causal)
        if self.kind == "dilated":
            return dilated_attention(q, k, v, p, causal=self.causal, checkpoint=self.checkpoint)
        if self.kind == "ring":
            return ring_attention(
                q, k, v, ring_size=self.ring_size, causal=self.causal, layout=self.layout,
                checkpoint=self.checkpoint,
            )
        return ring_dilated_attention(
            q, k, v, p, ring_size=self.ring_size, causal=self.causal, layout=self.layout,
            checkpoint=self.checkpoint,
        )

    def reference(self, q, k, v):
        """SEMANTICS.md's dense definition of this variant's output (small ``N`` only)."""
        return reference_attention(q, k, v, pattern=self.pattern_for(q.shape[1]), causal=self.causal)

    def supports(self, seq_len: int, num_heads: int) -> bool:
        """Whether ``N`` and ``H`` fit the variant's pattern and ring."""
        parts = (self.ring_size or 1) * (2 if self.layout == "zigzag" else 1)
        if seq_len % parts:
            return False
        try:
            p = self.pattern_for(seq_len)
            if p is not None:
                p.check(seq_len, num_heads)
        except ValueError:
            return False
        return True

    def flops(self, batch: int, seq_len: int, num_heads: int, head_dim: int, *, backward: bool = False) -> float:
        """Effective FLOPs: ``4 D`` per score actually computed (QK^T and PV), x3.5 with backward."""
        pairs = computed_pairs(self.pattern_for(seq_len), seq_len, num_heads, is_causal=self.causal)
        fwd = 4.0 * head_dim * batch * pairs
        return fwd * (1 + BACKWARD_FLOP_FACTOR) if backward else fwd


def quarter_half(mode: str) -> PatternFn:
    """The earlier project's pattern: segments ``(N/4, N/2)``, rates ``(1, 2)``."""
    return lambda n: DilatedPattern((max(n // 4, 1), max(n // 2, 1)), (1, 2), mode)


def longnet(mode: str = "mixture") -> PatternFn:
    """LongNet's fixed segments ``(256, 512, 1024)``, rates ``(1, 2, 4)``."""
    return lambda n: DilatedPattern((256, 512, 1024), (1, 2, 4), mode)


_VARIANTS = [
    Variant("dense", "Full attention through torch SDPA (W = 1): the speed anchor.", "dense"),
    # --- the earlier project's names, each mapped to a correct configuration ---------
    Variant(
        "StandardRingAttention",
        "Textbook causal ring attention: W = [j <= i], 4 simulated ranks, contiguous shards "
        "(blocks above the diagonal skipped).",
        "ring", ring_size=4, causal=True, seed=True,
    ),
    *(
        Variant(
            f"RingAttention-ring{r}",
            f"Full attention (W = 1) over a simulated ring of {r} rank(s), contiguous shards.",
            "ring", ring_size=r, seed=True,
        )
        for r in (1, 2, 4)
    ),
    Variant(
        "ImprovedDilatedAttention",
        "Dilated attention, head_groups mode, segments (N/4, N/2), rates (1, 2), one device.",
        "dilated", pattern=quarter_half("head_groups"), seed=True,
    ),
    *(
        Variant(
            f"RingDilatedV2-{label}",
            f"Ring dilated attention, head_groups mode, segments (N/4, N/2), rates (1, 2), "
            f"simulated ring of {r} rank(s).",
            "ring_dilated", pattern=quarter_half("head_groups"), ring_size=r, seed=True,
        )
        for label, r in (("single", 1), ("ring2", 2), ("ring4", 4))
    ),
    Variant(
        "Production",
        "Ring dilated attention, mixture mode (LongNet's softmax-denominator mixing), "
        "segments (N/4, N/2), rates (1, 2), one rank, no checkpointing.",
        "ring_dilated", pattern=quarter_half("mixture"), ring_size=1, seed=True,
    ),
    Variant(
        "Production-checkpoint",
        "Production with gradient checkpointing: the forward is recomputed in backward.",
        "ring_dilated", pattern=quarter_half("mixture"), ring_size=1, checkpoint=True, seed=True,
    ),
    Variant(
        "Production-ring4",
        "Production over a simulated ring of 4 ranks.",
        "ring_dilated", pattern=quarter_half("mixture"), ring_size=4, seed=True,
    ),
    # --- our own ----------------------------------------------------------------------
    Variant(
        "dilated-mixture",
        "Dilated attention, mixture mode, segments (N/4, N/2), rates (1, 2), one device.",
        "dilated", pattern=quarter_half("mixture"),
    ),
    Variant(
        "longnet",
        "LongNet's fixed segments (256, 512, 1024), rates (1, 2, 4), mixture mode, one device: "
        "cost linear in N.",
        "dilated", pattern=longnet(),
    ),
    Variant(
        "ring-zigzag-causal4",
        "Causal ring attention over 4 simulated ranks with the zigzag layout (balanced work).",
        "ring", ring_size=4, causal=True, layout="zigzag",
    ),
    Variant(
        "longnet-ring4-zigzag-causal",
        "Causal LongNet (256, 512, 1024) / (1, 2, 4) over 4 simulated ranks, zigzag layout.",
        "ring_dilated", pattern=longnet(), ring_size=4, causal=True, layout="zigzag",
    ),
]

VARIANTS: dict[str, Variant] = {v.name: v for v in _VARIANTS}


def get(name: str) -> Variant:
    """The variant called ``name``; ``KeyError`` listing the known names otherwise."""
    try:
        return VARIANTS[name]
    except KeyError:
        raise KeyError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}") from None
