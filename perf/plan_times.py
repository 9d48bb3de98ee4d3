"""Host-side costs that do not depend on a device: plan builds, and calls on meta tensors.

    python -m perf.plan_times            # N = 128K, H = 8, D = 64

Prints, for every registry variant, the time to build the plans of all its ranks from
empty caches; for a new packing of 64 documents on a ring of 8 (what every batch of
packed documents may cost), the build of the executable plan of one rank and of all 8;
the balance of a causal ring of 4 over them (the busiest rank's attended pairs over
the idlest's); for rings of 256, the build of one rank (what each process of a job builds)
and of all 256 (a one-process simulation); and the first and a repeated call on meta
tensors, where no arithmetic runs and what remains is the library's own host time plus
torch's per-op meta kernels. Times are the best of a few runs on this machine.
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

import ring_attention as ra
from ring_attention import executable, plans, registry
from ring_attention.executable import PlanKey
from ring_attention.layout import Layout
from ring_attention.masks import SequenceMask
from ring_attention.options import DEFAULT
from ring_attention.registry import packed_documents


def best_seconds(build, repeats=3) -> float:
    """Best time of ``build()`` from empty caches (the planner's and the executable plans')."""
    best = float("inf")
    for _ in range(repeats):
        executable.clear()
        gc.collect()
        start = time.perf_counter()
        build()
        best = min(best, time.perf_counter() - start)
    return best


def build_seconds(pattern, n, heads, causal, ring_size, layout, ranks, repeats=3) -> float:
    """Best time to build the plans of ``ranks`` from empty caches."""
    return best_seconds(lambda: plans.ring_plans(pattern, n, heads, heads, causal, ring_size, layout, tuple(ranks)),
                        repeats)


def document_seconds(n, heads, dim, causal, layout, ranks, repeats=3) -> float:
    """Best time to build the executable plan (plans, schedule, tiles, views) of ``ranks``
    on a ring of 8 for 64 packed documents, from empty caches."""
    mask = SequenceMask(causal=causal, documents=packed_documents(n, 64))
    key = PlanKey(None, n, heads, heads, mask, 8, layout, tuple(ranks), 1, dim, torch.bfloat16, DEFAULT)
    return best_seconds(lambda: executable.executable_plan(key), repeats)


def balance(n, layout, ring_size=4) -> list[int]:
    """Each rank's attended pairs (one head), causal, over 64 packed documents."""
    mask = SequenceMask(causal=True, documents=packed_documents(n, 64))
    return [p.attended_pairs() for p in plans.ring_plans(None, n, 1, 1, mask, ring_size, layout, range(ring_size))]


def meta_seconds(fn, n, heads, dim, repeats=3) -> tuple[float, float]:
    """(first call, best repeated call) of ``fn(q, k, v)`` on meta tensors ``[1, n, heads, dim]``."""
    q, k, v = (torch.empty(1, n, heads, dim, device="meta") for _ in range(3))
    executable.clear()
    start = time.perf_counter()
    fn(q, k, v)
    first = time.perf_counter() - start
    again = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(q, k, v)
        again.append(time.perf_counter() - start)
    return first, min(again)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=128 * 1024)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    args = parser.parse_args(argv)
    n, h = args.n, args.heads
    print(f"# plan builds, N={n} H={h}: all ranks of each registry variant")
    for v in registry.VARIANTS.values():
        if v.kind is registry.Kind.DENSE:
            continue
        r = v.ring_size or 1
        t = build_seconds(v.pattern_for(n), n, h, v.causal, r, v.layout, range(r))
        print(f"{v.name:30s} R={r}  {t * 1e3:8.1f} ms")
    print(f"# executable plans for a new packing of 64 documents, N={n} H={h}, R=8: one rank, all 8")
    for layout in Layout:
        for causal in (True, False):
            one = document_seconds(n, h, args.dim, causal, layout, (3,))
            every = document_seconds(n, h, args.dim, causal, layout, range(8))
            name = f"{layout.value}{' causal' if causal else ''}"
            print(f"{name:30s} one {one * 1e3:8.1f} ms   all 8 {every * 1e3:9.1f} ms")
    print(f"# per-rank attended pairs, causal, N={n}, R=4, 64 packed documents: busiest / idlest rank")
    for layout in Layout:
        pairs = balance(n, layout)
        print(f"{layout.value:30s} max/min {max(pairs) / min(pairs):6.3f}   max {max(pairs):.4g}   min {min(pairs):.4g}")
    longnet = ra.DilatedPattern((256, 512, 1024), (1, 2, 4))
    rings = (("zigzag causal", None, True, "zigzag"), ("full", None, False, "contiguous"),
             ("LongNet", longnet, False, "contiguous"),
             ("mixture (N/4, N/2)/(1, 2)", ra.DilatedPattern((n // 4, n // 2), (1, 2)), False, "contiguous"))
    print(f"# plan builds, N={n} H={h}, R=256: one rank (a process of a job), all ranks (a simulation)")
    for name, pattern, causal, layout in rings:
        one = build_seconds(pattern, n, h, causal, 256, layout, (17,))
        every = build_seconds(pattern, n, h, causal, 256, layout, range(256), repeats=1)
        print(f"{name:30s} one {one * 1e3:8.1f} ms   all 256 {every * 1e3:9.1f} ms")
    print(f"# calls on meta tensors, N={n} H={h} D={args.dim}")
    calls = {
        "dilated (N/4, N/2)/(1, 2)": lambda q, k, v: ra.dilated_attention(q, k, v, ra.DilatedPattern((n // 4, n // 2), (1, 2))),
        "LongNet": lambda q, k, v: ra.dilated_attention(q, k, v, longnet),
        "8-rank zigzag causal ring": lambda q, k, v: ra.ring_attention(q, k, v, ring_size=8, causal=True, layout="zigzag"),
        "LongNet 8-rank ring": lambda q, k, v: ra.ring_dilated_attention(q, k, v, longnet, ring_size=8),
    }
    for name, fn in calls.items():
        first, again = meta_seconds(fn, n, h, args.dim)
        print(f"{name:30s} first {first * 1e3:8.1f} ms   repeated {again * 1e3:8.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
