"""Two nodes for real: ``torchrun --nnodes 2 --nproc_per_node 2``, one node per network namespace.

Two network namespaces joined by a veth pair stand for two machines: each node's
``torchrun`` runs in its own namespace, the c10d rendezvous is hosted on the first
node's veth address, and gloo talks over the veth (``GLOO_SOCKET_IFNAME``). The ranks run
``tests/distributed_worker.py``: every ring variant (full and dilated attention, both
layouts, causal and not) against the dense reference, and a planted fault (one rank of
the second node passes another layout), which must make every rank raise within 10 s.

Needs root and the ``ip`` command; the cases skip, saying why, where namespaces cannot be
made. The namespaces are deleted whatever happens. Where the kernel has ``tc netem`` (it
is not loaded on the project's CI machines: that case skips), a delay on the veth shows
the ring still agrees and how its time grows with link delay.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed_worker import check_ok, wait_or_kill

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "distributed_worker.py"
TIMEOUT_S = 150  # per launch: a hang fails the test, never blocks CI
N = 24
ADDRESSES = ("10.213.0.1", "10.213.0.2")  # inside the namespaces this test makes, nowhere else
PORT = 29511


class Nodes:
    """Two namespaces ``names``, each holding one end (``links``) of a veth pair."""

    def __init__(self) -> None:
        tag = f"ra{os.getpid() % 100000}"
        self.names = (f"{tag}n0", f"{tag}n1")
        self.links = (f"{tag}a", f"{tag}b")

    def make(self) -> None:
        a, b = self.links
        self._ip("link", "add", a, "type", "veth", "peer", "name", b)
        for ns, link, addr in zip(self.names, self.links, ADDRESSES):
            self._ip("link", "set", link, "netns", ns)
            self._ip("-n", ns, "addr", "add", f"{addr}/24", "dev", link)
            self._ip("-n", ns, "link", "set", link, "up")
            self._ip("-n", ns, "link", "set", "lo", "up")

    def delete(self) -> None:
        for ns in self.names:  # deleting a namespace deletes its end of the veth, and so the pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    @staticmethod
    def _ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def nodes():
    if shutil.which("ip") is None:
        pytest.skip("two-node test: needs the ip command (iproute2)")
    made = Nodes()
    made.delete()  # a namespace left by a killed run of the same pid
    for ns in made.names:
        proc = subprocess.run(["ip", "netns", "add", ns], capture_output=True, text=True)
        if proc.returncode != 0:
            made.delete()
            pytest.skip(f"two-node test: cannot make a network namespace (root needed): {proc.stderr.strip()}")
    try:
        made.make()
        yield made
    finally:
        made.delete()


def _launch(nodes: Nodes, cases: list[dict], tmp: Path, odd_local_rank: int | None = None) -> list[list[dict]]:
    """The worker on 2 nodes x 2 ranks; every rank's results. ``odd_local_rank``: the local
    rank of the second node that passes the cases' ``*_on_rank1`` arguments."""
    cases_path = tmp / "cases.json"
    cases_path.write_text(json.dumps(cases))
    procs, logs = [], []
    for node, (ns, link, addr) in enumerate(zip(nodes.names, nodes.links, ADDRESSES)):
        env = dict(
            os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
            OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME=link,
        )
        if odd_local_rank is not None:
            env["RING_TEST_ODD_LOCAL_RANK"] = str(odd_local_rank) if node == 1 else "none"
        cmd = [
            "ip", "netns", "exec", ns, sys.executable, "-m", "torch.distributed.run",
            "--nnodes=2", "--nproc_per_node=2", "--max_restarts=0", "--rdzv_backend=c10d",
            f"--rdzv_endpoint={ADDRESSES[0]}:{PORT}", "--rdzv_id=two-nodes",
            f"--rdzv_conf=is_host={int(node == 0)}",  # the endpoint is no hostname of this machine
            f"--local-addr={addr}", str(WORKER), str(cases_path), str(tmp),
        ]
        log = open(tmp / f"node{node}.log", "w")  # noqa: SIM115 - closed below
        logs.append(log)
        procs.append(subprocess.Popen(cmd, env=env, cwd=str(ROOT), stdout=log, stderr=subprocess.STDOUT))
    hung = wait_or_kill(procs, logs, TIMEOUT_S)
    tails = "\n".join((tmp / f"node{i}.log").read_text()[-3000:] for i in range(2))
    assert not hung, f"a node still ran after {TIMEOUT_S}s (a hang):\n{tails}"
    assert all(p.returncode == 0 for p in procs), f"a node failed:\n{tails}"
    results = [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(4)]
    for rank, res in enumerate(results):
        assert [r["name"] for r in res] == [c["name"] for c in cases], f"rank {rank} skipped cases:\n{tails}"
    return results


def _variants() -> list[dict]:
    cases = []
    for kind, pattern in (("ring", None), ("dilated", [[3, 8, N], [1, 3, 4], "mixture"])):
        for layout in ("contiguous", "zigzag"):
            for causal in (False, True):
                cases.append(dict(
                    name=f"{kind}-{layout}-{'causal' if causal else 'full'}", kind="ok", seed=41,
                    shape=[2, N, 4, 2, 8], layout=layout, causal=causal, pattern=pattern,
                ))
    return cases


def test_every_ring_variant_agrees_with_the_reference_across_two_nodes(nodes, tmp_path):
    cases = _variants()
    results = _launch(nodes, cases, tmp_path)
    for i, case in enumerate(cases):
        check_ok(4, case, [res[i] for res in results])


def test_a_rank_of_the_second_node_with_another_layout_raises_on_every_rank(nodes, tmp_path):
    """Rank-local checks all pass (each layout is valid): only the ranks' agreement, before any
    P2P, can catch it, and it must on every rank of both nodes, fast."""
    cases = [dict(name="layout-differs-on-node1", kind="bad", n_local=6, layout="zigzag",
                  layout_on_rank1="contiguous")]
    results = _launch(nodes, cases, tmp_path, odd_local_rank=1)
    for rank, (res,) in enumerate(results):
        assert (res.get("raised") or "").startswith("ValueError: "), f"rank {rank}: {res}"
        assert "layout" in res["raised"], res["raised"]
        assert res["seconds"] < 10, f"rank {rank} took {res['seconds']:.1f}s"


def _netem(nodes: Nodes, verb: str, delay_ms: int) -> subprocess.CompletedProcess:
    for ns, link in zip(nodes.names, nodes.links):
        proc = subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", verb, "dev", link, "root", "netem",
                               "delay", f"{delay_ms}ms"], capture_output=True, text=True)
        if proc.returncode != 0:
            break
    return proc


def test_the_ring_agrees_over_a_delayed_link_and_slows_with_it(nodes, tmp_path):
    proc = _netem(nodes, "add", 0) if shutil.which("tc") else None
    if proc is None or proc.returncode != 0:
        pytest.skip(f"no tc netem on this machine ({'tc missing' if proc is None else proc.stderr.strip()})")
    cases = [c for c in _variants() if c["name"] in ("ring-zigzag-causal", "dilated-contiguous-full")]
    seconds = {}
    for delay_ms in (0, 20):
        assert _netem(nodes, "change", delay_ms).returncode == 0
        run = tmp_path / f"delay{delay_ms}"
        run.mkdir()
        results = _launch(nodes, cases, run)
        for i, case in enumerate(cases):
            check_ok(4, case, [res[i] for res in results])
        seconds[delay_ms] = sum(max(res[i]["seconds"] for res in results) for i in range(len(cases)))
    print(f"slowest rank, both calls: {seconds[0]:.3f} s without delay, {seconds[20]:.3f} s at 20 ms per hop")
    assert seconds[20] > seconds[0]
