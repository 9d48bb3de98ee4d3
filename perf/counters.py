"""Deterministic cost counters of one call: nothing here is timed.

    python -m perf.counters --variant longnet --n 8192            # one variant, both passes
    python -m perf.counters --variant dense,RingAttention-ring4 --n 1024,8192 --dtype float32
    python -m perf.counters --all --n 8192

Time on a shared machine moves with its neighbours; these numbers do not, so the gate can
hold them exactly (a rise of one fails). Per call of a variant, forward (``fwd``, under
``no_grad``) or forward and backward (``fwd+bwd``, ``torch.autograd.grad``, as the
benchmarks call it):

* ``launches``: aten calls that would launch a kernel on a GPU (:func:`launches_kernel`):
  eager PyTorch pays host time per launch whatever N is. The count depends on N only where
  the executor trades launches for memory (``Options.max_gather_bytes``, ``min_split_bytes``).
* ``fused_calls``: calls of the fused attention ops (``aten._scaled_dot_product_*attention*``).
* ``peak_bytes``: peak of the bytes held by storages the call's ops created (inputs
  excluded), counted from the op outputs a ``TorchDispatchMode`` sees and freed by
  finalizers on their storages. Exact and device-independent: a kernel's internal scratch
  (sized by thread count on CPU) is not an op output. ``peak_memory_bytes`` in the
  benchmarks is the allocator's view, scratch included.
* ``bytes_sent``: bytes a rank hands to ``SimulatedRing.exchange`` per call, the busiest
  rank's (what a process group would send over the wire); 0 for single-device variants.
* ``flops``: effective FLOPs (``Variant.flops``: ``4 D`` per computed score, x3.5 with backward).
* ``busiest_rank_pairs``: the (head, query, key) pairs the busiest rank attends, forward,
  from its plan's calls (``Variant.rank_pairs``, times the batch): a ring's imbalance, which
  its slowest rank sets the pace by (the documents layout keeps it near the mean).

Every count follows one warm call of the same shape, so plan caches are built and each
counted call sees what every later call sees.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import fnmatch
import functools
import gc
import weakref
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

PASSES = ("fwd", "fwd+bwd")
FIELDS = ("launches", "fused_calls", "peak_bytes", "bytes_sent", "flops", "busiest_rank_pairs")

# aten calls that launch no kernel: allocation without initialization, aliasing, metadata.
NO_LAUNCH = frozenset({
    "aten.empty.memory_format", "aten.empty_strided.default", "aten.empty_like.default",
    "aten.empty_permuted.default", "aten.new_empty.default", "aten.new_empty_strided.default",
    "aten.detach.default", "aten._unsafe_view.default", "aten.alias.default",
    "aten.lift_fresh.default", "prim.device.default", "aten._local_scalar_dense.default",
    "aten.sym_size.int", "aten.sym_stride.int", "aten.sym_numel.default",
    "aten.sym_storage_offset.default", "aten.is_contiguous.default", "aten.resize_.default",
    "aten.set_.source_Storage_storage_offset", "aten.promote_types.default",
})
FUSED_PATTERN = "aten._scaled_dot_product_*attention*"


@functools.cache
def is_view(func) -> bool:
    """The op returns an alias of an input that it does not write: a view, no kernel."""
    return any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


@functools.cache
def launches_kernel(func) -> bool:
    """Whether the aten op ``func`` would launch a kernel: not a view, not in :data:`NO_LAUNCH`.

    The one definition of a launch: ``tests/fake_cuda.py`` counts with it too.
    """
    return str(func) not in NO_LAUNCH and not is_view(func)


@functools.cache
def is_fused(func) -> bool:
    """A fused attention op (flash, memory-efficient, cuDNN, CPU flash), forward or backward."""
    return fnmatch.fnmatchcase(str(func), FUSED_PATTERN)


@functools.cache
def _aliases(func) -> bool:
    """The op returns an alias of an input (a view, or an in-place / ``out=`` write)."""
    return any(r.alias_info is not None for r in func._schema.returns)


def _storage(t: torch.Tensor):
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # tensors without a storage
        return None


class Meter(TorchDispatchMode):
    """Counts launches and fused calls, and the live bytes of the storages ops create.

    A storage is counted once, when an op that aliases nothing returns it, unless an argument
    of that op already holds it (``_unsafe_view`` and friends return their input's storage);
    a finalizer takes its bytes off when the storage is freed (CPython frees at once; the
    caller disables the cyclic collector so a cycle frees at the same point every time).
    """

    def __init__(self):
        super().__init__()
        self.launches = 0
        self.fused_calls = 0
        self.live_bytes = 0
        self.peak_bytes = 0
        self._live: dict[int, int] = {}  # storage id -> bytes

    def _freed(self, key: int) -> None:
        self.live_bytes -= self._live.pop(key, 0)

    def _track(self, out, args, kwargs) -> None:
        held = {s._cdata for t in tree_flatten((args, kwargs))[0]
                if isinstance(t, torch.Tensor) and (s := _storage(t)) is not None}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or (s := _storage(t)) is None:
                continue
            key, nbytes = s._cdata, s.nbytes()
            if nbytes == 0 or key in self._live or key in held:
                continue
            self._live[key] = nbytes
            self.live_bytes += nbytes
            weakref.finalize(s, self._freed, key).atexit = False
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.launches += launches_kernel(func)
        self.fused_calls += is_fused(func)
        if not _aliases(func):
            self._track(out, args, kwargs)
        return out


@contextlib.contextmanager
def ring_traffic():
    """Yields ``Counter: rank -> bytes handed to SimulatedRing.exchange`` while the block runs."""
    from ring_attention.comm import SimulatedRing

    sent: collections.Counter = collections.Counter()
    exchange = SimulatedRing.exchange

    def counted(self, shift, sends, specs, device):
        for rank, tensors in sends.items():
            sent[rank] += sum(t.numel() * t.element_size() for t in tensors)
        return exchange(self, shift, sends, specs, device)

    with mock.patch.object(SimulatedRing, "exchange", counted):
        yield sent


@dataclasses.dataclass(frozen=True)
class Counters:
    """The counters of one call (see the module docstring)."""

    launches: int
    fused_calls: int
    peak_bytes: int
    bytes_sent: int
    flops: float
    busiest_rank_pairs: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def call_of(fn, q, k, v, grad_out=None, backward: bool = False):
    """One call of ``fn`` as the benchmarks make it: a no-grad forward, or ``autograd.grad``."""
    if not backward:
        def forward():
            with torch.no_grad():
                fn(q, k, v)

        return forward
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    grad_out = torch.ones_like(q) if grad_out is None else grad_out

    def forward_backward():
        torch.autograd.grad(fn(*leaves), leaves, grad_out)

    return forward_backward


def count_call(call) -> tuple[Meter, collections.Counter]:
    """Run ``call`` once under the meter and the ring hook; return both."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        with ring_traffic() as sent, Meter() as meter:
            call()
    finally:
        if was_enabled:
            gc.enable()
    return meter, sent


def count(variant, q, k, v, grad_out=None, *, backward: bool = False, warm: bool = True) -> Counters:
    """The counters of one call of ``variant`` on ``q, k, v`` (``[B, N, H, D]``).

    ``warm``: make one uncounted call first, so plans are cached as every later call finds
    them (``False`` when the caller has just called the variant at this shape itself).
    """
    call = call_of(variant, q, k, v, grad_out, backward)
    if warm:
        call()
    meter, sent = count_call(call)
    b, n, h, d = q.shape
    return Counters(
        launches=meter.launches,
        fused_calls=meter.fused_calls,
        peak_bytes=meter.peak_bytes,
        bytes_sent=max(sent.values(), default=0),
        flops=float(variant.flops(b, n, h, d, backward=backward)),
        busiest_rank_pairs=b * max(variant.rank_pairs(n, h, k.shape[2])),
    )


def inputs(batch: int, n: int, heads: int, dim: int, dtype: str = "float32", device: str = "cpu"):
    """Seeded ``q, k, v, grad_out`` of shape ``[B, N, H, D]`` (the counts do not depend on values)."""
    gen = torch.Generator(device="cpu").manual_seed(1234 + n)
    shape = (batch, n, heads, dim)
    return [torch.randn(shape, generator=gen).to(device=device, dtype=getattr(torch, dtype)) for _ in range(4)]


def counters_for(variant, batch: int, n: int, heads: int, dim: int, dtype: str = "float32",
                 device: str = "cpu", passes=PASSES) -> dict[str, Counters]:
    """``{pass: Counters}`` of ``variant`` (a :class:`~ring_attention.registry.Variant`) at one shape."""
    q, k, v, grad_out = inputs(batch, n, heads, dim, dtype, device)
    return {mode: count(variant, q, k, v, grad_out, backward=mode == "fwd+bwd") for mode in passes}


def line(name: str, n: int, per_pass: dict[str, Counters]) -> str:
    """One printed line: ``name N=... launches_fwd=... launches_fwd_bwd=... ...``."""
    parts = [f"{name} N={n}"]
    for field in FIELDS:
        for mode, c in per_pass.items():
            value = getattr(c, field)
            parts.append(f"{field}_{mode.replace('+', '_')}={value:.6g}" if field == "flops"
                         else f"{field}_{mode.replace('+', '_')}={value}")
    return " ".join(parts)


def main(argv=None) -> int:
    from perf.options import DTYPES, positive_int, seq_lens, variant_names
    from ring_attention import registry

    parser = argparse.ArgumentParser(prog="python -m perf.counters", description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--variant", "--variants", dest="variants", type=variant_names,
                       help="comma-separated registry names or aliases")
    which.add_argument("--all", action="store_true", help="every registry variant")
    parser.add_argument("--n", type=seq_lens, required=True, help="comma-separated sequence lengths")
    parser.add_argument("--batch", type=positive_int, default=1)
    parser.add_argument("--heads", type=positive_int, default=8)
    parser.add_argument("--dim", type=positive_int, default=64)
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--pass", dest="passes", choices=PASSES, action="append",
                        help="fwd or fwd+bwd (repeatable; default both)")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="torch threads while counting (the counts do not depend on it; default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = list(registry.VARIANTS) if args.all else args.variants
    print(f"# counters per call: B={args.batch} H={args.heads} D={args.dim} {args.dtype} cpu")
    for n in args.n:
        for name in names:
            variant = registry.VARIANTS[name]
            if not variant.supports(n, args.heads):
                print(f"{name} N={n} unsupported (N, H do not fit its pattern or ring)")
                continue
            per_pass = counters_for(variant, args.batch, n, args.heads, args.dim, args.dtype,
                                    passes=args.passes or PASSES)
            print(line(name, n, per_pass), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
