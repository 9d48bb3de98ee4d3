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
def test_sampled_error_uses_the_references_own_rows(name, monkeypatch):
    """No second copy of the reference: the sampled error asks the variant's reference for its rows."""
    var = registry.VARIANTS[name]
    asked = []
    real = registry.reference_attention
    monkeypatch.setattr(registry, "reference_attention", lambda *a, **kw: asked.append(kw) or real(*a, **kw))
    q, k, v = (torch.randn(1, 256, 8, 16) for _ in range(3))
    assert measure.sampled_error(var, q, k, v, num_rows=5) < 1e-4
    assert [kw["query_rows"].tolist() for kw in asked] == [[0, 64, 128, 191, 255]]


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
    variants = list(registry.VARIANTS.values())
    assert cpu.variants_at(2048, variants) == list(registry.VARIANTS)
    # The eight the committed CPU baseline holds at 4096.
    assert set(cpu.variants_at(4096, variants)) == {
        "dense", "StandardRingAttention", "RingAttention-ring4", "ImprovedDilatedAttention",
        "RingDilatedV2-ring4", "Production", "longnet", "longnet-ring4-zigzag-causal"}
    cuda_large = set(device.CUDA_PROFILE.variants_at(32768, variants))
    assert cuda_large == set(cpu.variants_at(4096, variants)) | {"Production-checkpoint", "ring-zigzag-causal4"}
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


class _FakeDevice:
    """A device whose queued work finishes only when synchronized: ``sync`` takes ``work_s``."""

    def __init__(self, work_s):
        self.work_s, self.queued = work_s, 0

    def launch(self):
        self.queued += 1  # returns at once, like a CUDA kernel launch

    def sync(self):
        time.sleep(self.work_s * self.queued)
        self.queued = 0


def test_host_timer_waits_for_the_device_before_reading_the_clock():
    dev = _FakeDevice(work_s=0.05)
    elapsed = measure.round_seconds(dev.launch, 2, measure.HostTimer(dev.sync))
    assert elapsed >= 0.05  # 2 launches x 50 ms of device work, per call
    assert dev.queued == 0


def test_host_timer_leaves_earlier_work_out():
    dev = _FakeDevice(work_s=0.2)
    dev.launch()  # queued before the round: the start's synchronize absorbs it
    assert measure.round_seconds(lambda: None, 1, measure.HostTimer(dev.sync)) < 0.1


@pytest.mark.parametrize("call_s, want", [(2e-3, 1), (1e-3, 1), (0.4e-3, 3), (10e-6, 100), (1e-9, 10_000),
                                          (0.0, 10_000), (float("nan"), 10_000)])
def test_repeats_make_a_round_last_a_millisecond(call_s, want):
    assert measure.repeats_for(call_s) == want
    if want < measure.MAX_REPEATS:
        assert want * call_s >= measure.MIN_ROUND_S > (want - 1) * call_s


def test_round_seconds_is_per_call_and_round_clock_advances_by_it():
    calls = []
    per_call = measure.round_seconds(lambda: (calls.append(1), time.sleep(0.01)), 5, measure.timer_for("cpu"))
    assert len(calls) == 5 and 0.01 <= per_call < 0.05
    before = measure.round_clock()
    measure.ROUND_CLOCK.advance(0.125)
    assert measure.round_clock() - before == 0.125


def test_sdpa_anchor_is_pinned_to_flash_on_cuda():
    assert measure.sdpa_anchor_backend("cuda", torch.float16) == "flash"
    assert measure.sdpa_anchor_backend("cuda", torch.bfloat16) == "flash"
    assert measure.sdpa_anchor_backend("cuda", torch.float32) == "efficient"  # flash has no fp32
    assert measure.sdpa_anchor_backend("cpu", torch.float32) is None
    with measure.sdpa_backend("math"):  # the context runs on any build
        q = torch.randn(1, 2, 8, 4)
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert not measure.L2Flush("cpu").active


def test_paired_ratio_is_the_median_of_the_per_round_ratios():
    times = [2.0, 2.2, 1.8, 2.1, 30.0]  # one round hit by a burst of load
    anchors = [1.0, 1.0, 1.0, 1.0, 1.0]
    ratios = sorted(t / a for t, a in zip(times, anchors))
    assert measure.paired_ratio(times, anchors) == ratios[2] == 2.1  # the mean would be 7.62
    with pytest.raises(ValueError):
        measure.paired_ratio([1.0], [])


def test_cpu_peak_memory_counts_buffers_alive_together_and_frees():
    mib = 1 << 20

    def two_alive():
        a = torch.empty(16 * mib, dtype=torch.uint8).fill_(1)
        b = torch.empty(24 * mib, dtype=torch.uint8).fill_(1)
        return a, b

    def one_after_another():
        for _ in range(3):
            torch.empty(16 * mib, dtype=torch.uint8).fill_(1)

    both = measure.peak_memory_bytes(two_alive, "cpu")
    assert 40 * mib <= both < 48 * mib  # 16 + 24 alive at once, not the largest one (24)
    sequential = measure.peak_memory_bytes(one_after_another, "cpu")
    assert 16 * mib <= sequential < 24 * mib  # each freed before the next


class _WrongVariant:
    """A registry variant with a planted error: in one gradient, or in some output rows."""

    def __init__(self, base, *, grad_of=None, rows=None, amount=0.5):
        self.base, self.grad_of, self.rows, self.amount = base, grad_of, rows, amount

    def __getattr__(self, name):
        return getattr(self.base, name)

    def reference(self, q, k, v, **kwargs):
        return self.base.reference(q, k, v, **kwargs)

    def __call__(self, q, k, v):
        amount = self.amount
        if self.grad_of is not None:
            index = "qkv".index(self.grad_of)

            class Skew(torch.autograd.Function):
                @staticmethod
                def forward(ctx, *xs):
                    return tuple(x.view_as(x) for x in xs)

                @staticmethod
                def backward(ctx, *grads):
                    return tuple(g + amount if i == index else g for i, g in enumerate(grads))

            q, k, v = Skew.apply(q, k, v)
        out = self.base(q, k, v)
        if self.rows is not None:
            bump = torch.zeros_like(out)
            bump[:, self.rows] = amount
            out = out + bump
        return out


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_full_error_compares_every_gradient(which):
    var = _WrongVariant(registry.VARIANTS["Production"], grad_of=which, amount=0.5)
    gen = torch.Generator().manual_seed(3)
    q, k, v, g = (torch.randn(1, 64, 4, 8, generator=gen) for _ in range(4))
    assert measure.full_error(var, q, k, v, g, False, "cpu") < 1e-4  # the output is right
    assert measure.full_error(var, q, k, v, g, True, "cpu") >= 0.5 - 1e-4


@pytest.mark.parametrize("rows", [slice(-1, None), slice(200, 256)])
def test_sampled_error_sees_rows_across_the_sequence(rows):
    var = _WrongVariant(registry.VARIANTS["longnet"], rows=rows, amount=0.5)
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 256, 4, 8, generator=gen) for _ in range(3))
    assert measure.sampled_error(var, q, k, v, num_rows=8) >= 0.5 - 1e-4
    assert measure.sampled_error(registry.VARIANTS["longnet"], q, k, v, num_rows=8) < 1e-4


def test_cuda_event_timer_waits_for_its_end_event_and_reports_seconds(monkeypatch):
    """The CUDA branch on a CPU build: events faked, the order of calls and the units checked."""
    log = []

    class FakeEvent:
        def __init__(self, enable_timing=False):
            assert enable_timing
            self.done = False

        def record(self):
            log.append("record")

        def synchronize(self):
            log.append("synchronize")
            self.done = True

        def elapsed_time(self, end):
            assert end.done, "elapsed_time read before the end event completed"
            return 2.5  # milliseconds, as torch.cuda.Event reports

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    timer = measure.timer_for("cuda")
    assert isinstance(timer, measure.CudaEventTimer)
    calls = []
    per_call = measure.round_seconds(lambda: (calls.append(1), log.append("call")), 5, timer)
    assert per_call == pytest.approx(2.5e-3 / 5)
    assert log == ["record"] + ["call"] * 5 + ["record", "synchronize"]
