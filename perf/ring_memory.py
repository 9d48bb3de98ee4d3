"""Per-rank peak activation memory of the ring functions, measured on real gloo ranks.

    python -m perf.ring_memory [--seq-len 8192] [--ring-sizes 1 2 4]

The one-process simulation holds every rank's state in one process, so a rank's own
footprint is measured where it lives: each of ``R`` spawned gloo ranks measures the peak
memory its own call allocates beyond its inputs (the perf suite's meter: CUDA allocator
peak, or the CPU profiler's allocation events), forward and forward+backward. Prints a
markdown table with the ratio to the single-device (``R = 1``) figure.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ring_attention as ra
from perf.measure import peak_memory_bytes

CASES = {
    "ring_attention": None,
    "ring_dilated (N/4, N/2)/(1, 2) mixture": lambda n: ra.DilatedPattern((n // 4, n // 2), (1, 2)),
    "ring_dilated LongNet (256, 512, 1024)/(1, 2, 4)": lambda n: ra.DilatedPattern((256, 512, 1024), (1, 2, 4)),
}


def _rank(rank, world, port, n, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    torch.manual_seed(0)
    shard = n // world
    q, k, v = (torch.randn(1, shard, 8, 64, requires_grad=True) for _ in range(3))
    result = {}
    for name, pattern_fn in CASES.items():
        def call(pattern_fn=pattern_fn):
            if pattern_fn is None:
                return ra.ring_attention(q, k, v, group=dist.group.WORLD)
            return ra.ring_dilated_attention(q, k, v, pattern_fn(n), group=dist.group.WORLD)

        def fwd():
            with torch.no_grad():
                call()

        def fwd_bwd():
            call().sum().backward()

        fwd_bwd()  # warm-up: plans are cached, first-call allocations are not counted
        result[name] = (peak_memory_bytes(fwd, "cpu"), peak_memory_bytes(fwd_bwd, "cpu"))
        q.grad = k.grad = v.grad = None
    with open(os.path.join(out_dir, f"{world}-{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(n: int, ring_sizes) -> dict:
    """``{R: {case: (max fwd bytes over ranks, max fwd+bwd bytes over ranks)}}``."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in ring_sizes:
            mp.start_processes(_rank, args=(world, _free_port(), n, tmp), nprocs=world, start_method="spawn")
            ranks = [json.load(open(os.path.join(tmp, f"{world}-{r}.json"))) for r in range(world)]
            out[world] = {
                name: tuple(max(rk[name][i] for rk in ranks) for i in range(2)) for name in CASES
            }
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--ring-sizes", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    res = measure(args.seq_len, args.ring_sizes)
    base = res[min(res)]
    print(f"Per-rank peak activation memory, CPU, B=1, N={args.seq_len}, H=8, D=64, fp32 (MiB; ratio to R={min(res)})\n")
    print("| case | R | forward | fwd+bwd |")
    print("| --- | --- | --- | --- |")
    for world, cases in res.items():
        for name, (f, fb) in cases.items():
            bf, bfb = base[name]
            print(f"| {name} | {world} | {f / 2**20:.1f} ({f / bf:.2f}) | {fb / 2**20:.1f} ({fb / bfb:.2f}) |")


if __name__ == "__main__":
    main()
