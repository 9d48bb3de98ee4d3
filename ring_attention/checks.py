"""Input validation shared by every public function: clear errors before any kernel runs."""

from __future__ import annotations

import enum
import math
import numbers
from typing import NamedTuple, TypeVar

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_Named = TypeVar("_Named", bound="NamedEnum")


class NamedEnum(str, enum.Enum):
    """An enum used inside whose members the public functions also take by name.

    A ``str`` subclass that hashes, compares, formats and reprs as its value: a cache keyed
    by the name and one keyed by the member are one cache, and messages read as before.
    """

    _value_: str
    __hash__ = str.__hash__

    def __str__(self) -> str:
        return self.value

    def __repr__(self) -> str:
        return repr(self.value)

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def named(cls: type[_Named], value: object, what: str) -> _Named:
        """``value`` (a member or its name) as a member; ``ValueError`` naming ``what`` and
        listing the names for anything else."""
        try:
            return cls(value)
        except (ValueError, TypeError):
            names = tuple(member.value for member in cls)
            raise ValueError(f"unknown {what} {value!r}: expected one of {names}") from None


class Shapes(NamedTuple):
    batch: int
    seq_len: int
    heads: int
    kv_heads: int
    head_dim: int


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Shapes:
    """Check ``q [B, N, H, D]``, ``k, v [B, N, Hkv, D]`` and return their sizes."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dimensions [B, N, H, D], got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32, float64")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    b, n, h, d = q.shape
    if k.shape[0] != b or k.shape[1] != n or k.shape[3] != d:
        raise ValueError(
            f"k/v shape {tuple(k.shape)} does not match q shape {tuple(q.shape)} in batch, "
            "sequence length or head dim"
        )
    hkv = k.shape[2]
    if min(b, n, h, d, hkv) == 0:
        raise ValueError(f"empty input: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if h % hkv:
        raise ValueError(f"query heads H={h} must be a multiple of key/value heads Hkv={hkv}")
    if q.dtype == torch.float64 and q.device.type != "cpu":
        raise TypeError("float64 is supported on the CPU only")
    return Shapes(b, n, h, hkv, d)


def check_optional_scale(scale: object) -> float | None:
    """``scale`` as a float, or ``None``; what can be checked before the head dim is known."""
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite real number or None, got {scale!r}")
    return float(scale)


def check_scale(scale: object, head_dim: int) -> float:
    """``scale``, or the default ``1 / sqrt(head_dim)`` when it is ``None``."""
    checked = check_optional_scale(scale)
    return 1.0 / math.sqrt(head_dim) if checked is None else checked


def check_flag(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def check_int(value: object, name: str) -> int:
    """An integer as users pass one: a Python int, a numpy integer or a 0-d integer tensor.

    Bools are refused although Python counts them as ints (``True`` is never meant as 1
    here), and so are floats, even integral ones, and tensors with more than one element.

    Raises:
        TypeError naming ``name``.
    """
    if isinstance(value, torch.Tensor):
        dtype = value.dtype
        if value.dim() == 0 and not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool):
            return int(value)
    elif isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)  # int, and numpy integers (numpy registers them as Integral)
    raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")


def check_positive_int(value: object, name: str) -> int:
    """:func:`check_int`, then ``ValueError`` naming ``name`` unless the value is at least 1."""
    number = check_int(value, name)
    if number < 1:
        raise ValueError(f"{name} must be a positive integer, got {number}")
    return number


def check_window(window: object) -> tuple[int, int] | None:
    """``window=(left, right)`` in flash-attn's convention: each ``-1`` (unbounded) or ``>= 0``.

    Returns ``None`` for no window (``None`` or ``(-1, -1)``), else the pair as ints.

    Raises:
        TypeError or ValueError naming ``window`` for anything else.
    """
    if window is None:
        return None
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise TypeError(f"window must be None or a pair (left, right), got {window!r}")
    left, right = (check_int(w, "window") for w in window)
    if left < -1 or right < -1:
        raise ValueError(f"window sides must be -1 (unbounded) or >= 0, got window=({left}, {right})")
    return None if (left, right) == (-1, -1) else (left, right)


def check_documents(cu_seqlens: object, seq_len: int) -> tuple[int, ...] | None:
    """``cu_seqlens``, the cumulative document starts ``0 = c_0 < c_1 < ... < c_D = N``
    (flash-attn's varlen convention; global positions), as a tuple of ints.

    Takes a 1-d integer tensor (int32 as flash-attn passes it, or int64; on any device: it
    is read once on the host) or a sequence of integers. Returns ``None`` for no documents
    (``None``, or one document ``(0, N)``: the same call).

    Raises:
        TypeError or ValueError naming ``cu_seqlens`` for anything else.
    """
    if cu_seqlens is None:
        return None
    if isinstance(cu_seqlens, torch.Tensor):
        bounds = tuple(int(c) for c in check_documents_tensor(cu_seqlens).tolist())
    elif isinstance(cu_seqlens, (tuple, list, range)):
        bounds = tuple(check_int(c, "cu_seqlens") for c in cu_seqlens)
    else:
        raise TypeError(f"cu_seqlens must be a 1-d integer tensor or a sequence of ints, got {type(cu_seqlens).__name__}")
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != seq_len:
        raise ValueError(
            f"cu_seqlens must run from 0 to the sequence length N={seq_len} (at least two entries), "
            f"got {_short(bounds)}"
        )
    for d, (a, b) in enumerate(zip(bounds, bounds[1:])):
        if b <= a:
            raise ValueError(
                f"cu_seqlens must be strictly increasing (every document non-empty): "
                f"cu_seqlens[{d}]={a}, cu_seqlens[{d + 1}]={b}"
            )
    return None if len(bounds) == 2 else bounds


def check_documents_tensor(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """What can be checked of a ``cu_seqlens`` tensor without reading it: a 1-d integer
    tensor (under tracing its values are data, checked by :func:`check_documents` where the
    op runs)."""
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype.is_complex \
            or cu_seqlens.dtype == torch.bool:
        raise TypeError(
            f"cu_seqlens must be a 1-d integer tensor (int32) or a sequence of ints, got a "
            f"{cu_seqlens.dim()}-d {cu_seqlens.dtype} tensor"
        )
    return cu_seqlens


def _short(values: tuple[int, ...]) -> str:
    return repr(values) if len(values) <= 8 else f"({', '.join(map(str, values[:4]))}, ..., {values[-1]})"
