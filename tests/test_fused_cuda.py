"""The fused CUDA kernels' calls: what each block is made to meet, and flash's window.

Values on a GPU are tests/test_cuda.py's; every call's arguments against the kernels' own
checks are tests/test_fake_cuda.py's. Here: the pure pieces, on CPU.
"""

import torch

from ring_attention import fused_cuda, kernels
from ring_attention.masks import band_keeps
from tests.fake_cuda import flash_keeps


def test_cuda_ready_pads_head_dim_and_aligns():
    x = torch.zeros(2, 3, 5, 36, dtype=torch.float16)
    padded = fused_cuda.ready(x)
    assert padded.shape == (2, 3, 5, 40) and padded.is_contiguous()
    assert torch.equal(padded[..., :36], x) and not padded[..., 36:].any()
    aligned = torch.zeros(2, 3, 5, 64, dtype=torch.float16)
    assert fused_cuda.ready(aligned) is aligned  # nothing to fix: no copy
    offset_view = torch.zeros(2 * 3 * 5 * 64 + 1, dtype=torch.float16)[1:].view(2, 3, 5, 64)
    fixed = fused_cuda.ready(offset_view)
    assert fixed.storage_offset() == 0 and torch.equal(fixed, offset_view)
    odd_stride = torch.zeros(2, 3, 5, 65, dtype=torch.float16)[..., :64]  # row stride 130 bytes
    assert not fused_cuda.aligned(odd_stride)
    assert fused_cuda.aligned(fused_cuda.ready(odd_stride))


def test_batch_chunks_respect_the_grid_limit():
    assert fused_cuda.batch_chunks(5) == [(0, 5)]
    limit = fused_cuda.MAX_GRID_BATCH
    assert fused_cuda.batch_chunks(2 * limit + 3) == [(0, limit), (limit, limit), (2 * limit, 3)]



def test_backend_choice(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    assert kernels.backend(torch.zeros(1, 1, 1, 8)) == "cpu"
    with FakeTensorMode():
        half = torch.empty(1, 1, 4, 36, dtype=torch.float16, device="cuda")
        wide = torch.empty(1, 1, 4, 264, dtype=torch.float16, device="cuda")
        single = torch.empty(1, 1, 4, 64, dtype=torch.float32, device="cuda")
        bf16 = torch.empty(1, 1, 4, 64, dtype=torch.bfloat16, device="cuda")
        assert kernels.backend(half) == "flash"  # padded to 40
        assert kernels.backend(wide) == "efficient"
        assert kernels.backend(single) == "efficient"
        monkeypatch.setattr(fused_cuda, "capability", lambda device: (7, 5))
        assert kernels.backend(half) == "efficient"
        assert kernels.backend(bf16) == "math"  # no bf16 before sm80
        monkeypatch.setattr(torch.backends.cuda, "mem_efficient_sdp_enabled", lambda: False)
        assert kernels.backend(half) == "math"


def test_flash_window_keeps_exactly_the_band():
    """Every band of every block up to 7 x 7: the window keeps exactly its keys, and where
    there is none (``None``: the block runs on math), no pair of sides does."""
    cpu = torch.device("cpu")
    for q_len in range(1, 8):
        for k_len in range(1, 8):
            windows = {}  # what each pair of sides keeps -> the pair
            for left in range(k_len + 2):
                for right in range(k_len + 2):
                    windows.setdefault(flash_keeps(q_len, k_len, left, right).numpy().tobytes(), (left, right))
            for lo in range(-q_len - 2, k_len + 2):
                for hi in range(lo, k_len + 3):
                    band = (lo, hi)
                    window = fused_cuda.flash_window(q_len, k_len, band)
                    want = band_keeps(q_len, k_len, band, cpu)
                    if window is not None:
                        assert torch.equal(flash_keeps(q_len, k_len, *window), want), (q_len, k_len, band, window)
                    else:
                        assert want.numpy().tobytes() not in windows, (q_len, k_len, band)


def test_flash_window_of_a_sliding_window_tile():
    # a causal window's tile: T queries, the band's reach of keys before them, aligned at the end
    assert fused_cuda.flash_window(64, 64 + 255, (0, 255)) == (255, 0)
    assert fused_cuda.flash_window(64, 100, (-10, 40)) == (46, 4)
    # flash keeps key i + Lk - Lq of every row: a band that stops before it is no window
    assert fused_cuda.flash_window(64, 100, (-10, 26)) is None


def test_band_call_keeps_exactly_the_band_on_the_rows_and_keys_with_pairs():
    """Every band of every block up to 7 x 7 that flash runs: the rows and keys it leaves out
    hold no pair, and its window on the rest keeps exactly the band's keys. Every band with a
    pair in a block of at most one more query than keys runs on flash."""
    cpu = torch.device("cpu")
    for q_len in range(1, 8):
        for k_len in range(1, 8):
            for lo in range(-q_len - 2, k_len + 2):
                for hi in range(lo, k_len + 3):
                    want = band_keeps(q_len, k_len, (lo, hi), cpu)
                    call = fused_cuda.band_call(q_len, k_len, (lo, hi))
                    if call is None:
                        assert not want.any() or q_len > k_len + 1, (q_len, k_len, lo, hi)
                        continue
                    rows, keys = call.rows, call.keys
                    assert want.sum() == want[rows, keys].sum(), (q_len, k_len, lo, hi, call)
                    got = flash_keeps(rows.stop - rows.start, keys.stop - keys.start, *call.window)
                    assert torch.equal(got, want[rows, keys]), (q_len, k_len, lo, hi, call)


def test_band_call_of_a_window_tiles_far_edge():
    # window (4095, 0), tiles of 256: keys [a - 4096, a - 3840) for queries [a, a + 256) keep j > i
    call = fused_cuda.band_call(256, 256, (1, 10**9))
    assert fused_cuda.flash_window(256, 256, (1, 10**9)) is None
    assert call == fused_cuda.BandCall(slice(0, 255), slice(1, 256), (0, 255))  # no pair in row 255, key 0
