"""Hypothesis strategies for attention cases: shapes, sequence length, dilated patterns."""

from __future__ import annotations

import dataclasses

import torch
from hypothesis import strategies as st

import ring_attention as ra
from tests.inputs import qkv

HEADS = (1, 2, 4, 6, 8)
HEAD_DIMS = (4, 8, 16)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclasses.dataclass(frozen=True)
class Case:
    batch: int
    seq_len: int
    heads: int
    kv_heads: int
    head_dim: int
    pattern: ra.DilatedPattern
    causal: bool
    dtype: torch.dtype
    seed: int

    def qkv(self, dtype=None, requires_grad=False, magnitude=1.0):
        """Random ``q, k, v`` of this case's shapes, from its ``seed`` (tests/inputs.py)."""
        return qkv(
            self.batch, self.seq_len, self.heads, self.kv_heads, self.head_dim, seed=self.seed,
            dtype=dtype or self.dtype, requires_grad=requires_grad, magnitude=magnitude,
        )


@st.composite
def segment_and_rate(draw, seq_len: int, max_rate: int = 12):
    """A pair ``(w, r)`` valid for ``seq_len``: ``w`` divides ``N`` or exceeds it, ``r <= w``.

    Rates need not divide the segment, and when ``w > N`` they may exceed ``min(w, N)``.
    """
    w = draw(
        st.one_of(
            st.sampled_from(divisors(seq_len)),
            st.integers(seq_len + 1, 2 * seq_len + 8),
        )
    )
    r = draw(st.integers(1, min(w, max_rate)))
    return w, r


@st.composite
def patterns(draw, seq_len: int, heads: int, modes=("mixture", "head_groups"), max_pairs: int = 4):
    mode = draw(st.sampled_from(modes))
    hi = max_pairs if mode == "mixture" else min(max_pairs, heads)
    k = draw(st.integers(1, hi))
    pairs = [draw(segment_and_rate(seq_len)) for _ in range(k)]
    return ra.DilatedPattern(tuple(w for w, _ in pairs), tuple(r for _, r in pairs), mode=mode)


@st.composite
def cases(
    draw,
    *,
    dtypes=(torch.float32, torch.float64),
    max_seq_len: int = 64,
    modes=("mixture", "head_groups"),
    max_batch: int = 2,
    heads=HEADS,
    head_dims=HEAD_DIMS,
):
    """A full attention case: shapes, a valid dilated pattern, causal flag, dtype and seed."""
    b = draw(st.integers(1, max_batch))
    h = draw(st.sampled_from(heads))
    hkv = draw(st.sampled_from(divisors(h)))
    d = draw(st.sampled_from(head_dims))
    n = draw(
        st.one_of(
            st.sampled_from([m for m in (8, 12, 16, 24, 32, 48, 64) if m <= max_seq_len]),
            st.integers(1, max_seq_len),
        )
    )
    pattern = draw(patterns(n, h, modes=modes))
    causal = draw(st.booleans())
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**31 - 1))
    return Case(b, n, h, hkv, d, pattern, causal, dtype, seed)


# --- independent naive implementations (test oracles, not library code) ----------------


def naive_weights(pattern, n: int, h: int, causal: bool) -> torch.Tensor:
    """``W[h, i, j]`` of SEMANTICS.md by a literal loop over pairs, heads and positions."""
    from fractions import Fraction
    from math import floor

    w = torch.zeros(h, n, n, dtype=torch.int64)
    if pattern is None:
        for i in range(n):
            for j in range(n):
                w[:, i, j] = int(not causal or j <= i)
        return w
    npairs = len(pattern.segment_lengths)
    for kk in range(npairs):
        seg = min(pattern.segment_lengths[kk], n)
        r = pattern.dilation_rates[kk]
        if pattern.mode == "mixture":
            heads = range(h)
        else:
            lo, hi = floor(Fraction(kk * h, npairs)), floor(Fraction((kk + 1) * h, npairs))
            heads = range(lo, hi)
        for head in heads:
            o = head % r
            for i in range(n):
                if (i % seg) % r != o:
                    continue
                for j in range(n):
                    if i // seg == j // seg and (j % seg) % r == o and (not causal or j <= i):
                        w[head, i, j] += 1
    return w


def naive_attention(q, k, v, w, scale=None):
    """Weighted attention with explicit ``W [H, N, N]``, one query row at a time, in float64.

    Each row ``i`` of head ``h`` gathers only its weighted keys ``{j : W[h, i, j] > 0}`` and
    evaluates SEMANTICS.md's formula on them, so a key with zero weight never enters the
    row (whatever NaN or inf it holds) and the row's gradient never reaches it. Rows with
    no weighted key are exactly 0. Differentiable; slow by design (small ``N`` only).
    """
    b, n, h, d = q.shape
    hkv = k.shape[2]
    scale = d**-0.5 if scale is None else scale
    out = [[torch.zeros(b, d, dtype=torch.float64)] * n for _ in range(h)]  # [h][i] -> [B, D]
    for hi in range(h):
        kv = hi // (h // hkv)
        for i in range(n):
            keys = (w[hi, i] > 0).nonzero()[:, 0]
            if keys.numel() == 0:
                continue
            kk, vv = k[:, keys, kv].double(), v[:, keys, kv].double()  # [B, K, D]
            s = torch.einsum("bkd,bd->bk", kk, q[:, i, hi].double()) * scale
            p = w[hi, i, keys].double() * torch.exp(s - s.amax(-1, keepdim=True).detach())
            out[hi][i] = torch.einsum("bk,bkd->bd", p, vv) / p.sum(-1, keepdim=True)
    return torch.stack([torch.stack(per_head, dim=1) for per_head in out], dim=2)  # [B, N, H, D]
