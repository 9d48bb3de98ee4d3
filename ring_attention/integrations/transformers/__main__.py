"""``python -m ring_attention.integrations.transformers --check llama,qwen2,mistral``.

Prints the parity of a backend with transformers' ``sdpa`` per model family (see
:func:`~ring_attention.integrations.transformers.check_parity`) and exits 1 when a difference
exceeds ``--tol``. Under ``torchrun`` the ranks form a gloo group and each runs its shard::

    torchrun --nproc_per_node 2 -m ring_attention.integrations.transformers --check llama --layout zigzag
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

from ...pattern import DilatedPattern, Mode
from . import check_parity
from .parity import FAMILIES


def _pattern(text: str) -> DilatedPattern:
    pairs = [item.split(":") for item in text.split(",")]
    return DilatedPattern(segment_lengths=tuple(int(w) for w, _ in pairs),
                          dilation_rates=tuple(int(r) for _, r in pairs), mode=Mode.MIXTURE)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ring_attention.integrations.transformers",
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", default=",".join(FAMILIES), help="model families, comma-separated")
    parser.add_argument("--pattern", type=_pattern, help="dilated attention, e.g. 16:1,32:2 (segment:rate)")
    parser.add_argument("--ring-size", type=int, help="a ring simulated in this process")
    parser.add_argument("--layout", default="contiguous", choices=("contiguous", "zigzag", "documents"))
    parser.add_argument("--documents", help="packed documents' cu_seqlens, e.g. 0,5,30,64")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--dtype", default="float64", choices=("float64", "float32"))
    parser.add_argument("--tol", type=float, help="largest difference allowed (1e-9 in float64, 1e-4 in float32)")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    tol = args.tol if args.tol is not None else 1e-9 if dtype == torch.float64 else 1e-4
    documents = None if args.documents is None else tuple(int(c) for c in args.documents.split(","))
    group = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
        group = dist.group.WORLD
    worst = 0.0
    try:
        for family in args.check.split(","):
            parity = check_parity(family, pattern=args.pattern, group=group, ring_size=args.ring_size,
                                  layout=args.layout, cu_seqlens=documents, seq_len=args.seq_len, dtype=dtype)
            worst = max(worst, parity.logits, parity.gradient)
            if group is None or dist.get_rank() == 0:
                print(parity, flush=True)
        if group is not None:
            dist.barrier()  # no rank tears the group down while another still uses it
    finally:
        if group is not None:
            dist.destroy_process_group()
    if worst > tol:
        print(f"FAIL: largest difference {worst:.2e} > {tol:.0e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
