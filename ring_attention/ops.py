"""The attention of one process as ``torch.library`` custom ops: what ``torch.compile`` sees.

Under ``torch.compile`` the public functions (one device, or a ring simulated in this
process) call :func:`attention`, which runs two opaque ops, ``ring_attention::forward``
and ``ring_attention::backward``. Dynamo records each as one node and never traces the
plan builder or the executor, so a compiled model has no graph break and no guard on a
plan; the fake (meta) implementations give the ops' output shapes without running them.
Inside, the ops run exactly the eager code (:func:`~ring_attention.forward.run_forward`
and :func:`~ring_attention.backward.run_backward`), so compiled results equal eager ones.

The ops take only what fixes the plan (pattern as two integer lists and a mode, causal,
ring size, layout, the executor's options as integers, a window as ``[left, right]`` or
``[]``) and the scale, and the packed documents' ``cu_seqlens`` as a tensor: a new packing
is new data for the compiled graph, not a recompile. The op reads and checks the
boundaries where it runs (a ``ValueError`` naming ``cu_seqlens``), and looks up their plan
as eager calls do. Outputs are
contiguous, as the fake implementations promise: inductor checks an opaque op's output
strides against them.

Outside ``torch.compile`` the public functions keep the autograd function of
:mod:`~ring_attention.autograd`: its ops are what the fake-CUDA checks and the cost
counters see, which a custom op would hide.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, cast

import torch

from . import layout as _layout
from .backward import run_backward
from .checks import check_documents
from .comm import SimulatedRing
from .executable import ExecutablePlan, PlanKey, executable_plan, resolved
from .forward import run_forward
from .masks import SequenceMask
from .merge import accumulation_dtype
from .options import DEFAULT, Options
from .pattern import DilatedPattern, Mode


def _plan(q: torch.Tensor, k: torch.Tensor, segment_lengths: Sequence[int], dilation_rates: Sequence[int], mode: str,
          causal: bool, ring_size: int, layout: str, options: Sequence[int], window: Sequence[int],
          cu_seqlens: torch.Tensor | None) -> ExecutablePlan:
    pattern = DilatedPattern(tuple(segment_lengths), tuple(dilation_rates), mode) if segment_lengths else None
    b, n, h, d = q.shape
    documents = check_documents(cu_seqlens, n)
    if pattern is not None and documents is not None:
        pattern.check(n, h, documents)  # the per-document rule, on values only known here
    band = (window[0], window[1]) if window else None
    key = PlanKey(pattern, n, h, k.shape[2], SequenceMask(causal, band, documents), ring_size, _layout.Layout(layout),
                  tuple(range(ring_size)), b, d, q.dtype, resolved(Options(*options), q))
    return executable_plan(key)


def _shards(x: torch.Tensor, plan: ExecutablePlan) -> dict[int, torch.Tensor]:
    return dict(enumerate(plan.shard(x)))


def _joined(shards: list[torch.Tensor], plan: ExecutablePlan, dtype: torch.dtype) -> torch.Tensor:
    """The ranks' shards in natural order: a new contiguous tensor in ``dtype``."""
    shards = [s.to(dtype) for s in shards]
    x = shards[0] if len(shards) == 1 else plan.unshard(shards)
    return x.contiguous()


@torch.library.custom_op("ring_attention::forward", mutates_args=())
def _forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_lengths: list[int],
    dilation_rates: list[int], mode: str, causal: bool, ring_size: int, layout: str, scale: float,
    options: list[int], window: list[int], cu_seqlens: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, N, H, D] in q's dtype, lse [R, B, H, N/R])``: every rank's LSE, stacked."""
    plan = _plan(q, k, segment_lengths, dilation_rates, mode, causal, ring_size, layout, options, window, cu_seqlens)
    qs, ks, vs = (_shards(t, plan) for t in (q, k, v))
    state = run_forward(plan, SimulatedRing(ring_size), qs, ks, vs, scale)
    # run_forward returns every rank's out, and its LSE (need_lse by default)
    out = _joined([cast(torch.Tensor, state[r][0]) for r in plan.ranks], plan, q.dtype)
    return out, torch.stack([cast(torch.Tensor, state[r][1]) for r in plan.ranks])


@_forward.register_fake
def _(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_lengths: list[int], dilation_rates: list[int],
    mode: str, causal: bool, ring_size: int, layout: str, scale: float, options: list[int], window: list[int],
    cu_seqlens: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    b, n, h, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((ring_size, b, h, n // ring_size), dtype=accumulation_dtype(q.dtype))


@torch.library.custom_op("ring_attention::backward", mutates_args=())
def _backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, segment_lengths: list[int], dilation_rates: list[int], mode: str, causal: bool,
    ring_size: int, layout: str, scale: float, options: list[int], window: list[int], cu_seqlens: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)``, contiguous, in the inputs' dtype."""
    plan = _plan(q, k, segment_lengths, dilation_rates, mode, causal, ring_size, layout, options, window, cu_seqlens)
    qs, ks, vs, outs, douts = (_shards(t, plan) for t in (q, k, v, out, dout))
    lses = dict(enumerate(lse.unbind(0)))
    grads = run_backward(plan, SimulatedRing(ring_size), qs, ks, vs, outs, lses, douts, scale)
    dq, dk, dv = (
        _joined([cast(torch.Tensor, grads[r][i]) for r in plan.ranks], plan, t.dtype) for i, t in enumerate((q, k, v))
    )
    return dq, dk, dv


@_backward.register_fake
def _(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    segment_lengths: list[int], dilation_rates: list[int], mode: str, causal: bool, ring_size: int, layout: str,
    scale: float, options: list[int], window: list[int], cu_seqlens: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx: Any, inputs: tuple[object, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
    ctx.plan_args = inputs[3:-1]  # the last, cu_seqlens, is a tensor: saved with the others
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(*inputs[:3], *output, inputs[-1])


def _backward_fn(
    ctx: Any, dout: torch.Tensor | None, _dlse: torch.Tensor | None
) -> tuple[torch.Tensor | None, ...]:
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = _backward(dout, q, k, v, out, lse, *ctx.plan_args, cu_seqlens)
    return (dq, dk, dv) + (None,) * (len(ctx.plan_args) + 1)


torch.library.register_autograd("ring_attention::forward", _backward_fn, setup_context=_setup_context)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: DilatedPattern | None, *, causal: bool, ring_size: int,
              layout: _layout.Layout | str, scale: float, options: Options = DEFAULT,
              window: tuple[int, int] | None = None, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """The whole sequence's output through the custom ops (inputs already validated, but for
    the values of ``cu_seqlens``, which the ops check where they run).

    ``pattern=None`` is full attention; ``ring_size`` ranks are simulated in this process.
    """
    ws, rs, mode = ([], [], "mixture") if pattern is None else (
        list(pattern.segment_lengths), list(pattern.dilation_rates), cast(Mode, pattern.mode).value)  # a Mode once built
    layout = _layout.check_layout(layout).value  # the op's schema takes a plain string
    limits = list(dataclasses.astuple(options))  # and the options as integers
    band = [] if window is None else list(window)
    out: torch.Tensor = _forward(q, k, v, ws, rs, mode, causal, ring_size, layout, scale, limits, band, cu_seqlens)[0]
    return out
