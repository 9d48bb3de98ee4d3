"""Named variants: every configuration the tests and the benchmarks iterate.

The earlier project published reports for StandardRingAttention, RingAttention (ring
1/2/4), ImprovedDilatedAttention, RingDilatedV2 (single, ring 2/4) and a "Production"
version with and without gradient checkpointing. Each name here maps to one real,
correct configuration of this library, so those reports can be redone with numbers that
mean something; ``dense`` (torch SDPA) is the anchor, and our own names cover LongNet's
fixed segments and the causal / zigzag rings.

Segment lengths that depend on ``N`` (the earlier project's ``(N/4, N/2)``) are given
as functions of ``N``. Simulated rings run every rank's steps in one process.

Each computation is registered once. The earlier project's spellings (``Production_CP``,
``RingDilatedV2_Ring4``, ...) and the names of configurations that turned out to compute the
same function by the same route are :data:`ALIASES`: :func:`get` and :func:`resolve`
accept them, :data:`VARIANTS` (what tests and benchmarks iterate) holds each computation once.

    from ring_attention import registry
    for v in registry.VARIANTS.values():
        out = v(q, k, v_)            # the variant
        ref = v.reference(q, k, v_)  # SEMANTICS.md's dense definition of what it computes
    registry.get("Production_CP")    # an alias: the Production-checkpoint variant
"""

from __future__ import annotations

import dataclasses
import enum
import math
import random
from collections.abc import Callable, Sequence
from typing import Optional, cast

import torch

from .dense import dense_attention
from .dilated import dilated_attention
from .layout import chunks_per_rank
from .masks import SequenceMask
from .pattern import DilatedPattern, computed_pairs
from .plans import ring_plans
from .reference import reference_attention
from .ring import ring_attention
from .ring_dilated import ring_dilated_attention

PatternFn = Callable[[int], Optional[DilatedPattern]]
WindowFn = Callable[[int], Optional[tuple[int, int]]]
DocumentsFn = Callable[[int], Optional[tuple[int, ...]]]

# Backward of fused attention costs about 2.5x its forward (recompute P, dP, dQ, dK, dV).
BACKWARD_FLOP_FACTOR = 2.5


class Kind(str, enum.Enum):
    """The public function a variant runs."""

    DENSE = "dense"
    DILATED = "dilated"
    RING = "ring"
    RING_DILATED = "ring_dilated"


@dataclasses.dataclass(frozen=True)
class Variant:
    """One named configuration.

    Attributes:
        name: registry key.
        description: what it computes, in SEMANTICS.md's terms, and what it replaces.
        kind: the public function run (a :class:`Kind`, or its value; anything else raises
            ``ValueError`` at construction).
        pattern: ``N -> DilatedPattern`` (``None`` for full attention).
        ring_size: simulated ring size (``None`` for single-device functions).
        causal, layout, checkpoint: passed through.
        window: ``N -> (left, right)`` (``None``: no window), as the functions' ``window``.
        documents: ``N -> cu_seqlens`` (``None``: one document), packed documents.
        from_earlier_project: the earlier project's reports had this configuration.
        large_n_devices: devices (``"cpu"``, ``"cuda"``) whose benchmark profile keeps this
            variant at the lengths where running the whole registry would take too long.
            A property of the variant, so renaming it keeps its benchmarks.
    """

    name: str
    description: str
    kind: Kind
    pattern: PatternFn = lambda n: None
    ring_size: Optional[int] = None
    causal: bool = False
    layout: str = "contiguous"
    checkpoint: bool = False
    window: WindowFn = lambda n: None
    documents: DocumentsFn = lambda n: None
    from_earlier_project: bool = False
    large_n_devices: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        try:
            kind = Kind(self.kind)
        except ValueError:
            known = ", ".join(k.value for k in Kind)
            raise ValueError(f"variant {self.name!r}: unknown kind {self.kind!r}; known: {known}") from None
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "large_n_devices", frozenset(self.large_n_devices))
        if kind is Kind.DENSE and (self.window(8) is not None or self.documents(8) is not None):
            raise ValueError(f"variant {self.name!r}: dense (torch SDPA) takes no window or documents")

    @property
    def masked(self) -> bool:
        """Whether a window or documents restrict the keys."""
        return self.window(1024) is not None or self.documents(1024) is not None

    def mask(self, seq_len: int) -> SequenceMask:
        """Which keys a query sees at ``seq_len``: the variant's causality, window and documents."""
        return SequenceMask(self.causal, self.window(seq_len), self.documents(seq_len))

    def pattern_for(self, seq_len: int) -> Optional[DilatedPattern]:
        return self.pattern(seq_len)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Run the variant on the whole sequence ``[B, N, H, D]``."""
        n = q.shape[1]
        p = self.pattern_for(n)  # a pattern for the dilated kinds
        if self.kind is Kind.DENSE:
            return dense_attention(q, k, v, causal=self.causal)
        window, documents = self.window(n), self.documents(n)
        if self.kind is Kind.DILATED:
            return dilated_attention(q, k, v, cast(DilatedPattern, p), causal=self.causal, checkpoint=self.checkpoint,
                                     window=window, cu_seqlens=documents)
        if self.kind is Kind.RING:
            return ring_attention(
                q, k, v, ring_size=self.ring_size, causal=self.causal, layout=self.layout,
                checkpoint=self.checkpoint, window=window, cu_seqlens=documents,
            )
        if self.kind is Kind.RING_DILATED:
            return ring_dilated_attention(
                q, k, v, cast(DilatedPattern, p), ring_size=self.ring_size, causal=self.causal, layout=self.layout,
                checkpoint=self.checkpoint, window=window, cu_seqlens=documents,
            )
        # Only reachable by bypassing __post_init__; never fall through to some other function.
        raise ValueError(f"variant {self.name!r}: unknown kind {self.kind!r}")

    def reference(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, query_rows: torch.Tensor | Sequence[int] | None = None
    ) -> torch.Tensor:
        """SEMANTICS.md's dense definition of this variant's output (small ``N``, or a few ``query_rows``)."""
        n = q.shape[1]
        return reference_attention(q, k, v, pattern=self.pattern_for(n), causal=self.causal,
                                   query_rows=query_rows, window=self.window(n), cu_seqlens=self.documents(n))

    def supports(self, seq_len: int, num_heads: int) -> bool:
        """Whether ``N`` and ``H`` fit the variant's pattern and ring."""
        parts = (self.ring_size or 1) * chunks_per_rank(self.layout)
        if seq_len % parts:
            return False
        try:
            p = self.pattern_for(seq_len)
            if p is not None:
                p.check(seq_len, num_heads, self.documents(seq_len))
        except ValueError:
            return False
        return True

    def rank_pairs(self, seq_len: int, num_heads: int, num_kv_heads: int) -> tuple[int, ...]:
        """Each rank's attended (head, query, key) pairs per batch row, forward, counted from
        its plan's calls (:meth:`RankPlan.attended_pairs`): how evenly the ring shares the work."""
        if self.kind is Kind.DENSE:
            return (computed_pairs(None, seq_len, num_heads, is_causal=self.causal),)
        r = self.ring_size or 1
        plans = ring_plans(self.pattern_for(seq_len), seq_len, num_heads, num_kv_heads, self.mask(seq_len), r,
                           self.layout, range(r))
        return tuple(p.attended_pairs() for p in plans)

    def flops(self, batch: int, seq_len: int, num_heads: int, head_dim: int, *, backward: bool = False) -> float:
        """Effective FLOPs: ``4 D`` per score actually computed (QK^T and PV), x3.5 with backward."""
        pairs = computed_pairs(self.pattern_for(seq_len), seq_len, num_heads, is_causal=self.causal,
                               window=self.window(seq_len), documents=self.documents(seq_len))
        fwd = 4.0 * head_dim * batch * pairs
        return fwd * (1 + BACKWARD_FLOP_FACTOR) if backward else fwd


# Pretraining packs documents whose lengths are long-tailed: many short ones and a few that
# fill much of the sequence. A log-normal draw scaled to N gives that shape, from Python's
# own generator (not torch's), so the benchmarks' documents never change with torch.
# A function of its arguments alone: under torch.compile (a compiled variant) it is run
# once while tracing and its result taken as a constant, not traced (Dynamo cannot trace
# random.Random).
@torch.compiler.assume_constant_result  # type: ignore[untyped-decorator]  # unannotated in torch
def packed_documents(n: int, count: int, seed: int = 0, sigma: float = 1.5) -> tuple[int, ...]:
    """``cu_seqlens`` of ``count`` documents packed into ``N = n`` positions.

    Lengths are log-normal (``sigma`` sets the tail; 1.5 puts the longest of 64 documents
    at about a fifth of ``N``), each at least 1, summing to exactly ``n``.
    """
    if not 1 <= count <= n:
        raise ValueError(f"count must be between 1 and n={n}, got {count}")
    rng = random.Random(seed)
    draws = [math.exp(rng.gauss(0.0, sigma)) for _ in range(count)]
    total = sum(draws)
    lengths = [1 + int((n - count) * d / total) for d in draws]
    for i in range(n - sum(lengths)):  # the rounding's remainder, one position each
        lengths[i % count] += 1
    bounds = [0]
    for length in lengths:
        bounds.append(bounds[-1] + length)
    return tuple(bounds)


def quarter_half(mode: str) -> PatternFn:
    """The earlier project's pattern: segments ``(N/4, N/2)``, rates ``(1, 2)``."""
    return lambda n: DilatedPattern((max(n // 4, 1), max(n // 2, 1)), (1, 2), mode)


def longnet(mode: str = "mixture") -> PatternFn:
    """LongNet's fixed segments ``(256, 512, 1024)``, rates ``(1, 2, 4)``."""
    return lambda n: DilatedPattern((256, 512, 1024), (1, 2, 4), mode)


# The benchmark profiles keep these at their largest lengths (see ``large_n_devices``).
# CUDA_ONLY: on CPU two fewer run there (Production-checkpoint, ring-zigzag-causal4): their
# twins Production and StandardRingAttention already show what checkpointing and a causal
# ring cost, and the 2-core CPU run stays near 3 minutes.
EVERY_DEVICE = frozenset({"cpu", "cuda"})
CUDA_ONLY = frozenset({"cuda"})

_VARIANTS = [
    Variant("dense", "Full attention through torch SDPA (W = 1): the speed anchor.", Kind.DENSE,
            large_n_devices=EVERY_DEVICE),
    # --- the earlier project's names, each mapped to a correct configuration ---------
    Variant(
        "StandardRingAttention",
        "Textbook causal ring attention: W = [j <= i], 4 simulated ranks, contiguous shards "
        "(blocks above the diagonal skipped).",
        Kind.RING, ring_size=4, causal=True, from_earlier_project=True, large_n_devices=EVERY_DEVICE,
    ),
    *(
        Variant(
            f"RingAttention-ring{r}",
            f"Full attention (W = 1) over a simulated ring of {r} rank(s), contiguous shards.",
            Kind.RING, ring_size=r, from_earlier_project=True,
            large_n_devices=EVERY_DEVICE if r == 4 else frozenset(),
        )
        for r in (1, 2, 4)
    ),
    Variant(
        "ImprovedDilatedAttention",
        "Dilated attention, head_groups mode, segments (N/4, N/2), rates (1, 2), one device "
        "(also the earlier project's RingDilatedV2 on one rank: the same computation).",
        Kind.DILATED, pattern=quarter_half("head_groups"), from_earlier_project=True,
        large_n_devices=EVERY_DEVICE,
    ),
    *(
        Variant(
            f"RingDilatedV2-ring{r}",
            f"Ring dilated attention, head_groups mode, segments (N/4, N/2), rates (1, 2), "
            f"simulated ring of {r} ranks.",
            Kind.RING_DILATED, pattern=quarter_half("head_groups"), ring_size=r, from_earlier_project=True,
            large_n_devices=EVERY_DEVICE if r == 4 else frozenset(),
        )
        for r in (2, 4)
    ),
    *(
        Variant(name, doc, Kind.RING_DILATED, pattern=quarter_half("mixture"), ring_size=r, checkpoint=checkpoint,
                from_earlier_project=True, large_n_devices=large)
        for name, r, checkpoint, large, doc in (
            ("Production", 1, False, EVERY_DEVICE,
             "Ring dilated attention, mixture mode (LongNet's softmax-denominator mixing), "
             "segments (N/4, N/2), rates (1, 2), one rank, no checkpointing."),
            ("Production-checkpoint", 1, True, CUDA_ONLY,
             "Production with gradient checkpointing: the forward is recomputed in backward."),
            ("Production-ring4", 4, True, frozenset(),
             "Production over a simulated ring of 4 ranks, with gradient checkpointing (as the "
             "earlier project's Production_Ring4 ran)."),
        )
    ),
    # --- our own ----------------------------------------------------------------------
    Variant(
        "longnet",
        "LongNet's fixed segments (256, 512, 1024), rates (1, 2, 4), mixture mode, one device: "
        "cost linear in N.",
        Kind.DILATED, pattern=longnet(), large_n_devices=EVERY_DEVICE,
    ),
    Variant(
        "ring-zigzag-causal4",
        "Causal ring attention over 4 simulated ranks with the zigzag layout (balanced work).",
        Kind.RING, ring_size=4, causal=True, layout="zigzag", large_n_devices=CUDA_ONLY,
    ),
    Variant(
        "longnet-ring4-zigzag-causal",
        "Causal LongNet (256, 512, 1024) / (1, 2, 4) over 4 simulated ranks, zigzag layout.",
        Kind.RING_DILATED, pattern=longnet(), ring_size=4, causal=True, layout="zigzag",
        large_n_devices=EVERY_DEVICE,
    ),
    # --- what long-context training masks: sliding windows, packed documents -------------
    Variant(
        "ring4-window-causal",
        "Mistral-style sliding window: causal, keys i - N/8 .. i (window (N/8, 0)), over 4 "
        "simulated ranks, contiguous shards (keys no band reaches are never sent).",
        Kind.RING, ring_size=4, causal=True, window=lambda n: (n // 8, 0),
    ),
    *(
        Variant(name, "Causal attention within 64 packed documents of long-tailed lengths (packed_documents, "
                f"seed 0), over 4 simulated ranks, {doc}.", Kind.RING, ring_size=4, causal=True, layout=layout,
                documents=lambda n: packed_documents(n, min(64, n)))
        for name, layout, doc in (
            ("ring4-documents-causal", "zigzag", "zigzag layout"),
            ("ring4-documents-balanced-causal", "documents",
             "documents layout: 8R chunks dealt by their work within the documents, so every rank attends "
             "about as many pairs"),
        )
    ),
]

VARIANTS: dict[str, Variant] = {v.name: v for v in _VARIANTS}

# Other names of registered variants: the earlier project's spellings (underscores, its
# capitalisation), and the names of two former entries that computed the same function by the
# same route as the variant they now point to ("dilated-mixture" ran Production's mixture
# pattern, "RingDilatedV2-single" ImprovedDilatedAttention's head_groups pattern, each on one
# device). In the earlier project's benchmark scripts Production_NoCP / Production_CP
# (also Production_WithCP) are Production on one rank without / with gradient checkpointing
# ("CP": checkpointing), Production_Ring4 runs 4 ranks with checkpointing, and RingDilatedV2
# unsuffixed runs one rank.
ALIASES: dict[str, str] = {
    "Production_NoCP": "Production",
    "Production_CP": "Production-checkpoint",
    "Production_WithCP": "Production-checkpoint",
    "Production_Ring4": "Production-ring4",
    "RingDilatedV2": "ImprovedDilatedAttention",
    "RingDilatedV2_single": "ImprovedDilatedAttention",
    "RingDilatedV2-single": "ImprovedDilatedAttention",
    "RingDilatedV2_ring2": "RingDilatedV2-ring2",
    "RingDilatedV2_Ring4": "RingDilatedV2-ring4",
    "ImprovedDilated": "ImprovedDilatedAttention",
    "RingAttention_ring1": "RingAttention-ring1",
    "RingAttention_ring2": "RingAttention-ring2",
    "RingAttention_ring4": "RingAttention-ring4",
    "dilated-mixture": "Production",
}


def resolve(name: str) -> str:
    """The registered name for ``name`` (itself, or what the alias points to).

    Raises ``KeyError`` listing the known names and aliases.
    """
    if name in VARIANTS:
        return name
    if name in ALIASES:
        return ALIASES[name]
    raise KeyError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}; "
                   f"aliases: {', '.join(ALIASES)}")


def get(name: str) -> Variant:
    """The variant called ``name`` (a registered name or an alias); ``KeyError`` otherwise."""
    return VARIANTS[resolve(name)]


def aliases_of(name: str) -> list[str]:
    """The aliases that point to the registered variant ``name``."""
    return [alias for alias, target in ALIASES.items() if target == name]
