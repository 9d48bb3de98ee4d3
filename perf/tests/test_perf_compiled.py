"""Compiled benchmarks: ``<variant>+compiled`` runs the variant through torch.compile beside eager."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from perf import compiled, device
from ring_attention import registry

ROOT = Path(__file__).resolve().parents[2]


def test_compiled_variant_is_one_graph_with_the_variants_results():
    variant = registry.get("ring-zigzag-causal4")
    fn = compiled.CompiledVariant(variant, "default")
    assert fn.name == "ring-zigzag-causal4+compiled" and fn.causal and fn.reference == variant.reference
    q, k, v = (torch.randn(1, 64, 2, 8) for _ in range(3))
    torch._dynamo.reset()
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    torch.testing.assert_close(fn(q, k, v), variant(q, k, v), atol=0, rtol=0)
    fn(q, k, v)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - before == 1  # compiled, once
    torch._dynamo.reset()


def test_the_cuda_profile_compiles_variants_that_exist_with_cuda_graphs():
    prof = device.CUDA_PROFILE
    assert prof.compiled and all(name in registry.VARIANTS for name in prof.compiled)
    assert prof.compile_mode == "reduce-overhead"
    assert device.CPU_PROFILE.compiled == ()  # the committed CPU baseline has no compiled rows


def test_a_compiled_benchmark_runs_beside_eager_and_records_no_counters(tmp_path):
    out = tmp_path / "run.json"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "perf/test_bench_attention.py",
           "--perf-device=cpu", "--perf-variants=longnet", "--perf-compiled=longnet", "--perf-n=256",
           "--perf-pass=fwd,fwd+bwd", "--perf-rounds=1", "--perf-warmup=0", f"--benchmark-json={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    benches = {b["name"]: b["extra_info"] for b in json.loads(out.read_text())["benchmarks"]}
    for mode in ("fwd", "fwd+bwd"):
        eager = benches[f"test_attention[longnet-N256-float32-{mode}]"]
        comp = benches[f"test_attention[longnet+compiled-N256-float32-{mode}]"]
        assert comp["variant"] == "longnet+compiled" and comp["compiled"] == "default"
        assert eager["compiled"] is None and "counters" in eager and "counters" not in comp
        assert comp["max_error"] == eager["max_error"] < 1e-5  # the same kernels inside the op

