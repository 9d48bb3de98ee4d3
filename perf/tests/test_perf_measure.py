"""Measurement helpers: sampled reference rows, real CPU memory, device slug."""

from __future__ import annotations

import re
import statistics
import time

import pytest
import torch

from perf import device, measure
from ring_attention import registry


@pytest.mark.parametrize("name", ["dense", "StandardRingAttention", "ImprovedDilatedAttention",
                                  "Production", "longnet-ring4-zigzag-causal"])
def test_sampled_reference_matches_full_reference(name):
    var = registry.VARIANTS[name]
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 256, 8, 16, dtype=torch.float64) for _ in range(3))
    rows = torch.tensor([0, 5, 100, 200, 255])
    full = var.reference(q, k, v)[:, rows]
    torch.testing.assert_close(measure.sampled_reference(var, q, k, v, rows), full)


def test_errors_are_small_real_numbers():
    var = registry.VARIANTS["Production"]
    q, k, v, g = (torch.randn(1, 256, 8, 16) for _ in range(4))
    err_fwd = measure.full_error(var, q, k, v, g, False, "cpu")
    err_bwd = measure.full_error(var, q, k, v, g, True, "cpu")
    err_sampled = measure.sampled_error(var, q, k, v, num_rows=8)
    for e in (err_fwd, err_bwd, err_sampled):
        assert 0 < e < 1e-4


def test_cpu_peak_memory_is_measured():
    q, k, v = (torch.randn(1, 512, 8, 64) for _ in range(3))
    out_bytes = q.numel() * 4
    peak = measure.peak_memory_bytes(lambda: registry.VARIANTS["RingAttention-ring2"](q, k, v), "cpu")
    assert peak >= out_bytes
    big = measure.peak_memory_bytes(lambda: torch.empty(64 << 20, dtype=torch.uint8).fill_(1), "cpu")
    assert 64 << 20 <= big < 80 << 20


def test_seconds_and_slug():
    calls = []
    assert measure.seconds(lambda: None, "cpu", setup=lambda: (calls.append(1), time.sleep(0.5))) < 0.25
    assert calls == [1]  # setup ran, outside the timed region
    assert re.fullmatch(r"cpu-[a-z0-9_]+(-[a-z0-9]+)*-[0-9]+cores", device.device_slug("cpu"))
    assert device.slugify("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_profiles():
    cpu = device.CPU_PROFILE
    assert cpu.dtypes == ("float32",) and max(cpu.seq_lens) >= 4096
    names = list(registry.VARIANTS)
    assert "longnet" in cpu.variants_at(4096, names)
    assert any(registry.VARIANTS[n].seed for n in cpu.variants_at(4096, names))
    cuda = device.CUDA_PROFILE
    assert max(cuda.seq_lens) >= 131072 and set(cuda.dtypes) == {"float16", "bfloat16"}


def test_cpu_model_tells_apart_generations_with_one_name(tmp_path):
    """Virtual machines call several EPYC generations "AMD EPYC": the family keeps their baselines apart."""
    block = "processor\t: {cpu}\nvendor_id\t: AuthenticAMD\ncpu family\t: {family}\nmodel\t\t: {model}\n" \
            "model name\t: AMD EPYC\n\n"
    zen2, zen5 = tmp_path / "zen2", tmp_path / "zen5"
    zen2.write_text(block.format(cpu=0, family=23, model=1) + block.format(cpu=1, family=23, model=1))
    zen5.write_text(block.format(cpu=0, family=26, model=2))
    assert device.cpu_model(str(zen2)) == "AMD EPYC (family 23, model 1)"
    assert device.cpu_model(str(zen5)) == "AMD EPYC (family 26, model 2)"
    assert device.cpu_model(str(tmp_path / "absent"))  # no /proc: falls back to platform, never empty


def test_paired_ratio_cancels_drift():
    """A machine slowing down 2x during the run moves each round's pair alike: the ratio stays put."""
    anchor = [0.010 * (1 + i / 4) for i in range(5)]  # drifts from 1x to 2x
    times = [1.5 * a for a in anchor]
    assert measure.paired_ratio(times, anchor) == pytest.approx(1.5)
    assert statistics.median(times) / anchor[0] > 2.2  # what one early SDPA median would have said
    with pytest.raises(ValueError, match="one anchor time per round"):
        measure.paired_ratio(times, anchor[1:])
