"""Run CUDA code paths on a CPU-only build of torch, and check every fused-kernel call.

``torch._subclasses.fake_tensor.FakeTensorMode`` creates CUDA tensors without a GPU and
runs CUDA ops through their meta kernels: shapes, dtypes, strides, storage offsets and
the op called are real, values are not. On top of it this module stacks:

- :class:`_RerouteBindings`, a ``TorchFunctionMode`` for the few Python bindings that take
  a CUDA device guard and so fail on a CPU-only build ("PyTorch is not linked with support
  for cuda devices"): ``Tensor.__getitem__``/``__setitem__``/``copy_``/``contiguous``,
  ``~``, ``new_tensor``, ``cuda``, ``nonzero`` and ``Tensor.to`` onto CUDA. They are
  rerouted to the aten ops they stand for (others are added when a run hits them).
- :class:`KernelChecker`, a ``TorchDispatchMode`` that sees every aten call. For each call
  of a fused attention op it checks what the real CUDA kernel checks (or silently needs),
  and it flags host synchronization. Violations are recorded, never raised inside
  dispatch, so one run lists all of them. It also counts the calls that would launch a
  kernel.
- a backward driver: autograd on fake CUDA tensors aborts the process on a CPU-only build,
  so ``PackedAttention.apply`` is replaced by a function that runs the Function's
  ``forward`` and then at once its ``backward`` (with ``ones`` as output gradients), checks
  the gradients' shapes/dtypes/devices, and returns the forward outputs.

Usage::

    with fake_cuda() as fc:
        q, k, v = fc.qkv(batch=2, seq_len=96, heads=8, kv_heads=2, head_dim=36, dtype=torch.float16)
        out = ring_attention.dilated_attention(q, k, v, pattern)
    fc.assert_clean()                 # no violation, every backward's grads well formed
    fc.backward_calls                 # PackedAttention backwards driven
    fc.checker.fused_calls            # Counter: fused op name -> calls
    fc.checker.launches               # kernel launches

Never call ``.backward()`` or ``torch.autograd.grad`` on fake CUDA tensors, and never make
fake CUDA tensors with ``requires_grad=True``: the process aborts.

Each rule names where it comes from in PyTorch's source (read through the project's source
search: file and function in the rule's docstring or comment). The rules, per fused op, for
the pretended compute capability (``fake_cuda(capability=...)``, sm80 by default):

=============================  ===================================================  ==========================================
op                             demands                                              mirrors
=============================  ===================================================  ==========================================
flash forward / backward       fp16/bf16; D % 8 == 0 and D <= 256; unit last        flash_api.cpp mha_fwd / mha_bwd
                               stride, 16-byte aligned pointer and strides; same
                               batch, kv heads dividing heads; batch, heads <=
                               65,535; causal only on square blocks
flash (any)                    sm80 or newer                                        sdp_utils.cpp check_flash_attention_
                                                                                    hardware_support
flash backward                 192 < D <= 224 only on sm80 and sm90                 flash_api.cpp mha_bwd; sdp_utils.cpp
                                                                                    check_requires_grad_and_head_dim_gt192_*
flash backward                 LSE contiguous float32 [B, H, Lq]                    attention_backward.cu (bare data_ptr)
flash direct (a band's window) [B, L, H, D] operands, the rules above; no varlen;    attention.cu _flash_attention_forward,
                               max_q/max_k the lengths; both window sides >= 0,     flash_api.cpp mha_fwd / set_params_fprop,
                               not causal, right <= Lk unless Lq <= Lk + 1          mask.h apply_mask_local
efficient forward / backward   fp16/bf16/fp32; D x itemsize % 16 == 0; same         attention.cu, kernel_forward.h /
                               alignment; equal heads; same grid limits; LSE          kernel_backward.h check_supported
                               requested, and in backward the forward's padded
                               [B, H, ceil(Lq/32)*32] LSE
efficient (any)                sm50 or newer; bfloat16 only on sm80 or newer        sdp_utils.cpp check_mem_efficient_hardware_
                                                                                    support, less_than_sm80_mem_efficient_dtypes
efficient backward             out's row stride H x D ([B, L, H, D]-contiguous      kernel_backward.h Params::o_strideM
                               rows): assumed, not read
any fused call                 dropout 0; causal only with a float32 scale > 0      (exactness; issue 11)
CPU fused ops, bmm, baddbmm    never on CUDA tensors                                (wrong device's kernel; unfused path)
item, nonzero, equal, ...      never (host synchronization)                         (DataDependentOutputException)
=============================  ===================================================  ==========================================

``tests/test_fake_cuda.py`` plants a call that breaks each rule and sees it fire.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import struct
import sys
from collections import Counter
from collections.abc import Iterator
from unittest import mock

import torch
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensorMode,
)
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from perf.counters import launches_kernel  # the one definition of a launch, shared with perf

aten = torch.ops.aten

# CUDA caps gridDim.y and gridDim.z at 65,535. Flash puts batch on y and heads on z
# (flash_fwd_launch_template.h, run_flash_fwd: ``dim3 grid(num_m_block, params.b, params.h)``);
# the mem-efficient kernel puts heads on y and batch on z (kernel_forward.h, getBlocksGrid:
# ``dim3(ceil_div(num_queries, kQueriesPerBlock), num_heads, num_batches)``).
MAX_GRID_YZ = 65_535

# Both fused CUDA kernels load q/k/v/out/dout as 128-bit vectors.
VECTOR_BYTES = 16

Capability = tuple[int, int]
# The architectures the tier pretends in turn: T4, A100, RTX 30xx/A10 (sm86), H100, B200.
CAPABILITIES: tuple[Capability, ...] = ((7, 5), (8, 0), (8, 6), (9, 0), (10, 0))

_PACKAGE_DIR = os.sep + "ring_attention" + os.sep
_TESTS_DIR = os.sep + "tests" + os.sep


@dataclasses.dataclass(frozen=True)
class Violation:
    """One broken rule: the aten op, why, and the innermost ``ring_attention`` frame that called it."""

    op: str
    reason: str
    where: str

    def __str__(self) -> str:
        return f"{self.op}: {self.reason} (at {self.where})"


# --- rules of the fused kernels -------------------------------------------------------


def _alignment_problems(name: str, t: torch.Tensor) -> list[str]:
    """16-byte vector loads need the data pointer and every stride that moves it aligned.

    The allocator returns aligned storages, so the pointer is aligned iff
    ``storage_offset * itemsize`` is. A stride of a size-1 dimension is never multiplied by
    a nonzero index, so it cannot misalign anything and is skipped.
    """
    item = t.element_size()
    problems = []
    if t.storage_offset() * item % VECTOR_BYTES:
        problems.append(
            f"{name} data pointer not 16-byte aligned: storage_offset {t.storage_offset()} "
            f"x {item} bytes"
        )
    bad = [
        f"stride({dim}) = {t.stride(dim) * item} B"
        for dim in range(t.dim() - 1)
        if t.size(dim) > 1 and t.stride(dim) * item % VECTOR_BYTES
    ]
    if bad:
        problems.append(f"{name} strides not 16-byte multiples: {', '.join(bad)} (strides {t.stride()})")
    return problems


def _io_problems(tensors: dict[str, torch.Tensor], dtypes: tuple[torch.dtype, ...], kernel: str) -> list[str]:
    """Device, dtype, unit last stride and alignment of the kernel's ``[B, H, L, D]`` operands."""
    problems = []
    q = tensors["q"]
    if q.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        problems.append(f"{kernel} takes {names}; got {q.dtype}")
    for name, t in tensors.items():
        if t.device.type != "cuda":
            problems.append(f"{name} on {t.device}, not CUDA")
        if t.dtype != q.dtype:
            problems.append(f"{name} dtype {t.dtype} differs from q's {q.dtype}")
        if t.dim() != 4:
            problems.append(f"{name} must be 4-d [B, H, L, D], got shape {tuple(t.shape)}")
            continue
        if t.stride(-1) != 1:
            problems.append(f"{name}.stride(-1) = {t.stride(-1)}, must be 1")
        problems += _alignment_problems(name, t)
    return problems


def _shape_problems(q, k, v, causal: bool, *, gqa: bool) -> list[str]:
    """Batch, heads, lengths: shared by both CUDA kernels (q, k, v in ``[B, H, L, D]``)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return []  # reported by _io_problems
    problems = []
    b, h, lq, d = q.shape
    if k.size(0) != b or v.size(0) != b:
        problems.append(f"batch differs: q {b}, k {k.size(0)}, v {v.size(0)}")
    if k.size(1) != v.size(1) or k.size(2) != v.size(2):
        problems.append(f"k {tuple(k.shape)} and v {tuple(v.shape)} differ in heads or length")
    if gqa:
        if h % k.size(1):
            problems.append(f"kv heads {k.size(1)} do not divide q heads {h}")
    elif k.size(1) != h:
        problems.append(f"kv heads {k.size(1)} != q heads {h}: this kernel has no grouped-query support")
    if k.size(-1) != d or v.size(-1) != d:
        problems.append(f"head dims differ: q {d}, k {k.size(-1)}, v {v.size(-1)}")
    if b > MAX_GRID_YZ:
        problems.append(f"batch {b} > {MAX_GRID_YZ}: the launch grid's batch dimension overflows")
    if h > MAX_GRID_YZ:
        problems.append(f"heads {h} > {MAX_GRID_YZ}: the launch grid's heads dimension overflows")
    if causal and lq != k.size(2):
        problems.append(
            f"causal block is not square (Lq {lq}, Lk {k.size(2)}): flash aligns the mask "
            "bottom-right, the CPU op top-left"
        )
    return problems


def _scale_problems(q, causal: bool, scale) -> list[str]:
    """A causal fused call multiplies its -inf mask by the scale: 0 or negative gives NaN.

    Seen on CPU (issue 11: ``dense_attention(..., causal=True, scale=0.0)`` gives 1008 NaN in
    1024 values). The scale travels as float32 into the kernels, so a tiny positive scale
    that rounds to 0 counts as 0.
    """
    if not causal:
        return []
    s = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    try:
        s32 = struct.unpack("f", struct.pack("f", s))[0]
    except OverflowError:  # beyond float32's range: rounds to +-inf, sign kept
        s32 = s
    if s32 <= 0.0:
        return [f"causal with scale {s!r} (float32 {s32!r}) <= 0: the masked -inf times the scale is NaN"]
    return []


def _flash_head_dim(d: int, which: str) -> list[str]:
    # flash_api.cpp mha_fwd / mha_bwd: "head_size must be a multiple of 8, this is ensured
    # by padding!" (SDPA's composite pads; a direct call does not) and "...only supports head
    # dimension at most 256".
    problems = []
    if d % 8:
        problems.append(f"head dim {d} % 8 != 0 ({which} checks head_size % 8 == 0; only SDPA pads)")
    if d > 256:
        problems.append(f"head dim {d} > 256 ({which} supports at most 256)")
    return problems


def _flash_hardware(cap: Capability) -> list[str]:
    # sdp_utils.cpp check_flash_attention_hardware_support: sm80 and newer.
    return [] if cap >= (8, 0) else [f"flash attention on sm{cap[0]}{cap[1]}: it needs sm80 or newer"]


def _flash_backward_head_dim(d: int, cap: Capability) -> list[str]:
    # flash_api.cpp mha_bwd: "if (head_size > 192 && (head_size <= 224 || is_dropout))
    # TORCH_CHECK(is_sm80 || is_sm90, ...)"; SDPA refuses it up front in sdp_utils.cpp
    # check_requires_grad_and_head_dim_gt192_constraints_on_sm86_89(_or_120).
    if 192 < d <= 224 and cap not in ((8, 0), (9, 0)):
        return [f"flash backward with head dim {d} in (192, 224] on sm{cap[0]}{cap[1]}: only sm80 and sm90 run it"]
    return []


def _efficient_hardware(q, cap: Capability) -> list[str]:
    # sdp_utils.cpp check_mem_efficient_hardware_support (sm50 and newer) and
    # less_than_sm80_mem_efficient_dtypes (float16, float32: no bfloat16 before sm80).
    if cap < (5, 0):
        return [f"mem-efficient attention on sm{cap[0]}{cap[1]}: it needs sm50 or newer"]
    if q.dtype == torch.bfloat16 and cap < (8, 0):
        return [f"mem-efficient attention in bfloat16 on sm{cap[0]}{cap[1]}: bfloat16 needs sm80 or newer"]
    return []


def _dropout_problems(p) -> list[str]:
    return [] if p == 0.0 else [f"dropout_p {p} != 0: attention must be exact"]


_HALF = (torch.float16, torch.bfloat16)
# sdp_utils.cpp, can_use_mem_efficient_attention: greater_than_or_equal_sm80_mem_efficient_dtypes.
_EFFICIENT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _rule_flash_forward(a: dict, cap: Capability) -> list[str]:
    """flash_api.cpp mha_fwd, called by attention.cu _flash_attention_forward with q/k/v
    transposed to [B, L, H, D] (so the checked ``stride(-1)`` is D's stride either way)."""
    q, k, v, causal = a["query"], a["key"], a["value"], a["is_causal"]
    return (
        _io_problems({"q": q, "k": k, "v": v}, _HALF, "flash attention")
        + _flash_hardware(cap)
        + _flash_head_dim(q.size(-1), "mha_fwd")
        + _shape_problems(q, k, v, causal, gqa=True)
        + _dropout_problems(a["dropout_p"])
        + _scale_problems(q, causal, a["scale"])
    )


def _rule_flash_backward(a: dict, cap: Capability) -> list[str]:
    """flash_api.cpp mha_bwd (via attention_backward.cu _flash_attention_backward).

    The wrapper calls ``.contiguous()`` on dout and out, which keeps a misaligned but
    contiguous view as it is, so their alignment is checked like q's. The LSE is read
    through a bare ``softmax_lse.data_ptr()`` as ``b x h x seqlen_q``: it must be a
    contiguous float32 ``[B, H, Lq]``.
    """
    dout, q, k, v, out, lse = (a[n] for n in ("grad_out", "query", "key", "value", "out", "logsumexp"))
    causal, max_q, max_k = a["is_causal"], a["max_q"], a["max_k"]
    problems = (
        _io_problems({"q": q, "k": k, "v": v, "out": out, "dout": dout}, _HALF, "flash attention")
        + _flash_hardware(cap)
        + _flash_head_dim(q.size(-1), "mha_bwd")
        + _flash_backward_head_dim(q.size(-1), cap)
        + _shape_problems(q, k, v, causal, gqa=True)
        + _dropout_problems(a["dropout_p"])
        + _scale_problems(q, causal, a["scale"])
    )
    b, h, lq, _ = q.shape
    problems += _lse_problems(lse, (b, h, lq), contiguous=True)
    if out.shape != q.shape or dout.shape != q.shape:
        problems.append(f"out {tuple(out.shape)} / dout {tuple(dout.shape)} differ from q {tuple(q.shape)}")
    if (max_q, max_k) != (lq, k.size(2)):
        problems.append(f"max_q/max_k {(max_q, max_k)} != block lengths {(lq, k.size(2))}")
    return problems


def _bhld(t):
    """A ``[B, L, H, D]`` operand of the direct flash ops as ``[B, H, L, D]``: a view, so its
    strides and offset (what the kernel reads) move with it."""
    return t.transpose(1, 2) if isinstance(t, torch.Tensor) and t.dim() == 4 else t


def flash_keeps(q_len: int, k_len: int, left: int, right: int) -> torch.Tensor:
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


def _flash_direct_problems(a: dict, lq: int, lk: int) -> list[str]:
    """What ``_flash_attention_forward/_backward`` take beyond SDPA's flash op.

    - ``cum_seq_q/k`` switch to the varlen kernel (``[total, H, D]`` operands, int32 offsets):
      the library does not call it.
    - ``max_q/max_k`` must be the block's lengths.
    - A window (flash_api.cpp ``mha_fwd``/``mha_bwd``, ``set_params_fprop``; mask.h
      ``apply_mask_local``) is passed as two explicit sides ``>= 0``: ``-1`` means unbounded
      only until the other side is bounded, then ``seqlen_k``; a side ``>= seqlen_k`` is made
      ``-1``, so a right side above ``seqlen_k`` is cut to ``seqlen_k``, which is not every key
      to the right when ``Lq > Lk + 1``; ``is_causal`` sets the right side to 0.
    """
    problems = []
    if a.get("cum_seq_q") is not None or a.get("cum_seq_k") is not None:
        problems.append("cum_seq_q/cum_seq_k given: the varlen kernel takes [total, H, D] operands")
    if (a["max_q"], a["max_k"]) != (lq, lk):
        problems.append(f"max_q/max_k {(a['max_q'], a['max_k'])} != block lengths {(lq, lk)}")
    left, right = a.get("window_size_left"), a.get("window_size_right")
    if left is None and right is None:
        return problems
    if left is None or right is None or left < 0 or right < 0:
        problems.append(f"window ({left}, {right}): pass both sides, each >= 0 (flash reads -1 as seqlen_k)")
        return problems
    if a["is_causal"]:
        problems.append("is_causal with a window: mha_fwd sets window_size_right = 0")
    if right > lk and lq > lk + 1:
        problems.append(f"window right side {right} > seqlen_k {lk} with Lq {lq} > Lk + 1: flash cuts it to seqlen_k")
    return problems


def _rule_flash_attention_forward(a: dict, cap: Capability) -> list[str]:
    """attention.cu ``_flash_attention_forward`` -> flash_api.cpp ``mha_fwd``: ``[B, L, H, D]``
    operands, the rules of SDPA's flash op, and :func:`_flash_direct_problems`."""
    q, k, v = (_bhld(a[n]) for n in ("query", "key", "value"))
    problems = _rule_flash_forward(dict(a, query=q, key=k, value=v), cap)
    if a.get("return_debug_mask"):
        problems.append("return_debug_mask=True: a probability matrix per call")
    if any(a.get(n) is not None for n in ("seqused_k", "alibi_slopes", "block_table")):
        problems.append("seqused_k / alibi_slopes / block_table given: not the library's attention")
    if q.dim() == 4 and k.dim() == 4:
        problems += _flash_direct_problems(a, q.size(2), k.size(2))
    return problems


def _rule_flash_attention_backward(a: dict, cap: Capability) -> list[str]:
    """attention_backward.cu ``_flash_attention_backward`` -> flash_api.cpp ``mha_bwd``:
    ``[B, L, H, D]`` operands, the rules of SDPA's flash backward (the LSE a contiguous
    float32 ``[B, H, Lq]``), and :func:`_flash_direct_problems`."""
    names = ("grad_out", "query", "key", "value", "out")
    b = dict(a, **{n: _bhld(a[n]) for n in names})
    problems = _rule_flash_backward(b, cap)
    q, k = b["query"], b["key"]
    if q.dim() == 4 and k.dim() == 4:
        problems += [p for p in _flash_direct_problems(b, q.size(2), k.size(2)) if not p.startswith("max_q")]
    return problems


def _lse_problems(lse, shape, *, contiguous: bool) -> list[str]:
    problems = []
    if lse.dtype != torch.float32:
        problems.append(f"lse dtype {lse.dtype}, must be float32")
    if tuple(lse.shape) != tuple(shape):
        problems.append(f"lse shape {tuple(lse.shape)}, must be {tuple(shape)}")
    if lse.device.type != "cuda":
        problems.append(f"lse on {lse.device}, not CUDA")
    if contiguous and not lse.is_contiguous():
        problems.append(f"lse not contiguous (strides {lse.stride()}): the kernel reads it as [B, H, Lq]")
    return problems


def _efficient_head_dim(q) -> list[str]:
    # sdp_utils.cpp check_head_dim_size_mem_efficient with minimum_gemm_alignment: on sm80+
    # with tensor cores, 8 elements for fp16/bf16 and 4 for fp32, i.e. 16 bytes. The sm80
    # kernels are all "aligned" ones (kernels/cutlassF.h dispatch_cutlassF_*_sm80), whose
    # check_supported (kernel_forward.h) wants strideM/strideH % kAlignmentQ == 0.
    d = q.size(-1)
    if d * q.element_size() % VECTOR_BYTES:
        return [f"head dim {d} x {q.element_size()} bytes not a multiple of 16 (mem-efficient alignment)"]
    return []


def _rule_efficient_forward(a: dict, cap: Capability) -> list[str]:
    """attention.cu _efficient_attention_forward + kernel_forward.h check_supported.

    No maximum head dim (kernels up to kMaxK = 65536), no grouped-query heads
    (sdp_utils.cpp: check_batch_size_and_num_heads_dense<false>).
    """
    q, k, v, bias, causal = a["query"], a["key"], a["value"], a["attn_bias"], a["is_causal"]
    problems = (
        _io_problems({"q": q, "k": k, "v": v}, _EFFICIENT_DTYPES, "mem-efficient attention")
        + _efficient_hardware(q, cap)
        + _efficient_head_dim(q)
        + _shape_problems(q, k, v, causal, gqa=False)
        + _dropout_problems(a["dropout_p"])
        + _scale_problems(q, causal, a["scale"])
    )
    if not a["compute_log_sumexp"]:
        problems.append("compute_log_sumexp=False: the merge needs the LSE")
    if bias is not None:
        problems.append("attn_bias given: masks are the plan's business")
    return problems


def _rule_efficient_backward(a: dict, cap: Capability) -> list[str]:
    """attention_backward.cu _efficient_attention_backward + kernel_backward.h check_supported.

    The LSE must be the forward's own: float32 ``[B, H, ceil(Lq / 32) * 32]`` (padded,
    kAlignLSE = 32 in attention.cu), last dim unit stride, head and batch strides % 8 == 0
    ("LSE is not correctly aligned").
    """
    dout, q, k, v, out, lse = (a[n] for n in ("grad_out_", "query", "key", "value", "out", "logsumexp"))
    bias, causal = a["attn_bias"], a["is_causal"]
    problems = (
        _io_problems({"q": q, "k": k, "v": v, "out": out, "dout": dout}, _EFFICIENT_DTYPES, "mem-efficient attention")
        + _efficient_hardware(q, cap)
        + _efficient_head_dim(q)
        + _shape_problems(q, k, v, causal, gqa=False)
        + _dropout_problems(a["dropout_p"])
        + _scale_problems(q, causal, a["scale"])
    )
    b, h, lq, _ = q.shape
    padded = -(-lq // 32) * 32
    problems += _lse_problems(lse, (b, h, padded), contiguous=False)
    if lse.dim() == 3 and (lse.stride(-1) != 1 or lse.stride(0) % 8 or lse.stride(1) % 8):
        problems.append(f"lse strides {lse.stride()}: need unit last stride, head/batch strides % 8 == 0")
    if bias is not None:
        problems.append("attn_bias given: masks are the plan's business")
    problems += _efficient_out_problems(out)
    return problems


def _efficient_out_problems(out) -> list[str]:
    """kernel_backward.h ``Params::o_strideM()`` is ``head_dim_value * num_heads``: the
    kernel assumes out's row stride instead of reading it (attention_backward.cu reads only
    ``o_strideB`` and ``o_strideH``). In SDPA's ``[B, H, L, D]`` out must be a transposed
    ``[B, L, H, D]``-contiguous tensor, as the efficient forward returns it; any other view
    (a head slice, a padded head dim, a contiguous ``[B, H, L, D]`` copy) feeds the delta
    term wrong rows, or rows out of bounds."""
    if out.dim() != 4 or out.size(2) < 2:
        return []  # a single row is never advanced by the row stride
    b, h, _, d = out.shape
    if out.stride(2) != h * d:
        return [
            f"out row stride {out.stride(2)} != heads x head dim = {h * d} (strides {out.stride()}): "
            "the efficient backward assumes [B, L, H, D]-contiguous rows"
        ]
    return []


def _rule_cpu_op(a: dict, cap: Capability) -> list[str]:
    if any(isinstance(t, torch.Tensor) and t.device.type == "cuda" for t in a.values()):
        return ["the CPU fused op called on CUDA tensors (wrong device's kernel)"]
    return []


def _rule_unfused(a: dict, cap: Capability) -> list[str]:
    tensors = [t for t in a.values() if isinstance(t, torch.Tensor)]
    if any(t.device.type == "cuda" for t in tensors):
        shapes = " @ ".join(str(tuple(t.shape)) for t in tensors)
        return [f"batched matmul on CUDA {shapes}: an unfused attention path (L x L score block)"]
    return []


FUSED_RULES = {
    aten._scaled_dot_product_flash_attention.default: _rule_flash_forward,
    aten._scaled_dot_product_flash_attention_backward.default: _rule_flash_backward,
    aten._flash_attention_forward.default: _rule_flash_attention_forward,
    aten._flash_attention_backward.default: _rule_flash_attention_backward,
    aten._scaled_dot_product_efficient_attention.default: _rule_efficient_forward,
    aten._scaled_dot_product_efficient_attention_backward.default: _rule_efficient_backward,
    aten._scaled_dot_product_flash_attention_for_cpu.default: _rule_cpu_op,
    aten._scaled_dot_product_flash_attention_for_cpu_backward.default: _rule_cpu_op,
}

# The library has no batched matmul of its own outside a fused kernel: on CUDA one means a
# math fallback. (nn.Linear on 3-d input runs mm/addmm, not bmm.)
UNFUSED_RULES = {aten.bmm.default: _rule_unfused, aten.baddbmm.default: _rule_unfused}

# A device-to-host read of a tensor value stalls the host until the device catches up.
HOST_SYNC_OPS = {
    aten._local_scalar_dense.default: "host sync: .item() / int() / float() / bool() / .tolist() of a tensor",
    aten.nonzero.default: "host sync: nonzero (output shape depends on values)",
    aten.equal.default: "host sync: torch.equal returns a Python bool",
}


@dataclasses.dataclass(frozen=True)
class _OpInfo:
    name: str
    launches: bool
    rule: object
    host_sync: str | None
    fused: bool


def _bind(func, args, kwargs) -> dict:
    """The call's arguments by schema name, defaults filled in (dispatch drops defaulted ones)."""
    bound = {}
    for i, arg in enumerate(func._schema.arguments):
        if i < len(args) and not arg.kwarg_only:
            bound[arg.name] = args[i]
        elif arg.name in kwargs:
            bound[arg.name] = kwargs[arg.name]
        else:
            bound[arg.name] = arg.default_value if arg.has_default_value() else None
    return bound


_OP_INFO: dict = {}


def _op_info(func) -> _OpInfo:
    info = _OP_INFO.get(func)
    if info is None:
        name = str(func)
        rule = FUSED_RULES.get(func) or UNFUSED_RULES.get(func)
        info = _OpInfo(
            name=name,
            launches=launches_kernel(func),
            rule=rule,
            host_sync=HOST_SYNC_OPS.get(func),
            fused=func in FUSED_RULES,
        )
        _OP_INFO[func] = info
    return info


def _caller() -> str:
    """The innermost frame inside the ``ring_attention`` package (else the innermost test frame)."""
    frame, test_frame = sys._getframe(1), None
    while frame is not None:
        filename = frame.f_code.co_filename
        where = f"{os.path.basename(filename)}:{frame.f_lineno} {frame.f_code.co_name}"
        if _PACKAGE_DIR in filename:
            return where
        if test_frame is None and _TESTS_DIR in filename and not filename.endswith("fake_cuda.py"):
            test_frame = where
        frame = frame.f_back
    return test_frame or "?"


class KernelChecker(TorchDispatchMode):
    """Records every aten call; checks fused-kernel calls and flags host synchronization.

    Attributes:
        violations: list of :class:`Violation`, in call order.
        op_counts: ``Counter`` of aten op names.
        fused_calls: ``Counter`` of fused attention op names.
        launches: calls that would launch a kernel (not views, ``empty*``, ``detach``,
            metadata); fused calls included.
    """

    def __init__(self, capability: Capability = (8, 0)):
        super().__init__()
        self.capability = capability  # of the pretended GPU: rules differ per architecture
        self.violations: list[Violation] = []
        self.op_counts: Counter = Counter()
        self.fused_calls: Counter = Counter()
        self.launches = 0

    def flag(self, op: str, reason: str) -> None:
        self.violations.append(Violation(op, reason, _caller()))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        info = _op_info(func)
        self.op_counts[info.name] += 1
        if info.launches:
            self.launches += 1
        if info.fused:
            self.fused_calls[info.name] += 1
        if info.rule is not None:
            for reason in info.rule(_bind(func, args, kwargs), self.capability):
                self.flag(info.name, reason)
        if info.host_sync is not None:
            self.flag(info.name, info.host_sync)
        try:
            return func(*args, **kwargs)
        except (DataDependentOutputException, DynamicOutputShapeException) as e:
            if info.host_sync is None:
                self.flag(info.name, f"host sync: {type(e).__name__} (output depends on tensor values)")
            raise


# --- Python bindings that fail on fake CUDA tensors -----------------------------------


def _index_tensor(key, device) -> torch.Tensor:
    return key if isinstance(key, torch.Tensor) else torch.tensor(key, device=device)


def _basic_index(x: torch.Tensor, key):
    """Apply ``key``'s slices, ints, ``None`` and ``...`` as views, like torch's indexing does.

    Returns ``(view, indices)``: ``indices`` holds, per dimension of ``view``, the index
    tensor still to apply (``aten.index`` semantics), or ``None``. Ints become selects first,
    as in torch's own ``applySlicing``.
    """
    if not isinstance(key, tuple):
        key = (key,)
    if any(isinstance(k, bool) for k in key):
        raise NotImplementedError("Python bools as indices are not rerouted")
    key = tuple(_index_tensor(k, x.device) if isinstance(k, (list, tuple)) else k for k in key)

    def consumed(k) -> int:
        if k is None or k is Ellipsis:
            return 0
        if isinstance(k, torch.Tensor) and k.dtype in (torch.bool, torch.uint8):
            return k.dim()
        return 1

    n_used = sum(consumed(k) for k in key)
    view, dim, indices = x, 0, []
    for k in key:
        if k is None:
            view = aten.unsqueeze.default(view, dim)
            indices.append(None)
            dim += 1
        elif k is Ellipsis:
            rest = x.dim() - n_used
            indices += [None] * rest
            dim += rest
        elif isinstance(k, slice):
            step = 1 if k.step is None else k.step
            view = aten.slice.Tensor(view, dim, k.start, k.stop, step)
            indices.append(None)
            dim += 1
        elif isinstance(k, torch.Tensor) and k.dtype in (torch.bool, torch.uint8):
            # torch expands a mask into its nonzero coordinates (a host sync on CUDA)
            indices += list(aten.nonzero.default(k).unbind(1))
            dim += k.dim()
        elif isinstance(k, torch.Tensor):
            indices.append(k)
            dim += 1
        else:
            view = aten.select.int(view, dim, int(k))
    while indices and indices[-1] is None:
        indices.pop()
    return view, indices


def _getitem(x: torch.Tensor, key):
    view, indices = _basic_index(x, key)
    if indices:
        return aten.index.Tensor(view, indices)
    return aten.alias.default(view) if view is x else view


def _setitem(x: torch.Tensor, key, value) -> None:
    view, indices = _basic_index(x, key)
    if indices:
        if not isinstance(value, torch.Tensor):
            value = torch.full((), value, dtype=x.dtype, device=x.device)
        elif value.dtype != x.dtype:
            value = aten._to_copy.default(value, dtype=x.dtype)
        aten.index_put_.default(view, indices, value)
    elif isinstance(value, torch.Tensor):
        aten.copy_.default(view, value)
    else:
        aten.fill_.Scalar(view, value)


def _contiguous(x: torch.Tensor, memory_format=torch.contiguous_format):
    if x.is_contiguous(memory_format=memory_format):
        return x
    return aten.clone.default(x, memory_format=memory_format)


def _to(x: torch.Tensor, *args, **kwargs):
    device, dtype, non_blocking, _copy, memory_format = _parse_to(*args, **kwargs)
    device = x.device if device is None else torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
    dtype = x.dtype if dtype is None else dtype
    if device == x.device and dtype == x.dtype and not _copy:
        return x
    return aten._to_copy.default(
        x, dtype=dtype, device=device, non_blocking=non_blocking,
        memory_format=memory_format or torch.preserve_format,
    )


def _parse_to(*args, **kwargs):
    copy = kwargs.pop("copy", False)
    if args and isinstance(args[0], torch.Tensor):  # x.to(other)
        other = args[0]
        return other.device, other.dtype, kwargs.get("non_blocking", False), copy, None
    device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args, **kwargs)
    return device, dtype, non_blocking, copy, memory_format


def _new_tensor(x: torch.Tensor, data, *, dtype=None, device=None, requires_grad=False):
    return torch.tensor(data, dtype=dtype or x.dtype, device=device or x.device, requires_grad=requires_grad)


def _nonzero(x: torch.Tensor, *, as_tuple=False):
    nz = aten.nonzero.default(x)
    return tuple(nz.unbind(1)) if as_tuple else nz


def _cuda(x: torch.Tensor, device=None, non_blocking=False, memory_format=torch.preserve_format):
    return _to(x, torch.device("cuda", 0) if device is None else device, non_blocking=non_blocking)


# Bindings that fail on a fake CUDA ``self``, and the aten-level equivalent of each.
_CUDA_SELF_REROUTES = {
    torch.Tensor.__getitem__: _getitem,
    torch.Tensor.__setitem__: _setitem,
    torch.Tensor.copy_: aten.copy_.default,
    torch.Tensor.contiguous: _contiguous,
    torch.Tensor.__invert__: aten.bitwise_not.default,
    torch.Tensor.new_tensor: _new_tensor,
    torch.Tensor.cuda: _cuda,
    torch.Tensor.nonzero: _nonzero,
    torch.nonzero: _nonzero,
}


class _RerouteBindings(TorchFunctionMode):
    """Reroute the Python bindings that take a CUDA device guard (fail on a CPU-only build)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if args and isinstance(args[0], torch.Tensor):
            reroute = _CUDA_SELF_REROUTES.get(func)
            if reroute is not None and args[0].device.type == "cuda":
                return reroute(*args, **kwargs)
            if func is torch.Tensor.to:
                try:
                    return func(*args, **kwargs)
                except RuntimeError as e:  # a CPU tensor moving onto CUDA takes the device guard
                    if "not linked with support for cuda" not in str(e):
                        raise
                    return _to(*args, **kwargs)
        return func(*args, **kwargs)


# --- backward driver --------------------------------------------------------------------


class _Ctx:
    """Stands in for an autograd Function's ctx: saved tensors and free attributes."""

    def save_for_backward(self, *tensors):
        self._saved = tensors

    @property
    def saved_tensors(self):
        return self._saved

    def mark_non_differentiable(self, *tensors):
        pass


def _same_meta(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device


# --- the harness --------------------------------------------------------------------------


class FakeCuda:
    """What :func:`fake_cuda` yields: the checker, the backward driver's record, helpers."""

    def __init__(self, checker: KernelChecker, backward: bool = True):
        self.checker = checker
        self.backward = backward  # drive() runs the backward too
        self.backward_calls = 0  # Function backwards driven
        self.grad_problems: list[str] = []

    @property
    def violations(self) -> list[Violation]:
        return self.checker.violations

    def empty(self, *shape, dtype) -> torch.Tensor:
        return torch.empty(*shape, dtype=dtype, device="cuda")

    def qkv(self, *, batch, seq_len, heads, kv_heads, head_dim, dtype, layout="plain"):
        """Fake CUDA ``q [B, N, H, D]``, ``k, v [B, N, Hkv, D]``.

        ``layout``:
            ``"plain"``: three contiguous tensors.
            ``"offset"``: views ``big[..., 1:]`` of a ``[B, N, H, D + 1]`` tensor: unit last
                stride, storage offset 1 element, every other stride not 16-byte aligned.
            ``"fused"``: views of one packed projection output: ``unbind`` of
                ``[B, N, 3, H, D]`` with equal heads (non-last strides ``3 H D``), else
                ``narrow`` of ``[B, N, H + 2 Hkv, D]``.
        """
        b, n, h, hkv, d = batch, seq_len, heads, kv_heads, head_dim
        if layout == "plain":
            return self.empty(b, n, h, d, dtype=dtype), self.empty(b, n, hkv, d, dtype=dtype), self.empty(
                b, n, hkv, d, dtype=dtype
            )
        if layout == "offset":
            return tuple(self.empty(b, n, heads_, d + 1, dtype=dtype)[..., 1:] for heads_ in (h, hkv, hkv))
        if layout == "fused":
            if h == hkv:
                return self.empty(b, n, 3, h, d, dtype=dtype).unbind(2)
            packed = self.empty(b, n, h + 2 * hkv, d, dtype=dtype)
            return packed.narrow(2, 0, h), packed.narrow(2, h, hkv), packed.narrow(2, h + hkv, hkv)
        raise ValueError(f"unknown layout {layout!r}")

    def module(self, cls, *args, dtype, **kwargs) -> torch.nn.Module:
        """``cls(*args, **kwargs)`` with uninitialized fake CUDA parameters that need no grad.

        Built on the meta device (parameter init runs Python bindings that fail on fake
        CUDA), then every parameter is replaced by an empty CUDA one.
        """
        m = cls(*args, device="meta", dtype=dtype, **kwargs)
        for sub in m.modules():
            for name, p in list(sub._parameters.items()):
                if p is not None:
                    fresh = torch.empty(p.shape, dtype=p.dtype, device="cuda")
                    sub._parameters[name] = torch.nn.Parameter(fresh, requires_grad=False)
        return m

    def drive(self, fn_cls, *args):
        """Run ``fn_cls.forward`` then (if ``backward``) ``fn_cls.backward`` with ones; return the outputs."""
        ctx = _Ctx()
        from ring_attention.autograd import PackedAttention

        if self.backward and fn_cls is PackedAttention:  # (plans, ring, scale, need_lse, ...): a backward follows
            args = (*args[:3], True, *args[4:])
        outs = fn_cls.forward(ctx, *args)
        if not self.backward:
            return outs
        outs_t = (outs,) if isinstance(outs, torch.Tensor) else tuple(outs)
        douts = tuple(torch.ones_like(o) for o in outs_t)
        with torch.no_grad():  # as autograd runs a backward without create_graph
            grads = fn_cls.backward(ctx, *douts)
        grads = (grads,) if isinstance(grads, torch.Tensor) or grads is None else tuple(grads)
        self.backward_calls += 1
        if len(grads) != len(args):
            self.grad_problems.append(f"{fn_cls.__name__}.backward returned {len(grads)} grads for {len(args)} inputs")
        for i, (a, g) in enumerate(zip(args, grads)):
            if isinstance(a, torch.Tensor):
                if not isinstance(g, torch.Tensor) or not _same_meta(a, g):
                    got = (tuple(g.shape), g.dtype, g.device) if isinstance(g, torch.Tensor) else g
                    self.grad_problems.append(
                        f"{fn_cls.__name__} grad {i}: got {got}, input is {(tuple(a.shape), a.dtype, a.device)}"
                    )
            elif g is not None:
                self.grad_problems.append(f"{fn_cls.__name__} grad {i} for a non-tensor input is not None")
        return outs

    def report(self) -> str:
        lines = [str(v) for v in self.violations] + self.grad_problems
        counts = Counter(f"{v.op}: {v.reason}" for v in self.violations)
        head = f"{len(self.violations)} violation(s), {len(self.grad_problems)} gradient problem(s)"
        if len(lines) > 12:  # long lists repeat one cause: show distinct reasons with counts
            lines = [f"{c} x {r}" for r, c in counts.most_common()] + self.grad_problems[:5]
        return "\n".join([head, *lines])

    def assert_clean(self) -> None:
        assert not self.violations and not self.grad_problems, self.report()


@contextlib.contextmanager
def fake_cuda(*, backward: bool = True, capability: Capability = (8, 0)) -> Iterator[FakeCuda]:
    """Fake CUDA tensors, rerouted bindings, the kernel checker and the backward driver.

    ``PackedAttention.apply`` is always replaced (autograd must never see fake CUDA
    tensors); with ``backward=False`` it runs the forward only.

    ``capability``: the compute capability the library sees (``fused_cuda.capability``)
    and the rules check against, e.g. ``(8, 6)`` for an RTX 3090 (see :data:`CAPABILITIES`).

    A ``DataDependentOutputException``/``DynamicOutputShapeException`` raised by the body
    (a host sync the fake tensors cannot answer) is already a recorded violation: it is
    swallowed here so the test fails on :meth:`FakeCuda.assert_clean` with the full list.
    """
    from ring_attention import fused_cuda
    from ring_attention.autograd import PackedAttention

    checker = KernelChecker(capability)
    fc = FakeCuda(checker, backward)
    patch = mock.patch.object(PackedAttention, "apply", lambda *args: fc.drive(PackedAttention, *args))
    pretend = mock.patch.object(fused_cuda, "capability", lambda device: capability)
    with FakeTensorMode(), _RerouteBindings(), checker, patch, pretend:
        try:
            yield fc
        except (DataDependentOutputException, DynamicOutputShapeException):
            pass
