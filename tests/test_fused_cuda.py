"""The fused CUDA kernels' calls: what each block is made to meet, and flash's window.

Values on a GPU are tests/test_cuda.py's; every call's arguments against the kernels' own
checks are tests/test_fake_cuda.py's. Here: the pure pieces, on CPU.
"""

import torch

from ring_attention import fused_cuda, kernels
from ring_attention.masks import band_keeps


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


def _flash_keeps(q_len: int, k_len: int, left: int, right: int) -> torch.Tensor:
    """``[Lq, Lk]`` keys flash keeps with ``window_size_left/right``, as its source does it:
    mha_fwd / mha_bwd turn a side ``>= seqlen_k`` into -1; ``set_params_fprop`` then makes a
    -1 side ``seqlen_k`` when the other is bounded (both -1: no mask at all); mask.h
    ``apply_mask_local`` keeps column ``j`` of row ``i`` when
    ``max(0, i + Lk - Lq - left) <= j < min(Lk, i + 1 + Lk - Lq + right)``."""
    left = -1 if left >= k_len else left
    right = -1 if right >= k_len else right
    if left < 0 and right < 0:
        return torch.ones(q_len, k_len, dtype=torch.bool)
    left = k_len if left < 0 else left
    right = k_len if right < 0 else right
    i = torch.arange(q_len).unsqueeze(1)
    j = torch.arange(k_len).unsqueeze(0)
    low = (i + k_len - q_len - left).clamp(min=0)
    high = (i + 1 + k_len - q_len + right).clamp(max=k_len)
    return (j >= low) & (j < high)


def test_flash_window_keeps_exactly_the_band():
    """Every band of every block up to 7 x 7: the window keeps exactly its keys, and where
    there is none (``None``: the block runs on math), no pair of sides does."""
    cpu = torch.device("cpu")
    for q_len in range(1, 8):
        for k_len in range(1, 8):
            windows = {}  # what each pair of sides keeps -> the pair
            for left in range(k_len + 2):
                for right in range(k_len + 2):
                    windows.setdefault(_flash_keeps(q_len, k_len, left, right).numpy().tobytes(), (left, right))
            for lo in range(-q_len - 2, k_len + 2):
                for hi in range(lo, k_len + 3):
                    band = (lo, hi)
                    window = fused_cuda.flash_window(q_len, k_len, band)
                    want = band_keeps(q_len, k_len, band, cpu)
                    if window is not None:
                        assert torch.equal(_flash_keeps(q_len, k_len, *window), want), (q_len, k_len, band, window)
                    else:
                        assert want.numpy().tobytes() not in windows, (q_len, k_len, band)


def test_flash_window_of_a_sliding_window_tile():
    # a causal window's tile: T queries, the band's reach of keys before them, aligned at the end
    assert fused_cuda.flash_window(64, 64 + 255, (0, 255)) == (255, 0)
    assert fused_cuda.flash_window(64, 100, (-10, 40)) == (46, 4)
    # flash keeps key i + Lk - Lq of every row: a band that stops before it is no window
    assert fused_cuda.flash_window(64, 100, (-10, 26)) is None
