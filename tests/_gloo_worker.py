"""Cases run inside spawned gloo ranks by test_distributed_gloo.py.

Each rank builds the same seeded global tensors, takes its shard, runs the distributed
call, and compares its output shard and its shard's gradients with the dense reference on
the whole sequence. Results go to a JSON file per rank (tensors do not survive a spawned
process's exit).
"""

from __future__ import annotations

import datetime
import json
import os
import traceback

import torch
import torch.distributed as dist

import ring_attention as ra
from ring_attention import layout as _layout


def _case_error(case, rank, world):
    torch.manual_seed(case["seed"])
    b, n, h, hkv, d = case["shape"]
    q = torch.randn(b, n, h, d, dtype=torch.float64)
    k = torch.randn(b, n, hkv, d, dtype=torch.float64)
    v = torch.randn(b, n, hkv, d, dtype=torch.float64)
    g = torch.randn(b, n, h, d, dtype=torch.float64)
    lay, causal = case["layout"], case["causal"]
    pattern = ra.DilatedPattern(*case["pattern"]) if case.get("pattern") else None

    full = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = ra.reference_attention(*full, pattern=pattern, causal=causal, scale=case.get("scale"))
    ref_grads = torch.autograd.grad(ref, full, g)

    mine = [_layout.split(x, world, lay)[rank].clone().requires_grad_() for x in (q, k, v)]
    kwargs = dict(group=dist.group.WORLD, causal=causal, layout=lay, scale=case.get("scale"))
    if case.get("checkpoint"):
        kwargs["checkpoint"] = True
    if pattern is None:
        out = ra.ring_attention(*mine, **kwargs)
    else:
        out = ra.ring_dilated_attention(*mine, pattern, **kwargs)
    grads = torch.autograd.grad(out, mine, _layout.split(g, world, lay)[rank])
    errs = [(out - _layout.split(ref, world, lay)[rank]).abs().max().item()]
    errs += [(a - _layout.split(b, world, lay)[rank]).abs().max().item() for a, b in zip(grads, ref_grads)]
    return max(errs)


def _bad_call(case, rank, world):
    """Run a malformed call; return the exception it raised on this rank."""
    n_local = case["n_local"] + (case.get("extra_on_rank1", 0) if rank == 1 else 0)
    q = torch.randn(1, n_local, 2, 4)
    kwargs = dict(group=dist.group.WORLD, layout=case.get("layout", "contiguous"))
    if "ring_size" in case:
        kwargs["ring_size"] = case["ring_size"]
    try:
        if case.get("pattern"):
            ra.ring_dilated_attention(q, q, q, ra.DilatedPattern(*case["pattern"]), **kwargs)
        else:
            ra.ring_attention(q, q, q, **kwargs)
    except (ValueError, TypeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def run(rank, world, port, cases_path, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    with open(cases_path) as f:
        cases = json.load(f)
    results = []
    try:
        for case in cases:
            try:
                if case["kind"] == "bad":
                    results.append({"raised": _bad_call(case, rank, world)})
                else:
                    results.append({"error": _case_error(case, rank, world)})
            except Exception:  # noqa: BLE001 - reported to the test, which fails on it
                results.append({"crash": traceback.format_exc()})
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()
