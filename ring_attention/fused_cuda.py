"""The fused CUDA attention kernels, each called only with inputs it accepts.

:mod:`ring_attention.kernels` chooses a backend per block; this module runs the two CUDA
ones on a block ``q [B, H, Lq, D]``, ``k``, ``v [B, H, Lk, D]``:

- ``flash``: ``aten._scaled_dot_product_flash_attention`` (float16/bfloat16, sm80 or newer,
  flash enabled in ``torch.backends.cuda``). Its kernel requires ``D % 8 == 0`` and
  ``D <= 256``, loads 16-byte vectors, and puts the batch on the grid's y axis. Its
  backward for ``192 < D <= 224`` runs only on sm80 and sm90: elsewhere that backward
  runs on ``efficient``. A block cut by a sliding window (a band) runs on
  ``aten._flash_attention_forward`` / ``_backward`` with ``window_size_left/right``
  on the rows and keys that hold a pair (:func:`band_call`), the same kernel with its
  local mask.
- ``efficient``: ``aten._scaled_dot_product_efficient_attention`` (also float32 and
  older GPUs and ``D > 256``). Head dim a multiple of 8 (half) or 4 (float32); its LSE
  is padded along L to a multiple of 32; the batch is on the grid's z axis. It takes no
  band here: such blocks run on ``math``.

What every call gets, whatever the caller passes: the head dim zero-padded to a multiple
of 8 (zero columns change neither the scores nor the kept columns of the output; the
scale stays explicit), inputs copied when their storage offset or any stride is not
16-byte aligned, and batches above 65,535 split into several launches.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F

from .masks import band_rows

aten = torch.ops.aten

# The launch grid's y (flash) or z (efficient) dimension holds the batch: at most 2^16 - 1.
MAX_GRID_BATCH = 65_535
FLASH_MAX_HEAD_DIM = 256
_ALIGN_BYTES = 16
_EFFICIENT_LSE_ALIGN = 32


def capability(device: torch.device) -> tuple[int, int]:
    """Compute capability of ``device``; a CPU-only build sees only fake CUDA tensors."""
    if not torch.cuda.is_available():
        return (8, 0)  # fake CUDA tensors (FakeTensorMode): trace the sm80+ path
    return _capability_of(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _capability_of(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def kind(q: torch.Tensor) -> str:
    """The fused kernel a CUDA block ``q [B, H, L, D]`` runs on: flash, efficient, or math
    where neither takes it."""
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return "math"
    half = q.dtype != torch.float32
    cap = capability(q.device)
    if half and round_up(q.shape[-1], 8) <= FLASH_MAX_HEAD_DIM and cap >= (8, 0) \
            and torch.backends.cuda.flash_sdp_enabled():  # type: ignore[no-untyped-call]  # unannotated in torch
        return "flash"
    bf16_ok = q.dtype != torch.bfloat16 or cap >= (8, 0)
    if bf16_ok and cap >= (5, 0) and torch.backends.cuda.mem_efficient_sdp_enabled():  # type: ignore[no-untyped-call]  # unannotated in torch
        return "efficient"
    return "math"


def flash_window(q_len: int, k_len: int, band: tuple[int, int]) -> tuple[int, int] | None:
    """flash's ``(window_size_left, window_size_right)`` that keep exactly the keys of
    ``band = (lo, hi)`` (key ``j`` for query ``i`` when ``lo <= j - i <= hi``) in a block of
    ``q_len`` queries and ``k_len`` keys, or ``None`` where no window does.

    flash aligns its window bottom-right: it keeps ``j`` for ``i`` when
    ``i + c - left <= j <= i + c + right``, ``c = k_len - q_len`` (mask.h ``apply_mask_local``),
    after mha_fwd / mha_bwd turn a side ``>= k_len`` into ``-1`` and ``set_params_fprop`` a
    ``-1`` side into ``k_len`` (flash_api.cpp). So ``left = c - lo``, ``right = hi - c``, each
    at least 0. A right side ``>= k_len`` becomes ``k_len``, which keeps every key to the
    right only when ``q_len <= k_len + 1``.
    """
    lo, hi = band
    if lo <= 1 - q_len and hi >= k_len - 1:  # every key of every row: both sides become -1, no mask
        return k_len, k_len
    c = k_len - q_len
    left, right = c - lo, hi - c
    if left < 0 or right < 0:
        return None
    # A left side of k_len or more binds no row (i + c - left < 0): k_len - 1 binds none
    # either, and stays below k_len, where flash would make it -1 (and so, with a right side
    # as large, drop the mask).
    left = min(left, k_len - 1)
    if right > k_len and q_len > k_len + 1:
        return None
    return left, min(right, k_len)  # what flash makes of a larger one, and within its int32


@dataclasses.dataclass(frozen=True)
class BandCall:
    """How flash runs a block cut by a band: on its ``rows`` that have a key in the band and
    the ``keys`` some row keeps (the rest of the block holds no pair: out 0, LSE ``-inf``,
    no gradient), with flash's ``window`` (:func:`flash_window`) on that sub-block."""

    rows: slice
    keys: slice
    window: tuple[int, int]


def band_call(q_len: int, k_len: int, band: tuple[int, int]) -> BandCall | None:
    """The :class:`BandCall` of a ``q_len x k_len`` block with ``band = (lo, hi)``, or ``None``
    where flash cannot run it (no pair at all, or no window keeps the band's keys).

    Cutting the rows and keys without pairs is what lets flash take the edges of a sliding
    window: its window always keeps the block's bottom-right cell, and in the cut block that
    cell is a pair (the last row's last key is the last key any row keeps). A tile of a
    window ``(4095, 0)`` whose keys start at a multiple of the tile, for one, keeps
    ``j > i``: no window of the whole block, but one (``(0, Lk)``) of the block without its
    last row and first key."""
    lo, hi = band
    r0, r1 = band_rows(q_len, k_len, band)
    if r0 >= r1:
        return None
    k0, k1 = max(0, r0 + lo), min(k_len, r1 + hi)  # keys those rows keep
    window = flash_window(r1 - r0, k1 - k0, (lo + r0 - k0, hi + r0 - k0))
    return None if window is None else BandCall(slice(r0, r1), slice(k0, k1), window)


def backward_kind(q: torch.Tensor, chosen: str) -> str:
    """The kernel a block's backward runs on: flash's backward takes ``192 < D <= 224`` only
    on sm80 and sm90 (flash_api.cpp ``mha_bwd``; sm86/89, sm100 and sm120 raise), though the
    forward runs there. Such blocks' backward runs on the efficient kernel, which takes the
    forward's LSE padded."""
    if chosen != "flash":
        return chosen
    padded = round_up(q.shape[-1], 8)
    return "flash" if not 192 < padded <= 224 or capability(q.device) in ((8, 0), (9, 0)) else "efficient"


def forward(
    kind: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
    window: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, H, Lq, D], lse [B, H, Lq] float32, contiguous)`` of one block on ``kind``
    (flash or efficient); ``window``: flash's window sizes (:func:`flash_window`)."""
    d, lq, lk = q.shape[-1], q.shape[2], k.shape[2]
    q, k, v = (ready(x) for x in (q, k, v))
    outs, lses = [], []
    for start, length in batch_chunks(q.shape[0]):
        qb, kb, vb = (x.narrow(0, start, length) for x in (q, k, v))
        if window is not None:  # the flash kernel takes [B, L, H, D]: a transposed view
            res = aten._flash_attention_forward.default(
                qb.transpose(1, 2), kb.transpose(1, 2), vb.transpose(1, 2), None, None, lq, lk, 0.0, False, False,
                scale=scale, window_size_left=window[0], window_size_right=window[1],
            )
            outs.append(res[0].transpose(1, 2))
            lses.append(res[1])
        elif kind == "flash":
            res = aten._scaled_dot_product_flash_attention.default(qb, kb, vb, 0.0, causal, False, scale=scale)
            outs.append(res[0])
            lses.append(res[1])
        else:
            res = aten._scaled_dot_product_efficient_attention.default(
                qb, kb, vb, None, True, 0.0, causal, scale=scale
            )
            outs.append(res[0])
            lses.append(res[1][..., :lq])
    out, lse = _cat(outs), _cat(lses)
    return out[..., :d], lse.contiguous()


def backward(
    kind: str, dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, causal: bool, scale: float, window: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` of one block on ``kind`` (:func:`backward_kind`), given
    the rows' final ``out`` and ``lse``; ``window`` as in :func:`forward`."""
    d, lq, lk = q.shape[-1], q.shape[2], k.shape[2]
    dout, q, k, v = (ready(x) for x in (dout, q, k, v))
    out = _efficient_out(out) if kind == "efficient" else ready(out)
    lse = lse.contiguous()
    if kind == "efficient":
        pad = round_up(lse.shape[-1], _EFFICIENT_LSE_ALIGN) - lse.shape[-1]
        lse = F.pad(lse, (0, pad)) if pad else lse
    no_rng = torch.empty(0, dtype=torch.int64, device=q.device)  # read only with dropout
    grads = []
    for start, length in batch_chunks(q.shape[0]):
        do_b, q_b, k_b, v_b, o_b, lse_b = (x.narrow(0, start, length) for x in (dout, q, k, v, out, lse))
        if window is not None:
            res = aten._flash_attention_backward.default(
                *(x.transpose(1, 2) for x in (do_b, q_b, k_b, v_b, o_b)), lse_b, None, None,
                lq, lk, 0.0, False, no_rng, no_rng, scale=scale,
                window_size_left=window[0], window_size_right=window[1],
            )
            grads.append(tuple(g.transpose(1, 2) for g in res[:3]))
        elif kind == "flash":
            grads.append(aten._scaled_dot_product_flash_attention_backward.default(
                do_b, q_b, k_b, v_b, o_b, lse_b, None, None,
                lq, lk, 0.0, causal, no_rng, no_rng, scale=scale,
            )[:3])
        else:
            grads.append(aten._scaled_dot_product_efficient_attention_backward.default(
                do_b, q_b, k_b, v_b, None, o_b, lse_b, no_rng, no_rng,
                0.0, [True, True, True, False], causal, scale=scale,
            )[:3])
    dq, dk, dv = (_cat(list(g))[..., :d] for g in zip(*grads))
    return dq, dk, dv


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def aligned(x: torch.Tensor) -> bool:
    """Whether ``x``'s storage offset and every stride are 16-byte aligned, its last stride 1."""
    size = x.element_size()
    if x.stride(-1) != 1 or (x.storage_offset() * size) % _ALIGN_BYTES:
        return False
    return all((s * size) % _ALIGN_BYTES == 0 for s in x.stride()[:-1])


def ready(x: torch.Tensor) -> torch.Tensor:
    """Head dim padded to a multiple of 8, storage offset and strides 16-byte aligned."""
    pad = round_up(x.shape[-1], 8) - x.shape[-1]
    if pad:
        return F.pad(x, (0, pad))  # a fresh, contiguous (hence aligned) tensor
    return x if aligned(x) else x.clone(memory_format=torch.contiguous_format)


def _efficient_out(out: torch.Tensor) -> torch.Tensor:
    """``out [B, H, L, D]`` as the efficient backward reads it: a transposed ``[B, L, H, D']``
    contiguous tensor, ``D'`` the padded head dim.

    Its kernel takes out's row stride to be ``H * D'`` instead of reading it
    (kernel_backward.h, ``Params::o_strideM``), and reads out for the delta term of dQ and
    dK: a head slice, a padded copy or a ``[B, H, L, D]``-contiguous tensor would be read
    at the wrong rows. This is the layout the efficient forward returns; one copy otherwise.
    """
    b, h, length, d = out.shape
    rows = out.transpose(1, 2)  # [B, L, H, D]
    pad = round_up(d, 8) - d
    if pad:
        return F.pad(rows, (0, pad)).transpose(1, 2)  # F.pad returns it contiguous
    if (length == 1 or out.stride(2) == h * d) and aligned(out):
        return out
    return rows.contiguous().transpose(1, 2)


def batch_chunks(batch: int) -> list[tuple[int, int]]:
    """``(start, length)`` of each launch along the batch: at most MAX_GRID_BATCH each."""
    return [(i, min(MAX_GRID_BATCH, batch - i)) for i in range(0, batch, MAX_GRID_BATCH)]


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
