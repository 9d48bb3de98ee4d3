"""Non-finite inputs: a NaN or inf shows where the reference says, never hidden as 0.

The fused kernels and the reference disagree on non-finite inputs in two ways, and every
kernel call here corrects both:

- **Values.** A kernel multiplies a masked key's value by a zero probability, and ``0 * NaN``
  would spread a NaN (or inf) in value ``v[j, d]`` to rows that do not attend key ``j``. In a
  causal block or a band's block the non-finite values are zeroed before the kernel and added
  back to exactly the rows that attend them (a causal block's as their sum, a band's as NaN:
  :func:`zeroed` then :func:`causal_poison` or :func:`band_hits`; or split once per source, :func:`split_values`, :func:`value_poison`,
  where several causal calls read much of it: ``schedule.splits_values``).
- **Query rows.** The reference gives NaN for a query row holding NaN or inf; a kernel can
  return such a row as a finite 0 (a row without keys). Rows are marked NaN after their
  blocks merge (:func:`marks_query_rows`, :func:`mark_query_rows_`).

Both are skipped where an input is seen to be finite (:func:`known_finite`: eager CPU only,
where reading a value back is free).
"""

from __future__ import annotations

import math

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.fx.experimental.proxy_tensor import get_proxy_mode


def marks_query_rows(q: torch.Tensor) -> bool:
    """Whether blocks of ``q`` need :func:`mark_query_rows_` to show a non-finite query as NaN.

    The reference gives NaN for a query row holding NaN or inf (its scores are NaN, or
    ``+-inf``, whose softmax is NaN). Every backend can return such a row as a finite 0
    instead: a row holding inf can score ``-inf`` against every key, which the CUDA
    kernels' online softmax takes for a row without keys (flash: row sum 0 gives out 0
    and lse inf; the math backend's finite shift gives 0 too), and the CPU op returns 0 or
    inf for NaN rows as well. So every backend marks, unless ``q`` is seen to be finite
    (:func:`known_finite`, eager CPU only): on CUDA that is one reduction per shard and
    weight-0 adds folded into copies that run anyway, with no host synchronisation.
    """
    return not known_finite(q)


def query_row_poison(q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``q [..., D]`` summed over D in ``dtype`` (float32 or wider): non-finite exactly in
    the rows that hold NaN or inf, finite elsewhere. Added with ``alpha=0`` (0 * inf is
    NaN), it makes those rows NaN and leaves the others as they are."""
    return q.sum(-1, dtype=dtype)


def mark_query_rows_(
    q: torch.Tensor, out: torch.Tensor, lse: torch.Tensor | None, without_keys: torch.Tensor | None = None
) -> None:
    """Make ``out [..., D]`` and ``lse [...]`` (or ``None``) NaN where ``q [..., D]`` holds NaN
    or inf: one kernel per tensor (:func:`query_row_poison`). ``without_keys``: a bool mask,
    broadcast to ``lse``'s shape, of cells left as they are (rows without keys stay 0)."""
    poison = query_row_poison(q, torch.promote_types(q.dtype, torch.float32))
    if without_keys is not None:
        poison.masked_fill_(without_keys, 0.0)
    out.add_(poison.unsqueeze(-1), alpha=0)
    if lse is not None:
        lse.add_(poison, alpha=0)


def quarantine_values(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(v with its non-finite entries zeroed, poison)`` for a causal block ``v [..., L, D]``.

    Fused kernels multiply a masked key's value by a zero probability, and 0 * NaN would
    spread a NaN (or inf) in value ``v[j, d]`` to the rows before ``j``, which do not attend
    it. ``poison [..., L, D]`` (:func:`causal_poison`) is the sum of the non-finite ``v[j, d]``,
    ``j <= i``, and 0 elsewhere: added to the output, it gives what the math does.

    ``(v, None)`` where ``v`` is seen to be finite (:func:`known_finite`): then there is
    nothing to quarantine, and the scan along L, the costliest of the four kernels, is saved.
    """
    clean = zeroed(v)
    return clean, None if clean is v else causal_poison(v)


def zeroed(v: torch.Tensor) -> torch.Tensor:
    """``v`` with its non-finite entries zeroed: ``v`` itself where it is seen to be finite
    (:func:`known_finite`), else a copy."""
    return v if known_finite(v) else v.nan_to_num(0.0, 0.0, 0.0)


def causal_poison(v: torch.Tensor, q_len: int | None = None, clean: torch.Tensor | None = None) -> torch.Tensor:
    """The poison of a causal block from its values ``v [..., Lk, D]``: at ``[i, d]`` the sum of
    the non-finite ``v[j, d]`` its row attends (0 where there are none; an infinity where all
    are that infinity, as the reference's sum of ``p * v`` gives; else NaN). ``q_len`` rows
    (``Lk`` if ``None``), the mask aligned bottom-right: row ``i`` attends ``j <= i + Lk - q_len``.
    One copy, scanned in place: ``clean``, the :func:`zeroed` copy of ``v`` the caller's kernel
    has read (then overwritten), else a new one. A caller that runs the kernel first and
    computes this after holds one copy of the values at a time, not two."""
    bad = v.nan_to_num(0.0, 0.0, 0.0) if clean is None else clean
    poison = torch.sub(v, bad, out=bad).cumsum_(-2)  # v minus its finite part: the non-finite values, else 0
    return poison if q_len is None else poison[..., v.shape[-2] - q_len :, :]


def add_chunk_poison_(
    out: torch.Tensor, v: torch.Tensor, clean: torch.Tensor, carry: torch.Tensor | None, restore: bool
) -> torch.Tensor:
    """Add to ``out [..., L, D]`` the poison of a chunk of a causal call's rows (the forward's
    row chunks, ``schedule.causal_chunks``) and return the carry the next chunk takes.

    ``v`` and ``clean`` are the chunk's own rows of the call's values and of their
    :func:`zeroed` copy, which its kernel has read: the poison is scanned in ``clean`` (no
    other copy), ``carry`` (the sum of every row before, ``None`` for the first chunk) added,
    and ``clean`` zeroed again where later chunks read it (``restore``). The call's work stays
    O(L), not O(L) per chunk. The terms are 0, infinities and NaN, whose sums are exact in any
    grouping: chunk by chunk this is :func:`causal_poison` of the whole call."""
    poison = causal_poison(v, clean=clean)
    if carry is not None:
        poison.add_(carry)
    out.add_(poison)
    carry = poison[..., -1:, :].clone()
    if restore:
        torch.nan_to_num(v, 0.0, 0.0, 0.0, out=clean)
    return carry


def band_hits(q_len: int, v: torch.Tensor, band: tuple[int, int]) -> torch.Tensor | None:
    """Where a block with a band must show NaN: a bool ``[..., Lq, D]``, true at ``[i, d]``
    where a key ``j`` in row ``i``'s band holds a non-finite ``v[j, d]``; ``None`` where ``v``
    is seen to be finite (:func:`known_finite`). The block runs on :func:`zeroed` values (a
    kernel multiplies a masked value by a zero probability, and 0 * NaN would reach rows
    whose band does not hold the key); its output is then NaN exactly here.

    From a running count of bad values along the keys: O(L D), no matmul (on CUDA an
    unfused path), and one float32 ``[Lq, D]`` beside the count, the row ranges written
    piece by piece from views of the count (its clamp at the block's ends is constant or
    the identity within each piece)."""
    if known_finite(v):
        return None
    k_len, d, (lo, hi) = v.shape[-2], v.shape[-1], band
    lead = v.shape[:-2]
    counts = torch.zeros(*lead, k_len + 1, d, dtype=torch.float32, device=v.device)  # bad keys before row j
    counts[..., 1:, :] = (v - v).isnan()
    counts.cumsum_(-2)
    hits = torch.empty(*lead, q_len, d, dtype=torch.float32, device=v.device)
    cuts = sorted({0, q_len, *(min(max(c, 0), q_len) for c in (-lo, k_len - lo, -hi - 1, k_len - hi - 1))})

    def at(start: int, length: int) -> torch.Tensor:  # counts[clamp(start + t, 0, k_len)], t < length
        if start >= k_len or start + length <= 0:  # every index past the end, or before 0
            row = k_len if start >= k_len else 0
            return counts[..., row : row + 1, :].expand(*lead, length, d)
        return counts[..., start : start + length, :]

    for s, e in zip(cuts, cuts[1:]):
        torch.sub(at(s + hi + 1, e - s), at(s + lo, e - s), out=hits[..., s:e, :])
    return hits > 0


def split_values(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(v with its non-finite entries zeroed, bad)``, ``bad`` those entries themselves and 0
    elsewhere (``v`` minus its finite part); ``(v, None)`` where ``v`` is seen to be finite
    (:func:`known_finite`). Split once, a source serves every causal block that reads it:
    each block's poison is then one scan of its rows of ``bad`` (:func:`value_poison`)."""
    if known_finite(v):
        return v, None
    clean = v.nan_to_num(0.0, 0.0, 0.0)
    return clean, v - clean


def value_poison(bad: torch.Tensor) -> torch.Tensor:
    """The poison of a causal block's rows from its keys' ``bad [..., L, D]``
    (:func:`split_values`): as :func:`causal_poison`, from one split of the source."""
    return bad.cumsum(-2)


def known_finite(x: torch.Tensor) -> bool:
    """Whether ``x`` is a real CPU tensor whose entries are all finite.

    Only where reading a value back is free: a CPU tensor in eager mode (one reduction,
    no device to synchronize with). A CUDA tensor would stall the host on every block,
    and a traced or transformed one (``torch.compile``, ``make_fx``, ``torch.func``, fake
    or meta tensors) has no value to read: ``False`` sends them down the path that is
    right whatever ``x`` holds. So does a sum that overflows to inf: needless, not wrong.
    """
    if not _readable(x):
        return False
    return math.isfinite(x.sum(dtype=torch.promote_types(x.dtype, torch.float32)).item())


def scores_bounded(q: torch.Tensor, k: torch.Tensor, scale: float) -> bool:
    """Whether every score ``scale * q_i . k_j`` of a block is seen to be finite in float32:
    ``max|q| * max|k| * D * |scale|`` below float32's largest value, read only where
    :func:`known_finite` reads (eager CPU). Finite inputs can still overflow to ``inf - inf``."""
    if not (_readable(q) and _readable(k)):
        return False
    if q.numel() == 0 or k.numel() == 0:
        return True
    inf = float("inf")
    bound = float(torch.linalg.vector_norm(q, inf) * torch.linalg.vector_norm(k, inf)) * q.shape[-1] * abs(scale)
    return math.isfinite(bound) and bound < torch.finfo(torch.float32).max


def _readable(x: torch.Tensor) -> bool:
    """Whether reading ``x``'s values is free and meaningful: a real CPU tensor, eagerly."""
    traced = torch.compiler.is_compiling() or get_proxy_mode() is not None  # torch.compile, make_fx
    # (a functorch wrapper: vmap's batched tensors have no one value to read)
    return not (x.device.type != "cpu" or traced or is_fake(x) or torch._C._functorch.is_functorch_wrapped_tensor(x))
