"""Seeded test inputs: the one place the tests build ``q``, ``k``, ``v`` and upstream gradients.

Values are drawn in float64 from a seeded ``torch.Generator`` (Hypothesis seeds ``random``
and numpy, never torch) and then cast, so every dtype sees the same numbers up to rounding
and a test is reproducible from its seed alone. Distributed ranks rebuild the same global
tensors from the same seed (tests/distributed_worker.py).

It is also the one helper module the test modules share (none imports another): the plan
cases of tiles and schedule, the check of ``entry.attend`` against the reference, a
recorder of kernel results, and a walk over a plan's objects.
"""

from __future__ import annotations

import dataclasses
import math

import torch

import ring_attention as ra
from ring_attention.entry import attend
from ring_attention.options import DEFAULT


def randn(shape, dtype=torch.float64, seed=0, scale=1.0, requires_grad=False) -> torch.Tensor:
    """One standard-normal tensor of ``shape``, times ``scale``, drawn from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    t = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    return t.requires_grad_(requires_grad)


def qkv(
    b, n, h, hkv, d, *, seed=0, dtype=torch.float64, requires_grad=False, magnitude=1.0,
    grad_out=False, dominant_key=None,
):
    """``q [B, N, H, D]``, ``k, v [B, N, Hkv, D]`` drawn in that order from one generator.

    Args:
        seed: the generator's seed.
        dtype: the tensors' dtype (drawn in float64, then cast).
        requires_grad: make ``q, k, v`` leaves that require grad.
        magnitude: multiplies ``q`` and ``k`` (scores grow as its square), not ``v``.
        grad_out: also return an upstream gradient ``g [B, N, H, D]``, drawn fourth
            (never requiring grad).
        dominant_key: a position ``j`` whose key dominates: every query gets ``3u`` added
            for a random unit vector ``u`` and ``k[:, j] = 8 sqrt(D) u``, so a query with
            ``<q, u> > 0`` (nearly all) scores key ``j`` about 20 above the rest (times
            ``magnitude**2``) and puts nearly all its weight there.

    Returns:
        ``(q, k, v)``, or ``(q, k, v, g)`` with ``grad_out``.
    """
    gen = torch.Generator().manual_seed(seed)
    shapes = [(b, n, h, d), (b, n, hkv, d), (b, n, hkv, d)] + ([(b, n, h, d)] if grad_out else [])
    drawn = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    if dominant_key is not None:  # drawn last, so the other tensors do not depend on it
        u = torch.randn(d, generator=gen, dtype=torch.float64)
        u = u / u.norm()
        drawn[0] = drawn[0] + 3 * u
        drawn[1][:, dominant_key] = 8 * math.sqrt(d) * u
    drawn[0], drawn[1] = drawn[0] * magnitude, drawn[1] * magnitude
    out = [t.to(dtype) for t in drawn]
    for t in out[:3]:
        t.requires_grad_(requires_grad)
    return tuple(out)


# --- ring cases, and comparing a function with the reference ------------------------------

LAYOUTS = ("contiguous", "zigzag")
HEADS = ((1, 1), (2, 1), (2, 2), (3, 1), (4, 1), (4, 2), (4, 4), (6, 2))  # (H, Hkv)
F64 = dict(atol=1e-10, rtol=1e-8)


def make_qkv(seed, b, n, h, hkv, d, dtype=torch.float64, requires_grad=True):
    """``q, k, v`` (leaves requiring grad) and an upstream gradient ``g``: the ring tests' inputs."""
    return qkv(b, n, h, hkv, d, seed=seed, dtype=dtype, requires_grad=requires_grad, grad_out=True)


def fwd_bwd(fn, q, k, v, g):
    """Output and ``(dq, dk, dv)`` of ``sum(fn(q, k, v) * g)``."""
    out = fn(q, k, v)
    return out, torch.autograd.grad(out, (q, k, v), g)


def assert_matches(got, want, grad_tol=None, **tol):
    """``(out, grads)`` against ``(ref, ref_grads)``: shapes, dtypes and values (``tol``; the
    gradients at ``grad_tol`` where given)."""
    out, grads = got
    ref, ref_grads = want
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, **tol, msg=lambda m: f"output: {m}")
    for name, a, b in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert a.dtype == b.dtype, f"{name} dtype {a.dtype} != {b.dtype}"
        torch.testing.assert_close(a, b, **(grad_tol or tol), msg=lambda m, name=name: f"{name}: {m}")


# --- helpers shared by several test modules ------------------------------------------------

# Plans of one rank that tests of tiles and of the schedule inspect: (pattern name, N, H, Hkv, causal).
PLAN_PATTERNS = {
    "mixture": ra.DilatedPattern((64, 128), (1, 2)),
    "longnet": ra.DilatedPattern((16, 32, 64), (1, 2, 4)),
    "sparse": ra.DilatedPattern((32, 64), (2, 4)),  # some rows see no key
    "head_groups": ra.DilatedPattern((32, 64), (1, 2), mode="head_groups"),
}
PLAN_CASES = [
    (name, n, h, hkv, causal)
    for name in PLAN_PATTERNS
    for n, h, hkv in ((256, 4, 4), (128, 4, 2), (256, 8, 2))
    for causal in (False, True)
]


def leaves(tensors, dtype):
    """Detached copies of ``tensors`` in ``dtype`` that require grad."""
    return [t.detach().to(dtype).requires_grad_() for t in tensors]


def check_against_reference(q, k, v, leaves_, pattern, causal, g, options=DEFAULT):
    """``entry.attend`` (one device, ``options``) against the float64 reference: output, and
    the gradients of ``sum(out * g)`` with respect to ``leaves_``."""
    ref_in = leaves((q, k, v), torch.float64)
    ref = ra.reference_attention(*ref_in, pattern=pattern, causal=causal)
    out = attend(q, k, v, pattern, causal=causal, options=options)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    got = torch.autograd.grad((out * g).sum(), leaves_)
    expected = torch.autograd.grad((ref * g).sum(), ref_in)
    for a, e in zip(got, expected):
        torch.testing.assert_close(a.reshape(e.shape) if a.shape == e.shape else a, e, rtol=1e-9, atol=1e-10)


def recording(monkeypatch, name):
    """Wrap ``kernels.<name>``: returns the list of its results' storage addresses (the
    results are kept alive, so no later allocation can reuse an address)."""
    from ring_attention import kernels

    seen, kept, fn = [], [], getattr(kernels, name)

    def recorded(*args, **kwargs):
        results = fn(*args, **kwargs)
        kept.append(results)
        seen.extend(t.untyped_storage().data_ptr() for t in results)
        return results

    monkeypatch.setattr(kernels, name, recorded)
    return seen


def walk(obj, seen=None):
    """Every object reachable from ``obj`` through dataclass fields, tuples, lists and dicts."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    yield obj
    if dataclasses.is_dataclass(obj):
        children = [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    elif isinstance(obj, (tuple, list)):
        children = list(obj)
    elif isinstance(obj, dict):
        children = [*obj.keys(), *obj.values()]
    else:
        children = []
    for child in children:
        yield from walk(child, seen)


def record_row_tiles(monkeypatch) -> list[bool]:
    """Record, for every plan built from here on, whether it found row tiles (the executable
    plans are cleared first, so the next call builds its plan and its tiles)."""
    from ring_attention import executable

    used: list[bool] = []
    real = executable.row_tiles

    def recording(*args, **kwargs):
        found = real(*args, **kwargs)
        used.append(found is not None)
        return found

    monkeypatch.setattr(executable, "row_tiles", recording)
    executable.clear()
    return used



def record_sent_bytes(monkeypatch) -> list[int]:
    """Count the bytes a simulated ring sends from here on: a one-element list, updated on
    every exchange."""
    from ring_attention import comm

    sent, real = [0], comm.SimulatedRing.exchange

    def exchange(self, shift, sends, specs, device):
        sent[0] += sum(t.numel() * t.element_size() for ts in sends.values() for t in ts)
        return real(self, shift, sends, specs, device)

    monkeypatch.setattr(comm.SimulatedRing, "exchange", exchange)
    return sent
