"""Validating ring inputs on every rank at once, so bad input never leaves a rank waiting.

In a process group each rank checks every argument of its own call, then all ranks
exchange what they found (their error, or a signature of their inputs: shapes, dtype,
flags, pattern, scale, checkpointing) in one ``all_gather_object`` *before* any P2P. If
one rank's input is malformed or the ranks disagree, every rank raises, with a message
that names the values, instead of the healthy ranks blocking in a receive that never
comes.

How often the ranks agree is :func:`agreement_policy`'s answer. On gloo (CPU) they agree
on every call: one ``all_gather`` of a 16-byte digest per rank, and the full exchange only
when the digests differ, so a rank whose input changes alone (a short last batch on one
rank) raises on every rank instead of hanging until the process group's timeout. On
NCCL the digest's round trip is a host synchronization, so by default a call whose
signature the group already agreed on skips it (ranks must then change their inputs
together, as a training loop does); ``RING_ATTENTION_AGREEMENT=every_call`` turns the
check on for every call there too.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import hashlib
import os
import weakref
from typing import NamedTuple, Union, cast

import torch
import torch.distributed as dist

from . import layout as _layout
from . import pattern as _pattern
from .checks import Shapes, check_documents, check_flag, check_qkv, check_scale, check_window
from .comm import ProcessGroupRing, Ring, SimulatedRing


class _Signature(NamedTuple):
    """What every rank of a ring must agree on: it fixes the plan and the messages."""

    N: int
    B: int
    H: int
    Hkv: int
    D: int
    dtype: str
    device_type: str
    causal: bool
    layout: _layout.Layout
    pattern: str
    scale: float
    checkpoint: bool
    window: tuple[int, int] | None
    documents: tuple[int, ...] | None


class Agreement(enum.Enum):
    """How often the ranks of a group check that they agree on their inputs."""

    EVERY_CALL = "every_call"  # a digest all_gather before each call's P2P
    CACHED = "cached"  # once per (group, signature): a rank changing its input alone hangs


AGREEMENT_ENV = "RING_ATTENTION_AGREEMENT"


def agreement_policy(group: dist.ProcessGroup) -> Agreement:
    """``RING_ATTENTION_AGREEMENT`` (``every_call`` or ``cached``) if set, else by backend.

    gloo checks every call (a CPU collective of 16 bytes per rank costs about as much as
    one small kernel); NCCL caches, since its check waits on the device.
    """
    value = os.environ.get(AGREEMENT_ENV, "").strip().lower()
    if value:
        try:
            return Agreement(value)
        except ValueError:
            raise ValueError(
                f"{AGREEMENT_ENV}={value!r}: expected one of "
                + ", ".join(repr(a.value) for a in Agreement)
            ) from None
    return Agreement.CACHED if dist.get_backend(group) == "nccl" else Agreement.EVERY_CALL


# How a disagreement names a field: by the argument it comes from.
_LABELS = {
    "N": "sequence length N (q.shape[1] x R)",
    "B": "batch size (q.shape[0])",
    "H": "query heads (q.shape[2])",
    "Hkv": "kv heads (k.shape[2])",
    "D": "head dim (q.shape[3])",
    "documents": "cu_seqlens",
}

FULL = object()  # the ``pattern`` of full attention: ring_attention passes it, users never do

# group -> its agreed signatures (LRU). Weakly keyed: a cache must not keep a process group
# alive past destroy_process_group, or gloo's threads are torn down at interpreter exit.
_AGREED: weakref.WeakKeyDictionary[dist.ProcessGroup, collections.OrderedDict[_Signature, None]] = (
    weakref.WeakKeyDictionary()
)
_MAX_AGREED = 1024  # per group; every rank evicts the same entries: they see the same calls


class Checked(NamedTuple):
    """The checked arguments of a call, as every rank of its ring agreed on them."""

    shapes: Shapes  # global: seq_len is the whole sequence's N
    scale: float
    causal: bool
    layout: _layout.Layout
    checkpoint: bool
    window: tuple[int, int] | None  # None: no window, (-1, -1) included
    documents: tuple[int, ...] | None  # cu_seqlens; None: one document


def _local_checks(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ring_size: object, layout: object, causal: object,
    scale: object, pattern: object, checkpoint: object, sharded: bool, window: object = None,
    cu_seqlens: object = None,
) -> tuple[int, Checked]:
    size = _layout.check_ring_size(ring_size)
    checked_layout = _layout.check_layout(layout)
    checked_causal = check_flag(causal, "causal")
    checked_checkpoint = check_flag(checkpoint, "checkpoint")
    checked_window = check_window(window)
    checked_pattern = None if pattern is FULL else _pattern.as_pattern(pattern)
    shapes = check_qkv(q, k, v)
    checked_scale = check_scale(scale, shapes.head_dim)
    n = shapes.seq_len * size if sharded else shapes.seq_len
    per = _layout.chunks_per_rank(checked_layout)
    if sharded and shapes.seq_len % per:
        raise ValueError(f"{checked_layout} shards hold {per} equal chunks: this rank's length {shapes.seq_len} "
                         f"is not divisible by {per}")
    _layout.check_divisible(n, size, checked_layout)
    documents = check_documents(cu_seqlens, n)
    if checked_pattern is not None:
        checked_pattern.check(n, shapes.heads, documents)
    return size, Checked(shapes._replace(seq_len=n), checked_scale, checked_causal, checked_layout,
                         checked_checkpoint, checked_window, documents)


def _refuse_local_in_distributed_job(ring_size: object) -> None:
    """``group=None`` in a multi-process job is almost always a forgotten ``group=``."""
    if ring_size is None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise ValueError(
            f"group=None inside a distributed job of {dist.get_world_size()} processes would attend "
            "over this process's input alone: pass group=torch.distributed.group.WORLD (or a subgroup) "
            "for a ring across the ranks, or ring_size=1 (or R) to compute the whole sequence here"
        )


def _describe(pattern: object) -> str:
    if pattern is FULL:
        return "full"
    pattern = cast(_pattern.DilatedPattern, pattern)  # checked by _local_checks
    return f"{pattern.mode} {tuple(zip(pattern.segment_lengths, pattern.dilation_rates))}"


def collective_device(group: dist.ProcessGroup, q: torch.Tensor | None = None) -> torch.device:
    """Where ``group``'s collectives take their tensors: the CPU for gloo; for NCCL ``q``'s CUDA
    device, or this process's current one."""
    if dist.get_backend(group) != "nccl":
        return torch.device("cpu")
    if isinstance(q, torch.Tensor) and q.is_cuda:
        return q.device
    return torch.device("cuda", torch.cuda.current_device())


def _check_nccl_device(group: dist.ProcessGroup, q: torch.Tensor) -> None:
    if dist.get_backend(group) == "nccl":
        if not q.is_cuda:
            raise ValueError(f"the process group uses NCCL, which needs CUDA tensors: q is on {q.device}")
        current = torch.cuda.current_device()
        if q.device.index != current:
            raise ValueError(
                f"q is on {q.device} but this process's current CUDA device is cuda:{current}: call "
                "torch.cuda.set_device(local_rank) before using an NCCL group"
            )


def _digest(signature: _Signature | None) -> torch.Tensor:
    """16 bytes that differ between different signatures; all zero for a rank in error.

    A hash of ``repr``, not Python's ``hash``: that one is salted per process.
    """
    if signature is None:
        return torch.zeros(2, dtype=torch.int64)
    raw = hashlib.blake2b(repr(tuple(signature)).encode(), digest_size=16).digest()
    return torch.frombuffer(bytearray(raw), dtype=torch.int64) | 1  # never all zero


def _digests_agree(signature: _Signature | None, group: dist.ProcessGroup, size: int, device: torch.device) -> bool:
    """Whether every rank holds ``signature`` (one all_gather); ``False`` sends all ranks on to
    the full exchange, which names what differs (every rank sees the same digests)."""
    mine = _digest(signature).to(device)
    every = [torch.empty_like(mine) for _ in range(size)]
    dist.all_gather(every, mine, group)
    return signature is not None and bool(torch.stack(every).eq(mine).all())  # one host sync


def check_ring_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group: dist.ProcessGroup | None, ring_size: object,
    causal: object, scale: object, layout: object, pattern: object = FULL, checkpoint: object = False,
    window: object = None, cu_seqlens: object = None,
) -> tuple[Ring, Checked]:
    """Validate and return ``(ring, checked arguments)``."""
    if group is None:
        _refuse_local_in_distributed_job(ring_size)
        size, checked = _local_checks(q, k, v, ring_size, layout, causal, scale, pattern, checkpoint, False, window,
                                      cu_seqlens)
        return SimulatedRing(size), checked

    ring = ProcessGroupRing(group)
    error: ValueError | TypeError | None = None
    result: Checked | None = None
    signature: _Signature | None = None
    policy = Agreement.EVERY_CALL
    try:
        policy = agreement_policy(group)
        if ring_size is not None:
            size = _layout.check_ring_size(ring_size)
            if size != ring.size:
                raise ValueError(
                    f"ring_size={size} does not match the process group's size {ring.size}; "
                    "pass one or the other"
                )
        result = _local_checks(q, k, v, ring.size, layout, causal, scale, pattern, checkpoint, True, window,
                               cu_seqlens)[1]
        _check_nccl_device(group, q)
        shapes = result.shapes
        signature = _Signature(
            shapes.seq_len, shapes.batch, shapes.heads, shapes.kv_heads, shapes.head_dim,
            str(q.dtype).removeprefix("torch."), q.device.type, result.causal, result.layout, _describe(pattern),
            result.scale, result.checkpoint, result.window, result.documents,
        )
    except (ValueError, TypeError) as exc:
        error = exc
    agreed = _AGREED.setdefault(group, collections.OrderedDict())
    if policy is Agreement.CACHED and error is None and signature in agreed:
        agreed.move_to_end(cast(_Signature, signature))  # no error: the signature is set
        return ring, cast(Checked, result)  # no error: the checks returned

    device = collective_device(group, q)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        if _digests_agree(signature if error is None else None, group, ring.size, device):
            _remember(agreed, cast(_Signature, signature))  # the digests agree on a signature
            return ring, cast(Checked, result)
        every: list[tuple[str | None, _Signature | None] | None] = [None] * ring.size
        dist.all_gather_object(every, (None if error is None else f"{type(error).__name__}: {error}", signature), group)
    if error is not None:
        raise error
    # all_gather_object filled every slot; a rank's signature is None only beside its error.
    gathered = cast(list[tuple[Union[str, None], _Signature]], every)
    bad = [f"rank {r}: {e}" for r, (e, _) in enumerate(gathered) if e is not None]
    if bad:
        raise ValueError("other ranks of the ring rejected their inputs (" + "; ".join(bad) + ")")
    signatures = [s for _, s in gathered]
    diffs = [
        f"{_LABELS.get(name, name)}: " + ", ".join(f"rank {r}={s[i]}" for r, s in enumerate(signatures))
        for i, name in enumerate(_Signature._fields)
        if len({s[i] for s in signatures}) > 1
    ]
    if diffs:
        raise ValueError("the ranks' shards or arguments disagree (" + "; ".join(diffs) + ")")
    _remember(agreed, cast(_Signature, signature))  # no rank failed, all signatures agree
    return ring, cast(Checked, result)


def _remember(agreed: collections.OrderedDict[_Signature, None], signature: _Signature) -> None:
    agreed[signature] = None
    if len(agreed) > _MAX_AGREED:
        agreed.popitem(last=False)

