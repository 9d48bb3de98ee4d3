"""One rank of a real gloo ring, run as a script by tests/test_distributed.py.

    RANK=r WORLD_SIZE=R MASTER_ADDR=127.0.0.1 MASTER_PORT=p python tests/distributed_worker.py CASES OUT

``CASES`` is a JSON list of cases; every rank runs all of them in order, in one process
group, and writes ``OUT/rank{r}.json`` (rewritten after every case, so a hang still shows
how far each rank got). Tensors never leave the process: each rank builds the same seeded
global tensors, takes its own shard, and records plain numbers (max errors against the
dense reference on the whole sequence, or the exception a bad call raised).

Case kinds:

- ``ok``: forward and dq/dk/dv of this rank's shard (backward of ``sum(out * g)`` with a
  seeded global ``g`` split the same way), compared with ``reference_attention`` on the
  full sequence. Optional ``subgroup``: run on ``dist.new_group(subgroup)`` instead of
  the world (ranks outside it record ``skipped``); ``compile``: call through
  ``torch.compile``.
- ``bad``: a malformed call; records ``"Type: message"`` of what it raised, or ``None``.
  Rank 1 may pass other arguments than the rest (``*_on_rank1``: rows, heads, dtype,
  layout, causal, scale, pattern, ring_size, checkpoint; a string pattern is not one);
  in a multi-node launch, the rank :func:`odd_one` names.
- ``agreement``: calls of ring attention with the shard lengths ``n_local`` (rank 1 may
  pass ``n_local_rank1``) under the agreement ``policy``; records how many digest
  ``all_gather`` and full ``all_gather_object`` collectives each call ran, and what it
  raised.

Half-precision ``ok`` cases (full attention) compare with a float64 reference and also
record SDPA's own error in that dtype (``sdpa_*``), the yardstick for their tolerance.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
import traceback

import torch
import torch.distributed as dist

import ring_attention as ra
from ring_attention import layout as _layout
from ring_attention import ring_checks
from tests.inputs import qkv

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HALF = (torch.bfloat16, torch.float16)
TOL = {"float64": 1e-10, "float32": 2e-5}
# Half precision: the ring's error against a float64 reference may be at most HALF_K times
# the error of torch's SDPA in the same dtype on the same inputs (measured by each rank).
HALF_K, HALF_EPS = 4.0, 1e-6


def _pattern(spec):
    if spec is None:
        return None
    segments, rates, mode = spec
    return ra.DilatedPattern(tuple(segments), tuple(rates), mode=mode)


def _global_tensors(case):
    """The same global q, k, v, g on every rank (seeded CPU generator)."""
    dtype = DTYPES[case.get("dtype", "float64")]
    return qkv(*case["shape"], seed=case["seed"], dtype=dtype, grad_out=True)


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def run_ok(case, group, rank, world):
    q, k, v, g = _global_tensors(case)
    layout, causal, scale = case["layout"], case["causal"], case.get("scale")
    pattern = _pattern(case.get("pattern"))

    # Oracle: the dense reference on the whole natural-order sequence; in float64 on the
    # (rounded) half-precision inputs, whose own rounding is then measured separately.
    half = q.dtype in HALF
    full = [(t.double() if half else t.clone()).requires_grad_() for t in (q, k, v)]
    window = None if case.get("window") is None else tuple(case["window"])
    cu_seqlens = None if case.get("cu_seqlens") is None else torch.tensor(case["cu_seqlens"], dtype=torch.int32)
    ref = ra.reference_attention(*full, pattern=pattern, causal=causal, scale=scale, window=window,
                                 cu_seqlens=cu_seqlens)
    ref_grads = torch.autograd.grad(ref, full, g.double() if half else g)

    def mine(t):
        return _layout.shard(t, world, layout, cu_seqlens=cu_seqlens)[rank].contiguous()

    shard = [mine(t).requires_grad_() for t in (q, k, v)]
    kwargs = dict(group=group, causal=causal, scale=scale, layout=layout)
    if window is not None:
        kwargs["window"] = window
    if cu_seqlens is not None:
        kwargs["cu_seqlens"] = cu_seqlens
    if case.get("checkpoint"):
        kwargs["checkpoint"] = True
    if case.get("pass_ring_size"):
        kwargs["ring_size"] = world
    def call(q, k, v):
        if pattern is None:
            return ra.ring_attention(q, k, v, **kwargs)
        return ra.ring_dilated_attention(q, k, v, pattern, **kwargs)

    if case.get("compile"):  # the process group's call runs eagerly inside the compiled function
        call = torch.compile(call, backend="aot_eager")
    out = call(*shard)
    grads = torch.autograd.grad(out, shard, mine(g))
    result = {
        "shape_ok": tuple(out.shape) == tuple(shard[0].shape),
        "dtype_ok": out.dtype == q.dtype and all(gr.dtype == q.dtype for gr in grads),
        "finite": bool(torch.isfinite(out).all()) and all(bool(torch.isfinite(gr).all()) for gr in grads),
        "out": _max_err(out, mine(ref)),
        "dq": _max_err(grads[0], mine(ref_grads[0])),
        "dk": _max_err(grads[1], mine(ref_grads[1])),
        "dv": _max_err(grads[2], mine(ref_grads[2])),
        # Sizes of what was compared, so a test can tell a trivially small check apart.
        "ref_out_max": mine(ref).abs().max().item(),
        "ref_dk_max": mine(ref_grads[1]).abs().max().item(),
    }
    if half:
        # The yardstick: torch's SDPA in the same dtype on the whole sequence, against the
        # same float64 reference (a half-precision tolerance relative to what SDPA achieves).
        if pattern is not None:
            raise ValueError("half-precision cases compare with SDPA: full attention only")
        dense_in = [t.clone().requires_grad_() for t in (q, k, v)]
        dense = ra.dense_attention(*dense_in, causal=causal, scale=scale)
        dense_grads = torch.autograd.grad(dense, dense_in, g)
        for key, got, want in zip(("out", "dq", "dk", "dv"), (dense, *dense_grads), (ref, *ref_grads)):
            result[f"sdpa_{key}"] = _max_err(mine(got), mine(want))
    return result


def odd_one(rank: int) -> bool:
    """Whether this rank passes the ``*_on_rank1`` arguments: global rank 1, or, where
    ``RING_TEST_ODD_LOCAL_RANK`` is set (a node of a multi-node launch), the local rank it names."""
    local = os.environ.get("RING_TEST_ODD_LOCAL_RANK")
    return rank == 1 if local is None else os.environ.get("LOCAL_RANK") == local


def run_bad(case, group, rank, world):
    """A malformed call; returns what this rank raised (or None)."""
    n_local = case["n_local"]
    odd = odd_one(rank)
    if odd:
        n_local += case.get("extra_rows_on_rank1", 0)
    h, hkv = case.get("heads", (2, 2))
    if odd and "heads_on_rank1" in case:
        h, hkv = case["heads_on_rank1"]
    dtype = torch.float64
    if odd and case.get("dtype_on_rank1"):
        dtype = DTYPES[case["dtype_on_rank1"]]
    q, k, v = qkv(1, n_local, h, hkv, 4, seed=rank, dtype=dtype)
    layout = case.get("layout", "contiguous")
    if odd and "layout_on_rank1" in case:
        layout = case["layout_on_rank1"]
    causal = case.get("causal", False)
    if odd and "causal_on_rank1" in case:
        causal = case["causal_on_rank1"]
    kwargs = dict(group=group, layout=layout, causal=causal, scale=case.get("scale"))
    if odd and "scale_on_rank1" in case:
        kwargs["scale"] = case["scale_on_rank1"]
    if "ring_size" in case:
        kwargs["ring_size"] = case["ring_size"]
    if odd and "ring_size_on_rank1" in case:
        kwargs["ring_size"] = case["ring_size_on_rank1"]
    if odd and "checkpoint_on_rank1" in case:
        kwargs["checkpoint"] = case["checkpoint_on_rank1"]
    if "window" in case:
        kwargs["window"] = case["window"]
    if odd and "window_on_rank1" in case:
        kwargs["window"] = case["window_on_rank1"]
    if odd and "cu_seqlens_on_rank1" in case:
        kwargs["cu_seqlens"] = torch.tensor(case["cu_seqlens_on_rank1"], dtype=torch.int32)
    if case.get("group_none"):
        del kwargs["group"]
    pattern = _pattern(case.get("pattern"))
    if odd and "pattern_on_rank1" in case:
        spec = case["pattern_on_rank1"]
        pattern = spec if isinstance(spec, str) else _pattern(spec)  # a string: not a pattern
    try:
        if pattern is None:
            ra.ring_attention(q, k, v, **kwargs)
        else:
            ra.ring_dilated_attention(q, k, v, pattern, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the type is part of what the test checks
        return f"{type(exc).__name__}: {exc}"
    return None


def run_agreement(case, group, rank, world):
    """Collectives run by the agreement on each call of ``n_local`` (rank 1: ``n_local_rank1``),
    and what each call raised; ``policy`` sets ``RING_ATTENTION_AGREEMENT`` for the case."""
    digests, exchanges, raised = [], [], []
    real_gather, real_object = dist.all_gather, dist.all_gather_object

    def counting_gather(*args, **kwargs):
        digests[-1] += 1
        return real_gather(*args, **kwargs)

    def counting_object(*args, **kwargs):
        exchanges[-1] += 1
        return real_object(*args, **kwargs)

    dist.all_gather, dist.all_gather_object = counting_gather, counting_object
    saved = os.environ.pop(ring_checks.AGREEMENT_ENV, None)
    if case.get("policy"):
        os.environ[ring_checks.AGREEMENT_ENV] = case["policy"]
    try:
        lengths = case["n_local_rank1"] if rank == 1 and "n_local_rank1" in case else case["n_local"]
        for n_local in lengths:
            digests.append(0)
            exchanges.append(0)
            q, k, v = qkv(1, n_local, 2, 2, 4, seed=rank, dtype=torch.float64)
            try:
                ra.ring_attention(q, k, v, group=group, causal=True, layout="zigzag")
                raised.append(None)
            except ValueError as exc:
                raised.append(f"ValueError: {exc}")
    finally:
        dist.all_gather, dist.all_gather_object = real_gather, real_object
        os.environ.pop(ring_checks.AGREEMENT_ENV, None)
        if saved is not None:
            os.environ[ring_checks.AGREEMENT_ENV] = saved
    return {"digests": digests, "exchanges": exchanges, "raised": raised}


def check_ok(world: int, case: dict, per_rank: list[dict]) -> None:
    """Assert every rank's result of an ``ok`` case (as :func:`run_ok` records it) is within
    its dtype's tolerance of the reference, with a non-degenerate comparison."""
    dtype = case.get("dtype", "float64")
    ran = 0
    for rank, res in enumerate(per_rank):
        assert "crash" not in res, f"world {world} rank {rank} {case['name']}:\n{res['crash']}"
        if res.get("skipped"):
            continue
        ran += 1
        assert res["shape_ok"] and res["dtype_ok"], f"rank {rank}: wrong output shape or dtype ({res})"
        assert res["finite"], f"rank {rank}: non-finite output or gradient ({res})"
        errs = {key: res[key] for key in ("out", "dq", "dk", "dv")}
        if dtype in TOL:
            tol = dict.fromkeys(errs, TOL[dtype])
        else:
            tol = {key: HALF_K * res[f"sdpa_{key}"] + HALF_EPS for key in errs}
        assert all(errs[key] <= tol[key] for key in errs), (
            f"world {world} rank {rank} {case['name']}: errors {errs} (tolerances {tol})"
        )
        assert res["ref_out_max"] > 0.1 and res["ref_dk_max"] > 1e-3, "degenerate comparison"
    assert ran == len(case.get("subgroup") or range(world))


def wait_or_kill(procs: list, logs: list, timeout_s: float) -> bool:
    """Wait for the spawned ``procs`` at most ``timeout_s`` in all, then kill what still runs
    and close the ``logs``; whether one was still running (a hang, which a test fails on
    instead of blocking CI)."""
    deadline = time.monotonic() + timeout_s
    hung = False
    try:
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                hung = True
                break
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    return hung


def main(cases_path, out_dir):
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    with open(cases_path) as f:
        cases = json.load(f)
    out_path = os.path.join(out_dir, f"rank{rank}.json")
    results = []

    def dump():
        tmp = out_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f)
        os.replace(tmp, out_path)

    # Subgroups must be created by every rank, in the same order.
    subgroups = {}
    for case in cases:
        key = tuple(case.get("subgroup") or ())
        if key and key not in subgroups:
            subgroups[key] = dist.new_group(list(key))
    try:
        for case in cases:
            start = time.perf_counter()
            try:
                key = tuple(case.get("subgroup") or ())
                group, g_rank, g_world = dist.group.WORLD, rank, world
                if key:
                    if rank not in key:
                        results.append({"name": case["name"], "skipped": True})
                        dump()
                        continue
                    group, g_rank, g_world = subgroups[key], key.index(rank), len(key)
                if case["kind"] == "ok":
                    res = run_ok(case, group, g_rank, g_world)
                elif case["kind"] == "agreement":
                    res = run_agreement(case, group, g_rank, g_world)
                else:
                    res = {"raised": run_bad(case, group, g_rank, g_world)}
            except Exception:  # noqa: BLE001 - reported to the test, which fails on it
                res = {"crash": traceback.format_exc()}
            res["name"] = case["name"]
            res["seconds"] = time.perf_counter() - start
            results.append(res)
            dump()
    finally:
        dump()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
