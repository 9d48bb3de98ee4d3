"""Real torch.distributed rings (gloo, world sizes 2 and 4) against the dense reference.

Every case runs in spawned ranks; each rank checks its own output shard and gradients.
A bounded timeout turns a hang into a failure instead of a blocked CI job.
"""

from __future__ import annotations

import json
import socket

import pytest
import torch.multiprocessing as mp

from tests import _gloo_worker

pytestmark = pytest.mark.distributed

TIMEOUT_S = 240
TOL = 1e-10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world, cases, tmp_path):
    path = tmp_path / "cases.json"
    path.write_text(json.dumps(cases))
    ctx = mp.start_processes(
        _gloo_worker.run, args=(world, _free_port(), str(path), str(tmp_path)),
        nprocs=world, join=False, start_method="spawn",
    )
    import time

    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"ranks still running after {TIMEOUT_S}s: a hang")
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]


def _cases(world):
    n = 12 * world  # shards of 12 rows; zigzag chunks of 6
    shape = [2, n, 4, 2, 8]
    cases = []
    for lay in ("contiguous", "zigzag"):
        for causal in (False, True):
            cases.append(dict(kind="ok", seed=1, shape=shape, layout=lay, causal=causal))
            for pattern in (
                [[4, 8], [1, 2], "mixture"],          # segments shorter than a shard
                [[12], [2], "head_groups"],           # equal to a shard
                [[8, 24], [3, 2], "mixture"],         # straddling shard boundaries; 3 does not divide 8
                [[n, 2 * n], [1, 5], "head_groups"],  # longer than a shard (and than N)
            ):
                cases.append(dict(kind="ok", seed=2, shape=shape, layout=lay, causal=causal, pattern=pattern))
    cases.append(dict(kind="ok", seed=3, shape=[1, n, 4, 4, 8], layout="zigzag", causal=True, scale=0.3))
    cases.append(dict(kind="ok", seed=4, shape=shape, layout="contiguous", causal=True,
                      pattern=[[8, 24], [1, 2], "mixture"], checkpoint=True))
    return cases


BAD = [
    (dict(kind="bad", n_local=8, extra_on_rank1=4), "disagree"),                 # shard lengths differ
    (dict(kind="bad", n_local=7, layout="zigzag"), "odd"),                       # zigzag needs 2 chunks
    (dict(kind="bad", n_local=8, layout="spiral"), "unknown layout"),
    (dict(kind="bad", n_local=8, ring_size=3), "does not match"),
    (dict(kind="bad", n_local=8, pattern=[[5], [1]]), "not divisible"),
]


@pytest.mark.parametrize("world", [2, 4])
def test_ring_and_ring_dilated_match_reference(world, tmp_path):
    cases = _cases(world)
    per_rank = _spawn(world, cases + [c for c, _ in BAD], tmp_path)
    for rank, results in enumerate(per_rank):
        assert len(results) == len(cases) + len(BAD)
        for case, res in zip(cases, results):
            assert "crash" not in res, f"rank {rank}, case {case}:\n{res.get('crash')}"
            assert res["error"] < TOL, f"rank {rank}, case {case}: max error {res['error']}"
        for (case, phrase), res in zip(BAD, results[len(cases):]):
            assert "crash" not in res, f"rank {rank}, case {case}:\n{res.get('crash')}"
            raised = res["raised"]
            assert raised is not None, f"rank {rank} did not raise for {case}"
            # The rank with the bad shard names the problem; the others say a rank rejected it.
            assert phrase in raised or "rejected" in raised, f"rank {rank}, {case}: {raised}"
    for i, (case, phrase) in enumerate(BAD):
        messages = [pr[len(cases) + i]["raised"] for pr in per_rank]
        assert any(phrase in m for m in messages), f"{case}: no rank named the problem: {messages}"


def test_torchrun_example_checks_itself():
    """The README's torchrun example runs, and reports OK on every rank."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        "--master_port", str(_free_port()), str(root / "examples" / "ring_check.py"),
        "--seq-len", "128", "--heads", "4", "--kv-heads", "2", "--head-dim", "16",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env, cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "MISMATCH" not in proc.stdout, proc.stdout
    assert "OK" in proc.stdout, proc.stdout
