"""Check ring attention and ring dilated attention across real ranks against the reference.

    torchrun --nproc_per_node=4 examples/ring_check.py [--seq-len 1024] [--layout zigzag]

gloo on CPU; NCCL with one GPU per rank when CUDA is available. Every rank builds the
same seeded global q, k, v, takes its shard, runs forward and backward, and compares its
output shard and its shard's gradients with the dense reference on the whole sequence.
Prints one line per rank and case; exits non-zero on a mismatch.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch
import torch.distributed as dist

import ring_attention as ra
from ring_attention import layout as _layout


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--layout", default="zigzag", choices=_layout.LAYOUTS)
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda") if use_cuda else torch.device("cpu")
    dtype = torch.float32

    torch.manual_seed(0)
    n, h, hkv, d = args.seq_len, args.heads, args.kv_heads, args.head_dim
    q = torch.randn(1, n, h, d, device=device, dtype=dtype)
    k = torch.randn(1, n, hkv, d, device=device, dtype=dtype)
    v = torch.randn(1, n, hkv, d, device=device, dtype=dtype)
    g = torch.randn(1, n, h, d, device=device, dtype=dtype)
    pattern = ra.DilatedPattern((n // 8, n // 4, n // 2), (1, 2, 4), mode="mixture")

    def shard(x):
        return _layout.split(x, world, args.layout)[rank].contiguous()

    ok = True
    for name, causal, pat in (
        ("ring_attention", False, None),
        ("ring_attention causal", True, None),
        ("ring_dilated_attention", False, pattern),
        ("ring_dilated_attention causal", True, pattern),
    ):
        full = [x.double().cpu().requires_grad_() for x in (q, k, v)]
        ref = ra.reference_attention(*full, pattern=pat, causal=causal)
        ref_grads = torch.autograd.grad(ref, full, g.double().cpu())

        mine = [shard(x).requires_grad_() for x in (q, k, v)]
        kw = dict(group=dist.group.WORLD, causal=causal, layout=args.layout)
        out = ra.ring_attention(*mine, **kw) if pat is None else ra.ring_dilated_attention(*mine, pat, **kw)
        grads = torch.autograd.grad(out, mine, shard(g))
        errs = [(out.double().cpu() - shard(ref)).abs().max().item()]
        errs += [(a.double().cpu() - shard(b)).abs().max().item() for a, b in zip(grads, ref_grads)]
        err = max(errs)
        good = err < 1e-4
        ok &= good
        print(f"rank {rank}/{world} {name:32s} max error {err:.2e} {'OK' if good else 'MISMATCH'}", flush=True)

    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
