"""What a plan is made of: row sets, kernel calls, blocks, messages and ring steps.

Everything here is plain Python (ints, ranges, tuples): a plan holds no tensor and no
device, so it is built once per shape and serves CPU, CUDA, meta and fake tensors
alike. Row sets turn into a slice (when evenly spaced) or an index tensor only when an
executor needs them, through :func:`index`, which caches CPU tensors (per fake-tensor
mode) and builds others on their device at every call.

Vocabulary:

- a *unit* is one (pair, head offset) of the dilated pattern: its heads keep the same
  rows (SEMANTICS.md's ``sel_k(h, p)``), packed into a dense block;
- a *run* is a stretch of packed rows lying in one segment and one contiguous interval
  of the shard; runs of equal length that follow each other batch into one kernel
  call (:class:`Call`);
- a :class:`Block` pairs packed query rows of this rank with packed key rows from a
  *source*: the rank's own shard, or a message received at a :class:`Step`;
- a :class:`Step` is one shift of the ring: what this rank sends to ``rank + shift``,
  what it receives from ``rank - shift``, and the blocks it computes with that.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Union

import torch

from .masks import KernelMask, kept_cells

Index = Union[slice, torch.Tensor]
# What tensors cached per device are keyed by: the device and the id of a fake-tensor mode.
DeviceKey = tuple[torch.device, Union[int, None]]
# CPU index tensors of row sets, per device and fake mode: an executable plan holds one.
IndexCache = dict[tuple["Rows", DeviceKey], torch.Tensor]


@dataclasses.dataclass(frozen=True, eq=False)
class Rows:
    """An ordered set of indices as arithmetic progressions (``range`` objects).

    Compared and hashed by identity: plans are cached, so the same ``Rows`` object comes
    back on every call and its index tensors are cached on it.
    """

    ranges: tuple[range, ...]

    @staticmethod
    def of(values: Iterable[int] | range) -> Rows:
        """Rows from ascending or arbitrary ints, merged into as few ranges as possible."""
        if isinstance(values, range):
            return Rows((values,) if len(values) else ())
        return Rows(merge_ranges(range(v, v + 1) for v in values))

    def __len__(self) -> int:
        return sum(len(r) for r in self.ranges)

    def as_slice(self) -> slice | None:
        """The rows as a slice, when they are one increasing progression."""
        if len(self.ranges) != 1 or self.ranges[0].step <= 0:
            return None
        r = self.ranges[0]
        return slice(r.start, r.start + len(r) * r.step, r.step)

    def values(self) -> list[int]:
        return [i for r in self.ranges for i in r]

    def sub(self, start: int, stop: int) -> Rows:
        """The rows at positions ``[start, stop)`` of this ordered set."""
        out, pos = [], 0
        for r in self.ranges:
            lo, hi = max(start - pos, 0), min(stop - pos, len(r))
            if lo < hi:
                out.append(r[lo:hi])
            pos += len(r)
        return Rows(merge_ranges(out))


def merge_ranges(ranges: Iterable[range]) -> tuple[range, ...]:
    """Join consecutive ranges that continue one arithmetic progression."""
    out: list[range] = []
    for r in ranges:
        if not len(r):
            continue
        if out:
            prev = out[-1]
            step = r.start - prev[-1]
            if step > 0 and (len(prev) == 1 or prev.step == step) and (len(r) == 1 or r.step == step):
                out[-1] = range(prev.start, r[-1] + step, step)
                continue
        out.append(r)
    return tuple(out)


def device_key(like: torch.Tensor) -> DeviceKey:
    """What a tensor cached for ``like`` is keyed by: its device and its fake-tensor mode."""
    mode = getattr(like, "fake_mode", None)
    return (like.device, None if mode is None else id(mode))


def index(rows: Rows, like: torch.Tensor, cache: IndexCache | None = None) -> Index:
    """``rows`` as a slice, or as an int64 index tensor on ``like``'s device.

    On the CPU the tensor is kept in ``cache`` (an executable plan's), per device and fake
    mode: a tensor made under one FakeTensorMode is never handed to another mode or to a
    real run. On other devices it is built on the device at every call, from ``arange``: no
    host-to-device copy, which a CUDA graph cannot capture, and no CUDA tensor kept (one made
    while torch.compile(mode="reduce-overhead") captures a graph lives in the graph's pool,
    which the next replay overwrites or frees).
    """
    as_slice = rows.as_slice()
    if as_slice is not None:
        return as_slice
    if like.device.type != "cpu":
        return device_index(rows, like.device)
    key = (rows, device_key(like))
    hit = None if cache is None else cache.get(key)
    if hit is None:
        # The tensor holds a reference to its fake mode, so the id in the key stays unique.
        hit = torch.tensor(rows.values(), dtype=torch.int64, device=like.device)
        if cache is not None:
            cache[key] = hit
    return hit


def device_index(rows: Rows, device: torch.device) -> torch.Tensor:
    """``rows`` as an int64 tensor built on ``device`` by arange arithmetic.

    The row sets of plans are mostly grids, ``start + i * outer + j * inner`` (equal runs of
    one step at evenly spaced starts; a grouped-query ``kv_index`` such as ``[0, 0, 1, 1]``
    has ``inner = 0``): two or three launches. Other sets join one progression per range.
    """
    ranges = rows.ranges
    steps = {r.step for r in ranges if len(r) > 1}
    starts = [r.start for r in ranges]
    outers = {b - a for a, b in zip(starts, starts[1:])}
    if len({len(r) for r in ranges}) == 1 and len(steps) <= 1 and len(outers) <= 1:
        inner = steps.pop() if steps else 0
        n, length = len(ranges), len(ranges[0])
        outer = _progression(starts[0], n, outers.pop() if outers else 0, device)[:, None]
        if inner == 0:
            return outer.expand(n, length).reshape(-1)
        return (outer + _progression(0, length, inner, device)).reshape(-1)
    return torch.cat([_progression(r.start, len(r), r.step, device) for r in ranges])


def _progression(start: int, count: int, step: int, device: torch.device) -> torch.Tensor:
    if step == 0:
        return torch.full((count,), start, dtype=torch.int64, device=device)
    return torch.arange(start, start + count * step, step, dtype=torch.int64, device=device)


@dataclasses.dataclass(frozen=True, eq=False)
class Call:
    """One batched kernel call: ``runs`` query runs against as many key runs, pairwise.

    ``q_start``/``k_start`` are packed row positions in the block's query and key rows;
    ``q_rows`` are the shard rows the call's output lands on.
    """

    q_start: int
    k_start: int
    runs: int
    q_len: int
    k_len: int
    mask: KernelMask  # CAUSAL: a square diagonal block; Band: a block cut by a window
    q_rows: Rows


@dataclasses.dataclass(frozen=True, eq=False)
class Block:
    """Packed query rows of one unit against packed key rows of one source.

    With ``offsets = O > 1`` the block stands for units ``unit .. unit+O-1`` at once: the
    head offsets of one pair, whose rows and heads are those of ``unit`` shifted by
    ``o`` (rows and heads are then progressions). Their calls run as one batch of ``O``.
    """

    unit: int  # index into RankPlan.units
    q_rows: Rows  # rows of the query shard, packed order
    heads: slice  # query heads
    k_rows: Rows  # rows of the key source, packed order
    kv_index: Rows  # for each query head, its head in the key source
    source: int | None  # None: the rank's own shard; i: the i-th message received at the step
    calls: tuple[Call, ...]
    offsets: int = 1


@dataclasses.dataclass(frozen=True, eq=False)
class Message:
    """Rows and kv heads of the sender's K/V shard, sent as one K and one V tensor.

    With ``offsets = O > 1`` it stands for the messages of ``O`` units at once, the head
    offsets of one pair: offset ``o`` carries ``rows`` and ``kv_heads`` shifted by ``o``,
    and the tensors are ``[B, O, M, h, D]`` (a strided view on the sender), packed as the
    receiver's block of ``O`` offsets takes them.
    """

    rows: Rows  # rows of the sender's k/v shard (of offset 0)
    kv_heads: Rows  # kv heads sent (of offset 0)
    offsets: int = 1


@dataclasses.dataclass(frozen=True, eq=False)
class Step:
    shift: int
    sends: tuple[Message, ...]  # to (rank + shift) % R
    receives: tuple[tuple[int, int, int], ...]  # (rows, kv heads, offsets) of each message from (rank - shift) % R
    blocks: tuple[Block, ...]  # computed with what arrives


@dataclasses.dataclass(frozen=True)
class Unit:
    pair: int  # which (w, r) pair of the pattern
    heads: range  # its query heads (one head offset)


EMPTY_STEP = Step(0, (), (), ())


@dataclasses.dataclass(frozen=True, eq=False)
class RankPlan:
    """Everything one rank computes and exchanges, forward and backward.

    ``relay``: a neighbour ring. At shift ``s`` every rank passes the K/V shard it holds
    (its own at shift 1, then the one received at ``s - 1``) to ``rank + 1``, so the shard
    of ``rank - s`` arrives at shift ``s``; dK/dV travel the same way, one hop behind,
    and reach their owner after the last shift. Otherwise messages go straight from
    ``rank`` to ``rank + s`` and dK/dV straight back.
    """

    rank: int
    ring_size: int
    units: tuple[Unit, ...]
    local: tuple[Block, ...]
    steps: dict[int, Step]  # by shift; shifts with no traffic for this rank are absent
    relay: bool = False

    def step(self, shift: int) -> Step:
        return self.steps.get(shift, EMPTY_STEP)

    def attended_pairs(self) -> int:
        """The (query head, query, key) pairs this rank's calls attend, forward: the rank's
        share of the work (a call's kept cells, times its runs, offsets and heads)."""
        total = 0
        for blk in (*self.local, *(b for s in self.steps.values() for b in s.blocks)):
            heads = len(range(blk.heads.start, blk.heads.stop, blk.heads.step or 1))
            for c in blk.calls:
                total += kept_cells(c.mask, c.q_len, c.k_len) * c.runs * blk.offsets * heads
        return total
