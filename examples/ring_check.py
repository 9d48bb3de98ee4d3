"""Check ring attention on a real process group against the dense reference.

    torchrun --nproc_per_node=4 examples/ring_check.py [--seq-len 1024] [--dtype float32]

Every rank builds the same seeded global ``q, k, v`` (``[B, N, H, D]``), takes its own
shard, and runs ``ring_attention`` and ``ring_dilated_attention`` (a LongNet-like pattern)
forward and backward on the process group. It compares its output shard and its shard's
``dq, dk, dv`` with ``reference_attention`` on the whole sequence (the reference builds an
``[H, N, N]`` matrix, so keep ``N`` around a thousand), prints its max errors, and rank 0
prints ``OK`` or ``MISMATCH``. The exit status is non-zero on a mismatch.

Backend: NCCL with one GPU per rank (``LOCAL_RANK``) when there are at least as many GPUs
as ranks on the node, gloo on CPU otherwise (saying so when GPUs were seen but too few).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch
import torch.distributed as dist

import ring_attention as ra

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Tolerance on max |ring - reference|, relative to max |reference| (at least 1).
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=int(os.environ.get("RING_CHECK_SEQ_LEN", 1024)))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=None, help="grouped-query attention (default: --heads)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def longnet_pattern(n: int) -> ra.DilatedPattern:
    """LongNet's geometric pattern, scaled to N: segments N/4, N/2, N with rates 1, 2, 4."""
    return ra.DilatedPattern((n // 4, n // 2, n), (1, 2, 4), mode="mixture")


def pick_device(local_rank: int, local_world: int) -> tuple[torch.device, str, str | None]:
    """``(device, backend, note)``: one GPU per rank with NCCL, or the CPU with gloo.

    NCCL refuses two ranks on one GPU, so with fewer GPUs than ranks on this node the
    check runs on the CPU, and ``note`` says why.
    """
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus >= local_world:
        return torch.device("cuda", local_rank), "nccl", None
    note = f"{gpus} GPU(s) for {local_world} ranks on this node: running on the CPU with gloo" if gpus else None
    return torch.device("cpu"), "gloo", note


def main() -> int:
    args = parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device, backend, note = pick_device(local_rank, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    if note and rank == 0:
        print(note, file=sys.stderr, flush=True)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if device.type == "cuda":
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=120), device_id=device)
    else:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=120))
    group = dist.group.WORLD

    b, n, h, d = args.batch, args.seq_len, args.heads, args.head_dim
    hkv = args.kv_heads or h
    gen = torch.Generator().manual_seed(args.seed)  # same tensors on every rank
    q, k, v, g = (
        torch.randn(b, n, heads, d, generator=gen).to(device=device, dtype=dtype)
        for heads in (h, hkv, hkv, h)
    )

    checks = [
        ("ring contiguous causal", None, "contiguous", True),
        ("ring zigzag causal", None, "zigzag", True),
        ("ring zigzag full", None, "zigzag", False),
        ("dilated contiguous full", longnet_pattern(n), "contiguous", False),
        ("dilated zigzag causal", longnet_pattern(n), "zigzag", True),
    ]
    tol = TOLERANCE[dtype]
    failed = False
    for name, pattern, layout, causal in checks:
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = ra.reference_attention(*full, pattern=pattern, causal=causal)
        ref_grads = torch.autograd.grad(ref, full, g)

        def mine(t, layout=layout):
            return ra.shard(t, world, layout)[rank].contiguous()

        shard = [mine(t).requires_grad_() for t in (q, k, v)]
        if pattern is None:
            out = ra.ring_attention(*shard, group=group, causal=causal, layout=layout)
        else:
            out = ra.ring_dilated_attention(*shard, pattern, group=group, causal=causal, layout=layout)
        grads = torch.autograd.grad(out, shard, mine(g))

        errors = {}
        for key, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
            want = mine(want).float()
            errors[key] = (got.float() - want).abs().max().item() / max(1.0, want.abs().max().item())
        mine_bad = not all(err <= tol for err in errors.values())  # NaN counts as bad
        flag = torch.tensor([float(mine_bad)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        failed |= bool(flag.item())
        line = " ".join(f"{key}={err:.2e}" for key, err in errors.items())
        lines = [None] * world  # rank 0 prints every rank's line, in rank order
        dist.all_gather_object(lines, f"rank {rank}: {name:<24} {line} {'MISMATCH' if mine_bad else 'OK'}")
        if rank == 0:
            print("\n".join(lines), flush=True)

    dist.barrier()
    if rank == 0:
        print(
            f"{'MISMATCH' if failed else 'OK'}: ring attention on {world} ranks ({backend}, {dtype}, "
            f"B={b} N={n} H={h} Hkv={hkv} D={d}) matches the dense reference",
            flush=True,
        )
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
