"""Real torch.distributed rings (gloo on CPU, world sizes 2 and 4) against the dense reference.

Every rank is a separate process running ``tests/distributed_worker.py``; one launch per
world size runs every case below (the ranks share one process group), and each rank
compares its output shard and its shard's dq/dk/dv with ``reference_attention`` on the
whole sequence. Malformed input must make *every* rank raise, never leave one waiting:
the launch has a hard deadline, and a rank still running then fails the test (the
processes are killed) instead of blocking CI.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed_worker import check_ok, wait_or_kill

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().with_name("distributed_worker.py")
JOIN_TIMEOUT_S = int(os.environ.get("RING_TEST_TIMEOUT_S", "150"))  # a hang fails, never blocks
N = 24  # global sequence length: shards of 12 (R=2) or 6 (R=4); zigzag chunks of 6 or 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    """The environment of a spawned rank: imports ring_attention from this checkout."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", **extra)


def _launch(world: int, cases: list[dict], tmp: Path) -> list[list[dict]]:
    """Run the worker on ``world`` ranks; returns every rank's result list."""
    cases_path = tmp / "cases.json"
    cases_path.write_text(json.dumps(cases))
    port = _free_port()
    procs, logs = [], []
    for rank in range(world):
        env = _env(
            RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        )
        log = open(tmp / f"rank{rank}.log", "w")  # noqa: SIM115 - closed below
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, str(WORKER), str(cases_path), str(tmp)],
            env=env, cwd=str(ROOT), stdout=log, stderr=subprocess.STDOUT,
        ))
    hung = wait_or_kill(procs, logs, JOIN_TIMEOUT_S)

    def tail(rank):
        return (tmp / f"rank{rank}.log").read_text()[-3000:]

    def done(rank):
        path = tmp / f"rank{rank}.json"
        return [r.get("name") for r in json.loads(path.read_text())] if path.exists() else []

    if hung:
        progress = {r: (done(r)[-1:] or ["nothing"])[0] for r in range(world)}
        pytest.fail(
            f"world {world}: ranks still running after {JOIN_TIMEOUT_S}s (a hang); "
            f"last case finished per rank: {progress}\n" + "\n".join(tail(r) for r in range(world))
        )
    for rank, p in enumerate(procs):
        assert p.returncode == 0, f"rank {rank} exited with {p.returncode}:\n{tail(rank)}"
    results = [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(world)]
    for rank, res in enumerate(results):
        assert [r["name"] for r in res] == [c["name"] for c in cases], f"rank {rank} skipped cases"
    return results


# --- cases -------------------------------------------------------------------------------


def _ring_cases(world: int) -> list[dict]:
    cases = []
    for layout in ("contiguous", "zigzag"):
        for causal in (False, True):
            for h, hkv in ((2, 2), (4, 2)):
                cases.append(dict(
                    name=f"ring-{layout}-{'causal' if causal else 'full'}-H{h}Hkv{hkv}",
                    kind="ok", seed=11, shape=[2, N, h, hkv, 8], layout=layout, causal=causal,
                ))
    cases += [
        dict(name="ring-scale-zigzag-causal-mqa", kind="ok", seed=12, shape=[1, N, 4, 1, 8],
             layout="zigzag", causal=True, scale=0.7),
        dict(name="ring-scale-contiguous", kind="ok", seed=13, shape=[2, N, 4, 2, 4],
             layout="contiguous", causal=False, scale=1.9, pass_ring_size=True),
        dict(name="ring-checkpoint-zigzag-causal", kind="ok", seed=14, shape=[2, N, 4, 2, 8],
             layout="zigzag", causal=True, checkpoint=True),
        dict(name="ring-compiled-zigzag-causal", kind="ok", seed=18, shape=[2, N, 4, 2, 8],
             layout="zigzag", causal=True, compile=True),
        dict(name="ring-float32-contiguous-causal", kind="ok", seed=15, shape=[2, 4 * N, 4, 2, 16],
             layout="contiguous", causal=True, dtype="float32"),
        # Half precision: K/V travel in bfloat16/float16, returned dK/dV in float32.
        dict(name="ring-bfloat16-zigzag-causal", kind="ok", seed=16, shape=[2, 4 * N, 4, 2, 16],
             layout="zigzag", causal=True, dtype="bfloat16"),
        dict(name="ring-float16-contiguous", kind="ok", seed=17, shape=[2, 4 * N, 4, 2, 16],
             layout="contiguous", causal=False, dtype="float16", scale=0.3),
        # Sliding windows: only the shards a band reaches are sent.
        dict(name="ring-window-contiguous-causal", kind="ok", seed=19, shape=[2, N, 4, 2, 8],
             layout="contiguous", causal=True, window=[5, 0]),
        dict(name="ring-window-zigzag", kind="ok", seed=20, shape=[1, N, 2, 2, 8],
             layout="zigzag", causal=False, window=[3, 7]),
        dict(name="ring-window-dilated-zigzag-causal", kind="ok", seed=21, shape=[1, N, 4, 2, 8],
             layout="zigzag", causal=True, window=[9, -1], pattern=[[8, N], [1, 2], "mixture"]),
        dict(name="ring-window-compiled-contiguous", kind="ok", seed=22, shape=[1, N, 2, 2, 8],
             layout="contiguous", causal=False, window=[2, 4], compile=True),
        # Packed documents: a query sees its own document only; shards no document shares are not sent.
        dict(name="ring-documents-contiguous-causal", kind="ok", seed=23, shape=[2, N, 4, 2, 8],
             layout="contiguous", causal=True, cu_seqlens=[0, 1, 7, 20, N]),
        dict(name="ring-documents-dilated-zigzag", kind="ok", seed=24, shape=[1, N, 4, 2, 8],
             layout="zigzag", causal=False, cu_seqlens=[0, 8, 12, N], pattern=[[4, N], [2, 2], "mixture"]),
        dict(name="ring-documents-window-compiled-zigzag-causal", kind="ok", seed=25, shape=[1, N, 2, 2, 8],
             layout="zigzag", causal=True, window=[3, 0], cu_seqlens=[0, 13, N], compile=True),
        # The documents layout: chunks dealt by their work within the documents.
        dict(name="ring-documents-layout-causal", kind="ok", seed=26, shape=[2, 4 * N, 4, 2, 8],
             layout="documents", causal=True, cu_seqlens=[0, 3, 40, 41, 4 * N]),
        dict(name="ring-documents-layout-dilated", kind="ok", seed=27, shape=[1, 4 * N, 4, 2, 8],
             layout="documents", causal=False, cu_seqlens=[0, 16, 4 * N], pattern=[[4, 4 * N], [2, 1], "mixture"]),
    ]
    return cases


def _dilated_patterns(world: int) -> list[tuple[str, list]]:
    shard = N // world
    return [
        # segments of 3 lie inside every shard and every zigzag chunk (3 | 6 and 3 | 12)
        ("inside-shard", [[3], [2], "mixture"]),
        # one segment per shard (per contiguous shard; straddles the two zigzag chunks' seam)
        ("equal-shard", [[shard], [2], "head_groups"]),
        # w = 8 straddles shard boundaries (12 | 8 no, 6 | 8 no); rate 3 does not divide 8
        ("straddle", [[8], [3], "mixture"]),
        # the whole sequence, and longer than it (w' = min(w, N) = N); rate 5 does not divide 24
        ("longer", [[N, 2 * N], [1, 5], "head_groups"]),
        # LongNet-like mixture of all of them
        ("mixed", [[3, 8, N], [1, 3, 4], "mixture"]),
    ]


def _dilated_cases(world: int) -> list[dict]:
    cases = []
    for pname, pattern in _dilated_patterns(world):
        for layout in ("contiguous", "zigzag"):
            for causal in (False, True):
                cases.append(dict(
                    name=f"dilated-{pname}-{layout}-{'causal' if causal else 'full'}",
                    kind="ok", seed=21, shape=[2, N, 4, 2, 8], layout=layout, causal=causal,
                    pattern=pattern,
                ))
    cases += [
        dict(name="dilated-mha-scale", kind="ok", seed=22, shape=[1, N, 4, 4, 8], layout="zigzag",
             causal=True, scale=0.4, pattern=[[8, N], [2, 3], "head_groups"]),
        dict(name="dilated-checkpoint", kind="ok", seed=23, shape=[2, N, 4, 2, 8], layout="contiguous",
             causal=True, checkpoint=True, pattern=[[8, N], [3, 2], "mixture"]),
        dict(name="dilated-compiled", kind="ok", seed=26, shape=[2, N, 4, 2, 8], layout="zigzag",
             causal=True, compile=True, pattern=[[8, N], [3, 2], "mixture"]),
        dict(name="dilated-float32", kind="ok", seed=24, shape=[2, 4 * N, 4, 2, 16], layout="zigzag",
             causal=True, dtype="float32", pattern=[[16, 4 * N], [1, 4], "mixture"]),
    ]
    if world == 4:
        # A ring on a subgroup whose group ranks are not the global ranks (1 -> 0, 3 -> 1).
        for layout in ("contiguous", "zigzag"):
            cases.append(dict(
                name=f"subgroup-{layout}", kind="ok", seed=25, shape=[2, N, 4, 2, 8], layout=layout,
                causal=True, pattern=[[8, N], [3, 2], "mixture"], subgroup=[1, 3],
            ))
    return cases


# (case, phrase the rank that caused it must name); every rank must raise ValueError.
def _bad_cases(world: int) -> list[tuple[dict, str]]:
    return [
        (dict(name="bad-rank1-longer-shard", kind="bad", n_local=6, extra_rows_on_rank1=2), "disagree"),
        (dict(name="bad-rank1-longer-shard-dilated", kind="bad", n_local=6, extra_rows_on_rank1=6,
              pattern=[[6], [2], "mixture"]), "disagree"),
        (dict(name="bad-zigzag-odd-shard", kind="bad", n_local=5, layout="zigzag"), "not divisible by 2"),
        (dict(name="bad-documents-layout-shard", kind="bad", n_local=6, layout="documents"), "not divisible by 8"),
        (dict(name="bad-unknown-layout", kind="bad", n_local=6, layout="spiral"), "unknown layout"),
        (dict(name="bad-unknown-layout-rank1-only", kind="bad", n_local=6, layout_on_rank1="ring"),
         "unknown layout"),
        (dict(name="bad-ring-size-3", kind="bad", n_local=6, ring_size=3), "does not match"),
        (dict(name="bad-ring-size-3-dilated", kind="bad", n_local=6, ring_size=3,
              pattern=[[4], [2], "mixture"]), "does not match"),
        (dict(name="bad-pattern-not-dividing-N", kind="bad", n_local=6, pattern=[[5], [1], "mixture"]),
         f"N={6 * world}"),
        (dict(name="bad-rank1-other-heads", kind="bad", n_local=6, heads_on_rank1=(4, 2)), "disagree"),
        (dict(name="bad-rank1-causal-differs", kind="bad", n_local=6, causal_on_rank1=True), "disagree"),
        # Arguments each rank finds valid, but that differ between ranks: every rank raises.
        (dict(name="bad-rank1-other-scale", kind="bad", n_local=6, scale=0.5, scale_on_rank1=0.25), "disagree"),
        (dict(name="bad-rank1-default-vs-other-scale-dilated", kind="bad", n_local=6, scale_on_rank1=0.7,
              pattern=[[6], [2], "mixture"]), "disagree"),
        (dict(name="bad-rank1-float32", kind="bad", n_local=6, dtype_on_rank1="float32"), "disagree"),
        (dict(name="bad-rank1-bfloat16-dilated", kind="bad", n_local=6, dtype_on_rank1="bfloat16",
              pattern=[[6], [2], "mixture"]), "disagree"),
        (dict(name="bad-window-side", kind="bad", n_local=6, window=[-2, 0]), "window"),
        (dict(name="bad-rank1-window-only", kind="bad", n_local=6, window_on_rank1=[-3, 0]), "window"),
        (dict(name="bad-rank1-documents-only", kind="bad", n_local=6, cu_seqlens_on_rank1=[0, 5, 3, 6 * world]),
         "cu_seqlens"),
    ]


# Rank 1 alone passes something wrong or different: every rank raises, and the message names
# the values (not codes). (case, phrases every rank's error must contain, as regexes)
def _agreement_cases(world: int) -> list[tuple[dict, list[str]]]:
    return [
        (dict(name="bad-rank1-checkpoint-differs", kind="bad", n_local=6, checkpoint_on_rank1=True),
         [r"checkpoint: rank 0=False, rank 1=True"]),
        (dict(name="bad-rank1-ring-size-0", kind="bad", n_local=6, ring_size_on_rank1=0), [r"ring_size"]),
        (dict(name="bad-rank1-ring-size-minus-1", kind="bad", n_local=6, ring_size_on_rank1=-1), [r"ring_size"]),
        (dict(name="bad-rank1-not-a-pattern", kind="bad", n_local=6, pattern=[[4], [2], "mixture"],
              pattern_on_rank1="not a pattern"), [r"DilatedPattern"]),
        (dict(name="bad-rank1-dtype-named", kind="bad", n_local=6, dtype_on_rank1="float32"),
         [r"dtype: rank 0=float64, rank 1=float32"]),
        (dict(name="bad-rank1-scale-named", kind="bad", n_local=6, scale_on_rank1=0.25),
         [r"scale: rank 0=0\.5, rank 1=0\.25"]),
        (dict(name="bad-rank1-pattern-named", kind="bad", n_local=8, pattern=[[16], [1], "mixture"],
              pattern_on_rank1=[[16], [2], "mixture"]),
         [r"pattern: rank 0=mixture \(\(16, 1\),\), rank 1=mixture \(\(16, 2\),\)"]),
        (dict(name="bad-rank1-window-named", kind="bad", n_local=6, window_on_rank1=[3, 0]),
         [r"window: rank 0=None, rank 1=\(3, 0\)"]),
        (dict(name="bad-rank1-documents-named", kind="bad", n_local=6, cu_seqlens_on_rank1=[0, 4, 6 * world]),
         [rf"cu_seqlens: rank 0=None, rank 1=\(0, 4, {6 * world}\)"]),
        (dict(name="bad-group-none-in-a-distributed-job", kind="bad", n_local=6, group_none=True),
         [r"group=None inside a distributed job of \d processes"]),
    ]


def _good_after_bad(world: int) -> list[dict]:
    # The group must still work after every rank raised: no message left in flight.
    return [dict(name="ok-after-bad", kind="ok", seed=31, shape=[1, N, 4, 2, 8], layout="zigzag",
                 causal=True, pattern=[[8, N], [3, 2], "mixture"])]


def _agreement_policy_cases() -> list[dict]:
    return [
        dict(name="agreement-every-call", kind="agreement", n_local=[8, 8, 8, 10]),
        dict(name="agreement-cached", kind="agreement", policy="cached", n_local=[12, 12, 12, 14]),
        # A short last batch on one rank, after cached calls: every rank must raise, at once.
        dict(name="agreement-shape-alone", kind="agreement", n_local=[8, 8, 8], n_local_rank1=[8, 8, 10]),
    ]


def _all_cases(world):
    return (
        _ring_cases(world) + _dilated_cases(world) + [c for c, _ in _bad_cases(world)]
        + [c for c, _ in _agreement_cases(world)] + _agreement_policy_cases()
        + _good_after_bad(world)
    )


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"world{w}")
def world_results(request, tmp_path_factory):
    world = request.param
    cases = _all_cases(world)
    results = _launch(world, cases, tmp_path_factory.mktemp(f"world{world}"))
    by_name = {c["name"]: [res[i] for res in results] for i, c in enumerate(cases)}
    return world, {c["name"]: c for c in cases}, by_name


def _ok_names(fn):
    return [c["name"] for c in fn(4)]


@pytest.mark.parametrize("name", _ok_names(_ring_cases))
def test_ring_attention_matches_reference(world_results, name):
    world, cases, results = world_results
    check_ok(world, cases[name], results[name])


@pytest.mark.parametrize("name", _ok_names(_dilated_cases) + ["ok-after-bad"])
def test_ring_dilated_attention_matches_reference(world_results, name):
    world, cases, results = world_results
    if name not in cases:
        pytest.skip(f"{name} runs on world size 4 only")
    check_ok(world, cases[name], results[name])


@pytest.mark.parametrize("index", range(len(_bad_cases(2))), ids=[c["name"] for c, _ in _bad_cases(2)])
def test_bad_input_raises_on_every_rank(world_results, index):
    world, _, results = world_results
    case, phrase = _bad_cases(world)[index]
    raised = []
    for rank, res in enumerate(results[case["name"]]):
        assert "crash" not in res, f"rank {rank}:\n{res['crash']}"
        assert res["raised"] is not None, f"world {world} rank {rank} did not raise for {case}"
        raised.append(res["raised"])
    assert all(r.startswith("ValueError: ") for r in raised), f"{case['name']}: {raised}"
    assert any(phrase in r for r in raised), f"{case['name']}: no rank names the problem ({phrase!r}): {raised}"
    # A rank either names the problem or says that another rank rejected its input.
    assert all(phrase in r or "rejected" in r for r in raised), raised


@pytest.mark.parametrize(
    "index", range(len(_agreement_cases(2))), ids=[c["name"] for c, _ in _agreement_cases(2)]
)
def test_one_bad_rank_makes_every_rank_raise_naming_values(world_results, index):
    world, _, results = world_results
    case, patterns = _agreement_cases(world)[index]
    for rank, res in enumerate(results[case["name"]]):
        assert "crash" not in res, f"rank {rank}:\n{res['crash']}"
        raised = res["raised"]
        assert raised is not None, f"world {world} rank {rank} did not raise for {case}"
        assert raised.split(":")[0] in ("ValueError", "TypeError"), raised
        for pattern in patterns:
            assert re.search(pattern, raised), f"rank {rank}: {raised!r} does not match {pattern!r}"


def _agreement(results, name):
    for rank, res in enumerate(results[name]):
        assert "crash" not in res, f"rank {rank}:\n{res['crash']}"
    return results[name]


def test_gloo_agrees_on_every_call_with_one_digest(world_results):
    """gloo's default: one digest all_gather per call, never the full exchange when the ranks agree."""
    _, _, results = world_results
    for rank, res in enumerate(_agreement(results, "agreement-every-call")):
        assert (res["digests"], res["exchanges"]) == ([1, 1, 1, 1], [0, 0, 0, 0]), f"rank {rank}: {res}"
        assert res["raised"] == [None] * 4, f"rank {rank}: {res['raised']}"


def test_cached_agreement_runs_once_per_signature(world_results):
    """RING_ATTENTION_AGREEMENT=cached (NCCL's default): 1, 0, 0, then 1 for a new shape."""
    _, _, results = world_results
    for rank, res in enumerate(_agreement(results, "agreement-cached")):
        assert (res["digests"], res["exchanges"]) == ([1, 0, 0, 1], [0, 0, 0, 0]), f"rank {rank}: {res}"


def test_one_rank_changing_shape_after_cached_calls_raises_on_every_rank(world_results):
    """Not a hang until the group's 60 s timeout: a ValueError naming the length, on every rank, fast."""
    world, _, results = world_results
    for rank, res in enumerate(_agreement(results, "agreement-shape-alone")):
        assert res["raised"][:2] == [None, None], f"rank {rank}: {res['raised']}"
        raised = res["raised"][2]
        assert raised is not None and raised.startswith("ValueError: "), f"rank {rank}: {raised}"
        assert re.search(rf"sequence length N[^;]*: rank 0={8 * world}, rank 1={10 * world}", raised), raised
        assert res["seconds"] < 10, f"rank {rank} took {res['seconds']:.1f}s"


def test_different_patterns_across_ranks_raise_on_every_rank(tmp_path):
    """Rank 1 passes another dilation rate (same shapes): every rank must raise ValueError."""
    case = dict(name="bad-rank1-other-pattern", kind="bad", n_local=8, heads=(2, 2),
                pattern=[[16], [1], "mixture"], pattern_on_rank1=[[16], [2], "mixture"])
    (res0,), (res1,) = _launch(2, [case], tmp_path)
    raised = [res0.get("raised"), res1.get("raised")]
    assert all(r is not None and r.startswith("ValueError: ") for r in raised), raised


def _ring_check(seq_len: int) -> subprocess.CompletedProcess:
    """examples/ring_check.py under torch.distributed.run, 2 ranks."""
    port = _free_port()
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
        "--master_addr=127.0.0.1", f"--master_port={port}",
        str(ROOT / "examples" / "ring_check.py"), "--seq-len", str(seq_len), "--heads", "4", "--kv-heads", "2",
        "--head-dim", "16",
    ]
    try:
        return subprocess.run(cmd, cwd=str(ROOT), env=_env(), capture_output=True, text=True, timeout=JOIN_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"ring_check.py did not finish in {JOIN_TIMEOUT_S}s:\n{exc.stdout}\n{exc.stderr}")


def test_ring_check_example_under_torchrun():
    """examples/ring_check.py under torch.distributed.run (2 ranks, small N)."""
    proc = _ring_check(128)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert re.search(r"^OK\b", proc.stdout, re.MULTILINE), output
    assert "MISMATCH" not in proc.stdout, output
    for rank in range(2):
        assert f"rank {rank}" in proc.stdout, output


@pytest.mark.parametrize(
    "gpus, local_world, expected",
    [(0, 4, ("cpu", "gloo", False)), (2, 4, ("cpu", "gloo", True)), (4, 4, ("cuda", "nccl", False)),
     (8, 4, ("cuda", "nccl", False))],
)
def test_ring_check_example_falls_back_to_gloo_with_fewer_gpus_than_ranks(monkeypatch, gpus, local_world, expected):
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("ring_check", ROOT / "examples" / "ring_check.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    device, backend, note = example.pick_device(1, local_world)
    assert (device.type, backend, note is not None) == expected
    if device.type == "cuda":
        assert device.index == 1
    if note:
        assert f"{gpus} GPU(s) for {local_world} ranks" in note


def test_ring_check_example_refuses_a_length_the_zigzag_layout_cannot_shard():
    """N = 1002 over 2 ranks: the zigzag layout needs 4 | N. Every rank must say so; before,
    trailing tokens were dropped and the check reported a zigzag MISMATCH instead."""
    proc = _ring_check(1002)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert "MISMATCH" not in proc.stdout, output
    message = "ValueError: sequence length N=1002 must be divisible by 4 (2R) for ring size R=2 with the zigzag layout"
    assert output.count(message) >= 2, output  # once per rank
