"""Validating ring inputs on every rank at once, so bad input never leaves a rank waiting.

In a process group each rank checks its own shard, then all ranks exchange a small
summary (ok flag, shapes, dtype, flags) in one ``all_gather`` *before* any P2P. If one
rank's shard is malformed or the shards disagree, every rank raises, with a message that
names the problem, instead of the healthy ranks blocking in a receive that never comes.
"""

from __future__ import annotations

import struct
import zlib

import torch
import torch.distributed as dist

from . import layout as _layout
from . import pattern as _pattern
from ._checks import SUPPORTED_DTYPES, check_flag, check_qkv, check_scale
from .comm import ProcessGroupRing, SimulatedRing


def _local_checks(q, k, v, ring_size, layout, causal, scale, pattern, sharded):
    layout = _layout.check_layout(layout)
    causal = check_flag(causal, "causal")
    shapes = check_qkv(q, k, v)
    scale = check_scale(scale, shapes.head_dim)
    n = shapes.seq_len * ring_size if sharded else shapes.seq_len
    if sharded and layout == "zigzag" and shapes.seq_len % 2:
        raise ValueError(
            f"zigzag shards hold two equal chunks: this rank's length {shapes.seq_len} is odd"
        )
    _layout.check_divisible(n, ring_size, layout)
    if pattern is not None:
        pattern.check(n, shapes.heads)
    return shapes._replace(seq_len=n), scale, causal, layout


def _summary_device(group):
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_ring_inputs(q, k, v, *, group, ring_size, causal, scale, layout, pattern=None):
    """Validate and return ``(ring, global shapes, scale, causal, layout)``."""
    ring_size_arg = ring_size
    ring_size = _layout.check_ring_size(ring_size)
    if pattern is not None:
        pattern = _pattern.as_pattern(pattern)
    if group is None:
        ring = SimulatedRing(ring_size)
        return (ring, *_local_checks(q, k, v, ring_size, layout, causal, scale, pattern, False))

    ring = ProcessGroupRing(group)
    error, result, summary = None, None, [0] * 11
    try:
        if ring_size_arg is not None and ring_size_arg != ring.size:
            raise ValueError(
                f"ring_size={ring_size} does not match the process group's size {ring.size}; "
                "pass one or the other"
            )
        result = _local_checks(q, k, v, ring.size, layout, causal, scale, pattern, True)
        shapes = result[0]
        summary = [
            1, shapes.seq_len, shapes.batch, shapes.heads, shapes.kv_heads, shapes.head_dim,
            SUPPORTED_DTYPES.index(q.dtype), int(result[2]), _layout.LAYOUTS.index(result[3]),
            zlib.crc32(repr(pattern).encode()),  # every rank must build the same plan
            struct.unpack("<q", struct.pack("<d", result[1]))[0],  # the scale's bits
        ]
    except (ValueError, TypeError) as exc:
        error = exc
    every = ring.all_gather_ints(summary, _summary_device(group))
    if error is not None:
        raise error
    bad = [r for r, s in enumerate(every) if s[0] == 0]
    if bad:
        raise ValueError(f"ranks {bad} of the ring rejected their inputs; see the error raised there")
    if any(s != every[0] for s in every):
        names = ("ok", "N", "B", "H", "Hkv", "D", "dtype", "causal", "layout", "pattern", "scale")
        diffs = [
            f"{name}: " + ", ".join(f"rank {r}={s[i]}" for r, s in enumerate(every))
            for i, name in enumerate(names)
            if len({s[i] for s in every}) > 1
        ]
        raise ValueError("the ranks' shards or arguments disagree (" + "; ".join(diffs) + ")")
    return (ring, *result)

