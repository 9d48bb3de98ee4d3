"""ring_attention: long-context attention, exact against a dense reference.

LongNet dilated attention, ring attention across ``torch.distributed`` ranks, and the
two combined. Every function computes one formula of ``SEMANTICS.md``:

    import ring_attention as ra
    p = ra.DilatedPattern(segment_lengths=(2048, 4096), dilation_rates=(1, 2))
    ra.reference_attention(q, k, v, pattern=p)      # dense oracle, small N
    ra.dense_attention(q, k, v)                     # torch SDPA, the speed anchor
    ra.dilated_attention(q, k, v, p)                # one device
    ra.ring_attention(q, k, v, group=g)             # this rank's shard of full attention
    ra.ring_dilated_attention(q, k, v, p, ring_size=4)  # a 4-rank ring simulated in-process

Tensors are ``[B, N, H, D]`` (``k``/``v`` may have fewer heads: grouped-query attention).
"""

from .dense import dense_attention
from .dilated import dilated_attention
from .layout import Layout, shard, unshard
from .modules import DilatedAttention, MultiheadDilatedAttention, RingDilatedAttention
from .pattern import DilatedPattern, Mode
from .reference import reference_attention
from .ring import ring_attention
from .ring_dilated import ring_dilated_attention

__all__ = [
    "DilatedAttention",
    "DilatedPattern",
    "Layout",
    "Mode",
    "MultiheadDilatedAttention",
    "RingDilatedAttention",
    "dense_attention",
    "dilated_attention",
    "reference_attention",
    "ring_attention",
    "ring_dilated_attention",
    "shard",
    "unshard",
]

__version__ = "0.1.0"
