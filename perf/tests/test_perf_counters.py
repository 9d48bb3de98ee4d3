"""Cost counters: deterministic, independent of N where they should be, exact on known cases."""

from __future__ import annotations

import pytest
import torch

from perf import counters
from ring_attention import kernels, registry

B, H, D = 1, 8, 8
aten = torch.ops.aten

# Lengths at which a variant's blocks no longer depend on N. Most variants: any two that fit.
# longnet-ring4-zigzag-causal: once a zigzag chunk (N / 8) holds LongNet's largest segment
# (1024), no segment straddles two chunks; below that the segments split differently per N.
# Lengths past which a variant's blocks keep their structure (LongNet's segments stop
# at 1024: below 2048 a segment is one run, and a single run needs no gather copy).
TWO_LENGTHS = {"longnet": (2048, 4096), "longnet-ring4-zigzag-causal": (8192, 16384)}


def _counts(name, n, dtype="float32", passes=counters.PASSES):
    return counters.counters_for(registry.VARIANTS[name], B, n, H, D, dtype, passes=passes)


def test_the_launch_predicate():
    assert counters.launches_kernel(aten.add.Tensor) and counters.launches_kernel(aten.add_.Tensor)
    assert counters.launches_kernel(aten.zeros.default) and counters.launches_kernel(aten.clone.default)
    for op in (aten.view.default, aten.transpose.int, aten.slice.Tensor, aten.expand.default,
               aten.empty.memory_format, aten.detach.default, aten._unsafe_view.default):
        assert not counters.launches_kernel(op), op
    assert counters.is_fused(aten._scaled_dot_product_flash_attention_for_cpu.default)
    assert counters.is_fused(aten._scaled_dot_product_efficient_attention_backward.default)
    assert not counters.is_fused(aten.bmm.default)


def test_fake_cuda_counts_launches_with_the_same_predicate():
    from tests import fake_cuda

    assert fake_cuda.launches_kernel is counters.launches_kernel


@pytest.mark.parametrize("name", ["Production", "RingAttention-ring4", "ring-zigzag-causal4"])
def test_counters_are_the_same_twice(name):
    assert _counts(name, 512) == _counts(name, 512)


# A packing's launches follow its documents, which are drawn anew for every N, and a
# window's follow its tiles (at least runs.MIN_WINDOW_TILE rows, so more of them per band
# as N grows until a quarter of the band is that long).
@pytest.mark.parametrize("name", [name for name, v in registry.VARIANTS.items() if not v.masked])
def test_launches_and_fused_calls_do_not_depend_on_n(name):
    small, large = TWO_LENGTHS.get(name, (512, 1024))
    a, b = _counts(name, small), _counts(name, large)
    for mode in counters.PASSES:
        assert (a[mode].launches, a[mode].fused_calls) == (b[mode].launches, b[mode].fused_calls), mode
        assert a[mode].launches >= a[mode].fused_calls >= 1


def test_dense_is_one_fused_call_per_pass_direction():
    c = _counts("dense", 256)
    assert (c["fwd"].fused_calls, c["fwd+bwd"].fused_calls) == (1, 2)
    assert c["fwd"].bytes_sent == c["fwd+bwd"].bytes_sent == 0


@pytest.mark.parametrize("dtype, itemsize", [("float32", 4), ("float64", 8)])
def test_bytes_sent_by_a_ring_of_two(dtype, itemsize):
    """Full attention on 2 ranks, per rank: forward sends its K and V shard once; the backward
    sends them again and returns the dK/dV of the shard it received, in float32 or wider."""
    n = 512
    shard = B * (n // 2) * H * D  # elements of one rank's K (or V)
    c = _counts("RingAttention-ring2", n, dtype)
    assert c["fwd"].bytes_sent == 2 * shard * itemsize
    assert c["fwd+bwd"].bytes_sent == 2 * shard * itemsize + 2 * shard * itemsize + 2 * shard * max(itemsize, 4)


def test_single_device_variants_send_nothing():
    for name in ("dense", "RingAttention-ring1", "ImprovedDilatedAttention", "Production", "longnet"):
        assert all(c.bytes_sent == 0 for c in _counts(name, 1024).values()), name


def test_flops_are_the_variants():
    var = registry.VARIANTS["longnet"]
    c = _counts("longnet", 1024)
    assert c["fwd"].flops == var.flops(B, 1024, H, D)
    assert c["fwd+bwd"].flops == var.flops(B, 1024, H, D, backward=True)


def test_peak_counts_live_storages_exactly():
    x = torch.zeros(1000)  # an input: never counted, nor are its views and in-place writes

    def call():
        x.add_(1)
        x.view(10, 100).t()
        a = torch.ones(1000)  # 4000 B
        b = a * 2  # 8000 B live
        a_view = a[:10]
        del a
        c = b + a_view.sum()  # a held by its view, the 4 B sum, c: 12004 B live
        del a_view  # a freed: 8000 B
        d = torch.empty(500, dtype=torch.float64)  # 12000 B again, no launch
        return c, d

    meter, sent = counters.count_call(call)
    assert meter.peak_bytes == 12004 and meter.live_bytes == 0  # everything freed on return
    assert meter.launches == 5  # add_, ones, mul, sum, add; views and empty launch nothing
    assert meter.fused_calls == 0 and not sent


def test_peak_is_exact_for_sdpa_output():
    q, k, v = (torch.randn(1, 4, 64, 16) for _ in range(3))
    meter, _ = counters.count_call(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    # the output and the logsumexp the CPU flash op returns: the kernel's scratch is not counted
    assert meter.peak_bytes == q.numel() * 4 + 1 * 4 * 64 * 4


def test_a_planted_op_per_kernel_call_counts_once_per_call(monkeypatch):
    before = _counts("longnet", 1024, passes=("fwd",))["fwd"]
    original = kernels.attention_forward

    def one_more_op(q, k, v, **kwargs):
        out, lse = original(q, k, v, **kwargs)
        return out.clone(), lse

    monkeypatch.setattr(kernels, "attention_forward", one_more_op)
    after = _counts("longnet", 1024, passes=("fwd",))["fwd"]
    assert after.launches == before.launches + before.fused_calls
    assert after.fused_calls == before.fused_calls and after.peak_bytes > before.peak_bytes


def test_the_busiest_rank_pairs_are_the_ring_share_of_the_work():
    """Per-rank attended pairs against counts written out: zigzag splits a causal ring evenly,
    the contiguous ring's last rank attends the most, and the documents layout evens out
    packed documents that zigzag leaves uneven."""
    n = 1024
    zigzag = _counts("ring-zigzag-causal4", n, passes=("fwd",))["fwd"].busiest_rank_pairs
    assert zigzag == H * n * (n + 1) // 2 // 4
    contiguous = _counts("StandardRingAttention", n, passes=("fwd",))["fwd"].busiest_rank_pairs
    assert contiguous == H * sum(i + 1 for i in range(3 * n // 4, n))
    balanced = _counts("ring4-documents-balanced-causal", n, passes=("fwd",))["fwd"].busiest_rank_pairs
    uneven = _counts("ring4-documents-causal", n, passes=("fwd",))["fwd"].busiest_rank_pairs
    total = registry.VARIANTS["ring4-documents-causal"].flops(1, n, H, 1) / 4  # 4 D per pair, D = 1
    assert total / 4 <= balanced <= 1.05 * total / 4 < 2 * total / 4 < uneven


def test_the_command_prints_every_counter(capsys):
    assert counters.main(["--variant", "dense,RingAttention_ring2", "--n", "64,128", "--heads", "2",
                          "--dim", "8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("# counters per call: B=1 H=2 D=8 float32")
    assert [line.split()[:2] for line in lines[1:]] == [
        ["dense", "N=64"], ["RingAttention-ring2", "N=64"], ["dense", "N=128"], ["RingAttention-ring2", "N=128"]]
    for field in counters.FIELDS:
        assert f" {field}_fwd=" in lines[1] and f" {field}_fwd_bwd=" in lines[1]
    # SDPA and the sum that sees q finite (so no row needs marking); K and V: 2 x 32 x 2 x 8 x 4 B
    assert " launches_fwd=2 " in lines[1] and " bytes_sent_fwd=4096 " in lines[2]


def test_the_command_names_what_it_cannot_run(capsys):
    assert counters.main(["--variant", "ring-zigzag-causal4", "--n", "100", "--pass", "fwd"]) == 0
    assert "ring-zigzag-causal4 N=100 unsupported" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        counters.main(["--n", "64"])  # no variant


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_a_sole_kernel_call_keeps_its_gradients_in_the_input_dtype(dtype):
    """One call covers the shard (a ring of one): its dq/dk/dv are the result, no float32
    accumulators are zeroed and added into, so the pass holds no more than dense SDPA."""
    ring1, dense = (counters.counters_for(registry.get(name), 1, 256, 4, 32, dtype)["fwd+bwd"]
                    for name in ("RingAttention-ring1", "dense"))
    assert ring1.peak_bytes <= dense.peak_bytes


# Kernel launches per call at the shape, B=1, N=8192, H=8, D=64 ("Lean on a GPU":
# forward at most these, backward at most half of what it was). Counted there, not at a
# small stand-in: how the executor splits calls and batches head offsets depends on bytes.
LAUNCH_LIMITS = {  # name: (forward, backward)
    "Production": (20, 28),
    "ImprovedDilatedAttention": (10, 28),
    "longnet": (40, 62),
    "RingAttention-ring4": (100, 202),
    "ring-zigzag-causal4": (200, 266),
    "longnet-ring4-zigzag-causal": (200, 270),
}


@pytest.mark.parametrize("name", list(LAUNCH_LIMITS))
def test_launches_stay_within_the_limits(name):
    c = counters.counters_for(registry.VARIANTS[name], 1, 8192, 8, 64)
    fwd, bwd = c["fwd"].launches, c["fwd+bwd"].launches - c["fwd"].launches
    max_fwd, max_bwd = LAUNCH_LIMITS[name]
    assert fwd <= max_fwd and bwd <= max_bwd, f"{name}: {fwd} forward, {bwd} backward launches"


def _sdpa(q, k, v):
    """Raw SDPA on ``[B, N, H, D]``: the memory the issue "Lean on a GPU" compares with."""
    return torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)


@pytest.mark.parametrize("name", ["ImprovedDilatedAttention", "Production", "longnet"])
def test_dilated_attention_holds_little_more_memory_than_sdpa(name):
    """Forward and forward+backward peaks at most 1.3x raw SDPA's at the issue's shape (N=4096,
    B=1, H=8, D=64, float32; shorter, gathered copies of up to Options.max_gather_bytes add more):
    the first call's results are the accumulators, no other launch computes more than a
    quarter of the cells, and one block's results are alive at a time."""
    q, k, v, grad_out = counters.inputs(1, 4096, 8, 64)
    peaks = {}
    for label, fn in (("sdpa", _sdpa), (name, registry.VARIANTS[name])):
        for backward in (False, True):
            call = counters.call_of(fn, q, k, v, grad_out, backward)
            call()  # plans cached, as every later call finds them
            peaks[label, backward] = counters.count_call(call)[0].peak_bytes
    assert peaks[name, True] <= 1.3 * peaks["sdpa", True], peaks
    assert peaks[name, False] <= 1.3 * peaks["sdpa", False], peaks
