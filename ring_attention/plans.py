"""Building the packed-block plans of dilated attention, for one device or a ring.

For every pair ``(w, r)`` and head offset ``o`` (SEMANTICS.md), the heads with that
offset keep the same rows: ``(p mod w') mod r == o``. A rank packs its kept rows into a
dense block; a *run* is a stretch of packed rows lying in one segment and one interval
of the shard. Attention then only pairs runs of the same segment:

- runs on the same rank are computed locally, with no communication: the same run is a
  diagonal block (block-causal when ``causal``), runs of different intervals are full
  blocks, or skipped when causal and the keys come after the queries;
- runs on another rank arrive at the ring step whose shift joins the two ranks: the
  sender sends only its kept rows, of the segments the receiver also holds (and under
  ``causal``, only runs that precede one of the receiver's runs). Runs held by different
  ranks never overlap, so such a block is either full or skipped.

Everything here is index arithmetic done once per shape and cached; the tensors it
produces are index tensors (or slices where the rows are evenly spaced) that
:mod:`ring_attention.packed` uses to gather and scatter rows.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from . import layout as _layout
from .packed import Block, Call, Message, Plan, Step
from .pattern import DilatedPattern


class _Run(NamedTuple):
    segment: int
    first: int  # global position of the run's first row (orders runs of different ranks)
    start: int  # packed index of its first row
    length: int


class _Rows(NamedTuple):
    """The rows one rank keeps for one (pair, offset): local indices and runs."""

    local: torch.Tensor  # int64 local row indices, packed order
    runs: tuple[_Run, ...]


def _as_index(values: list[int] | torch.Tensor, device) -> slice | torch.Tensor:
    """A slice when the values are evenly spaced and increasing, else an index tensor."""
    t = torch.as_tensor(values, dtype=torch.int64)
    if t.numel() == 1:
        return slice(int(t[0]), int(t[0]) + 1, 1)
    if t.numel() > 1:
        step = int(t[1] - t[0])
        if step > 0 and bool((t[1:] - t[:-1] == step).all()):
            return slice(int(t[0]), int(t[-1]) + 1, step)
    return t.to(device)


def _kept_rows(seq_len, ring_size, rank, layout, segment, rate, offset) -> _Rows:
    pieces, runs, base, start = [], [], 0, 0
    for a, b in _layout.shard_intervals(seq_len, ring_size, rank, layout):
        pos = torch.arange(a, b)
        keep = pos[(pos % segment) % rate == offset]
        if keep.numel():
            segs, counts = torch.unique_consecutive(keep // segment, return_counts=True)
            firsts = keep[torch.cumsum(counts, 0) - counts]
            for s, c, f in zip(segs.tolist(), counts.tolist(), firsts.tolist()):
                runs.append(_Run(s, f, start, c))
                start += c
            pieces.append(keep - a + base)
        base += b - a
    local = torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.int64)
    return _Rows(local, tuple(runs))


def _batch_calls(pairs) -> list[list]:
    """Group ``(q_run, k_run, causal)`` pairs into batched calls.

    Consecutive pairs join one call when their runs follow each other in both packed
    orders and have the same lengths and mask.
    """
    calls = []
    for q, k, causal in pairs:
        if calls:
            c = calls[-1]
            if (
                c[5] == causal
                and c[3] == q.length
                and c[4] == k.length
                and q.start == c[0] + c[2] * c[3]
                and k.start == c[1] + c[2] * c[4]
            ):
                c[2] += 1
                continue
        calls.append([q.start, k.start, 1, q.length, k.length, causal])
    return calls


def _block_pairs(q_runs, k_runs, causal: bool, same_rank: bool):
    by_segment: dict[int, list[_Run]] = {}
    for k in k_runs:
        by_segment.setdefault(k.segment, []).append(k)
    pairs = []
    for q in q_runs:
        for k in by_segment.get(q.segment, ()):
            if same_rank and k.start == q.start:
                pairs.append((q, k, causal))  # diagonal block
            elif not causal or k.first < q.first:
                pairs.append((q, k, False))  # full block; runs never overlap otherwise
    return pairs


class _Coverage:
    """Which (row, head) cells a call already wrote, so first writes skip the merge."""

    def __init__(self, n: int, heads: int):
        self.done = torch.zeros(n, heads, dtype=torch.bool)

    def fresh(self, rows: torch.Tensor, heads: slice) -> bool:
        cells = self.done[rows][:, heads]
        was_fresh = not bool(cells.any())
        sub = self.done[rows]
        sub[:, heads] = True
        self.done[rows] = sub
        return was_fresh


def _block(q_rows: _Rows, heads: slice, k_index, kv_index, source, pairs, coverage, device):
    calls = []
    for q_start, k_start, runs, q_len, k_len, causal in _batch_calls(pairs):
        rows = q_rows.local[q_start : q_start + runs * q_len]
        fresh = coverage.fresh(rows, heads)
        calls.append(Call(q_start, k_start, runs, q_len, k_len, causal, fresh))
    return Block(
        q_rows=_as_index(q_rows.local, device),
        heads=heads,
        k_rows=k_index,
        kv_index=kv_index,
        source=source,
        calls=tuple(calls),
    )


def _head_slice(heads: range, rate: int, offset: int) -> slice:
    first = heads.start + (offset - heads.start) % rate
    return slice(first, heads.stop, rate)


@functools.lru_cache(maxsize=64)
def dilated_plan(
    pattern: DilatedPattern | None,
    seq_len: int,
    num_heads: int,
    num_kv_heads: int,
    causal: bool,
    ring_size: int = 1,
    layout: str = "contiguous",
    device: torch.device = torch.device("cpu"),
) -> Plan:
    """The plan of dilated attention (full attention if ``pattern is None``) on a ring.

    ``ring_size=1`` is single-device dilated attention: local blocks only.
    """
    if pattern is None:
        pattern = DilatedPattern((seq_len,), (1,))
    group = num_heads // num_kv_heads
    segments = pattern.effective_segment_lengths(seq_len)
    n_local = seq_len // ring_size

    # Every (pair, offset) with at least one head: its heads and every rank's kept rows.
    units = []
    for seg, rate, heads in zip(segments, pattern.dilation_rates, pattern.heads_of_pair(num_heads)):
        for offset in range(rate):
            hs = _head_slice(heads, rate, offset)  # heads h with head_offset(h, rate) == offset
            head_list = list(range(*hs.indices(num_heads)))
            if not head_list:
                continue
            kept = [_kept_rows(seq_len, ring_size, r, layout, seg, rate, offset) for r in range(ring_size)]
            units.append((hs, head_list, kept))

    coverage = {r: _Coverage(n_local, num_heads) for r in range(ring_size)}
    local = {}
    for r in range(ring_size):
        blocks = []
        for hs, head_list, kept in units:
            rows = kept[r]
            pairs = _block_pairs(rows.runs, rows.runs, causal, same_rank=True)
            if not pairs:
                continue
            kv_index = _as_index([h // group for h in head_list], device)
            k_index = _as_index(rows.local, device)
            blocks.append(_block(rows, hs, k_index, kv_index, None, pairs, coverage[r], device))
        local[r] = tuple(blocks)

    steps = []
    for shift in range(1, ring_size):
        sends, received_blocks = {}, {}
        for dst in range(ring_size):
            src = (dst - shift) % ring_size
            msgs, blocks = [], []
            for hs, head_list, kept in units:
                q_rows, k_rows = kept[dst], kept[src]
                q_segments = {}
                for q in q_rows.runs:
                    q_segments[q.segment] = max(q_segments.get(q.segment, -1), q.first)
                needed = [
                    k for k in k_rows.runs
                    if k.segment in q_segments and (not causal or k.first < q_segments[k.segment])
                ]
                if not needed:
                    continue
                # Repack the needed runs as the message's rows, in the sender's order.
                sent = torch.cat([k_rows.local[k.start : k.start + k.length] for k in needed])
                moved, start = [], 0
                for k in needed:
                    moved.append(k._replace(start=start))
                    start += k.length
                pairs = _block_pairs(q_rows.runs, moved, causal, same_rank=False)
                if not pairs:
                    continue
                kv_heads = sorted({h // group for h in head_list})
                msgs.append(Message(rows=_as_index(sent, device), kv_heads=_as_index(kv_heads, device)))
                kv_index = _as_index([kv_heads.index(h // group) for h in head_list], device)
                blocks.append(
                    _block(q_rows, hs, slice(0, start, 1), kv_index, len(msgs) - 1, pairs, coverage[dst], device)
                )
            if msgs:
                sends[src] = tuple(msgs)
                received_blocks[dst] = tuple(blocks)
        if sends:
            steps.append(Step(shift=shift, sends=sends, blocks=received_blocks))
    return Plan(ring_size=ring_size, local=local, steps=tuple(steps))
