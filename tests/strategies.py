"""Hypothesis strategies for attention cases: shapes, sequence length, dilated patterns."""

from __future__ import annotations

import dataclasses

import torch
from hypothesis import strategies as st

import ring_attention as ra

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
        """Random ``q, k, v`` (from ``seed``; Hypothesis does not seed torch)."""
        torch.manual_seed(self.seed)
        dtype = dtype or self.dtype
        shapes = [
            (self.batch, self.seq_len, self.heads, self.head_dim),
            (self.batch, self.seq_len, self.kv_heads, self.head_dim),
            (self.batch, self.seq_len, self.kv_heads, self.head_dim),
        ]
        out = []
        for i, s in enumerate(shapes):
            t = torch.randn(s, dtype=torch.float64)
            if i < 2:
                t = t * magnitude
            out.append(t.to(dtype).requires_grad_(requires_grad))
        return tuple(out)


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
    """Weighted attention with explicit ``W [H, N, N]``, per (batch, head), in float64.

    Differentiable; rows with no weight are left at exactly 0 and never computed.
    """
    b, n, h, d = q.shape
    hkv = k.shape[2]
    scale = d**-0.5 if scale is None else scale
    rows_out = []
    for bi in range(b):
        heads_out = []
        for hi in range(h):
            kv = hi // (h // hkv)
            qq = q[bi, :, hi].double()
            kk = k[bi, :, kv].double()
            vv = v[bi, :, kv].double()
            ww = w[hi].double()
            live = ww.sum(-1) > 0
            o = torch.zeros(n, d, dtype=torch.float64)
            if bool(live.any()):
                s = (qq[live] @ kk.T) * scale
                wl = ww[live]
                s = torch.where(wl > 0, s, torch.full_like(s, float("-inf")))
                m = s.max(-1, keepdim=True).values.detach()
                p = wl * torch.exp(s - m)
                res = (p @ vv) / p.sum(-1, keepdim=True)
                o = o.index_put((live.nonzero()[:, 0],), res)
            heads_out.append(o)
        rows_out.append(torch.stack(heads_out, dim=1))
    return torch.stack(rows_out, dim=0)
